/* eventfd, timerfd and signalfd: their counts, modes, timers (relative, absolute with
 * cancel-on-set, and one already expired with an unread tick), masks and numbers (one
 * shared with a dup on fd 20) are the same after restore. */
#include "zdtm.h"
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>

#ifndef TFD_TIMER_CANCEL_ON_SET
#define TFD_TIMER_CANCEL_ON_SET (1 << 1)
#endif

static long long ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

/* The value of line `key` of /proc/self/fdinfo/FD, as text. */
static void fdinfo(int fd, const char *key, char *out, size_t len)
{
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(path, "r");
	CHECK(f, "open %s: %s", path, strerror(errno));
	out[0] = 0;
	while (fgets(line, sizeof line, f))
		if (strncmp(line, key, strlen(key)) == 0 && line[strlen(key)] == ':') {
			char *v = line + strlen(key) + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			v[strcspn(v, "\n")] = 0;
			snprintf(out, len, "%s", v);
		}
	fclose(f);
}

int main(void)
{
	int sem = eventfd(42, EFD_SEMAPHORE | EFD_NONBLOCK);
	int big = eventfd(0, 0);
	uint64_t v = 1ULL << 40;
	CHECK(sem >= 0 && big >= 0 && write(big, &v, 8) == 8, "eventfd: %s", strerror(errno));
	CHECK(dup2(big, 20) == 20, "dup2: %s", strerror(errno));

	int rel = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	struct itimerspec r = { { 1, 500000000 }, { 30, 0 } };
	CHECK(rel >= 0 && timerfd_settime(rel, 0, &r, NULL) == 0, "timerfd rel: %s", strerror(errno));
	int expired = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	struct itimerspec e = { { 0, 0 }, { 0, 1000000 } };
	CHECK(expired >= 0 && timerfd_settime(expired, 0, &e, NULL) == 0, "timerfd expired: %s", strerror(errno));
	int abs_ = timerfd_create(CLOCK_REALTIME, 0);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	struct itimerspec a = { { 0, 0 }, { now.tv_sec + 3600, 0 } };
	CHECK(abs_ >= 0 && timerfd_settime(abs_, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &a, NULL) == 0,
	      "timerfd abs: %s", strerror(errno));

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGRTMIN);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	int sfd = signalfd(-1, &mask, SFD_NONBLOCK);
	CHECK(sfd >= 0, "signalfd: %s", strerror(errno));
	raise(SIGUSR1);
	usleep(50000); /* the 1 ms timer has expired: one tick, unread */

	zdtm_ready();
	zdtm_wait_go();

	char buf[64];
	fdinfo(sem, "eventfd-count", buf, sizeof buf);
	CHECK(strtoull(buf, NULL, 16) == 42, "eventfd count %s, was 2a", buf);
	fdinfo(sem, "eventfd-semaphore", buf, sizeof buf);
	CHECK(strcmp(buf, "1") == 0, "eventfd lost its semaphore mode");
	CHECK(fcntl(sem, F_GETFL) & O_NONBLOCK, "eventfd lost O_NONBLOCK");
	CHECK(read(sem, &v, 8) == 8 && v == 1, "semaphore read gave %llu", (unsigned long long)v);
	v = 3;
	CHECK(write(20, &v, 8) == 8, "write to fd 20: %s", strerror(errno));
	CHECK(read(big, &v, 8) == 8 && v == (1ULL << 40) + 3, "fd 20 and fd %d no longer share one eventfd (%llu)",
	      big, (unsigned long long)v);

	struct itimerspec g;
	CHECK(timerfd_gettime(rel, &g) == 0, "timerfd_gettime: %s", strerror(errno));
	CHECK(ns(g.it_interval) == 1500000000LL, "relative timerfd interval %lld ns", ns(g.it_interval));
	CHECK(ns(g.it_value) > 0 && ns(g.it_value) <= 30000000000LL, "relative timerfd left %lld ns", ns(g.it_value));
	CHECK(read(expired, &v, 8) == 8 && v == 1, "the expired timerfd's unread tick is gone");
	fdinfo(abs_, "settime flags", buf, sizeof buf);
	CHECK(strtol(buf, NULL, 8) == (TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET), "absolute timerfd flags %s", buf);
	CHECK(timerfd_gettime(abs_, &g) == 0 && ns(g.it_value) > 3000000000000LL && ns(g.it_value) <= 3600000000000LL,
	      "absolute timerfd left %lld ns", ns(g.it_value));

	fdinfo(sfd, "sigmask", buf, sizeof buf);
	CHECK(strtoull(buf, NULL, 16) == ((1ULL << (SIGUSR1 - 1)) | (1ULL << (SIGRTMIN - 1))), "signalfd mask %s", buf);
	struct signalfd_siginfo si;
	CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1, "signalfd read: %s",
	      strerror(errno));
	zdtm_pass();
}
