/* Timers: the three interval timers and POSIX timers (signal, none and thread-directed
 * notification, on three clocks) come back with their ids, clocks, intervals and about the
 * time that was left; a timer still due fires after restore with its signal and value. */
#include "zdtm.h"
#include <signal.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>

#define NSEC 1000000000LL

static long long ns(struct timespec t) { return t.tv_sec * NSEC + t.tv_nsec; }
static long long us_ns(struct timeval t) { return t.tv_sec * NSEC + t.tv_usec * 1000LL; }

int main(void)
{
	/* value, interval in seconds */
	struct itimerval it[3] = {
		{ { 7, 0 }, { 600, 0 } },        /* ITIMER_REAL: 10 min, then every 7 s */
		{ { 0, 250000 }, { 900, 0 } },   /* ITIMER_VIRTUAL */
		{ { 0, 0 }, { 1200, 500000 } },  /* ITIMER_PROF, one-shot */
	};
	const char *names[3] = { "ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF" };
	for (int w = 0; w < 3; w++)
		CHECK(setitimer(w, &it[w], NULL) == 0, "setitimer %s: %s", names[w], strerror(errno));

	sigset_t rt;
	sigemptyset(&rt);
	sigaddset(&rt, SIGRTMIN);
	sigaddset(&rt, SIGRTMIN + 1);
	sigaddset(&rt, SIGALRM);
	sigprocmask(SIG_BLOCK, &rt, NULL);

	timer_t t[4];
	struct sigevent ev[4];
	clockid_t clocks[4] = { CLOCK_MONOTONIC, CLOCK_REALTIME, CLOCK_BOOTTIME, CLOCK_MONOTONIC };
	memset(ev, 0, sizeof ev);
	ev[0].sigev_notify = SIGEV_SIGNAL; ev[0].sigev_signo = SIGRTMIN; ev[0].sigev_value.sival_ptr = (void *)0x1234;
	ev[1].sigev_notify = SIGEV_NONE;
	ev[2].sigev_notify = SIGEV_THREAD_ID; ev[2].sigev_signo = SIGRTMIN + 1;
	ev[2]._sigev_un._tid = syscall(SYS_gettid); ev[2].sigev_value.sival_int = 77;
	/* fires about a second after setup: before or after the dump, it must be seen after */
	ev[3].sigev_notify = SIGEV_SIGNAL; ev[3].sigev_signo = SIGALRM; ev[3].sigev_value.sival_int = 4242;
	struct itimerspec spec[4] = {
		{ { 1, 500000000 }, { 600, 0 } },
		{ { 0, 0 }, { 900, 0 } },
		{ { 3, 0 }, { 1200, 0 } },
		{ { 0, 0 }, { 1, 0 } },
	};
	for (int i = 0; i < 4; i++) {
		CHECK(timer_create(clocks[i], &ev[i], &t[i]) == 0, "timer_create %d: %s", i, strerror(errno));
		CHECK(timer_settime(t[i], 0, &spec[i], NULL) == 0, "timer_settime %d: %s", i, strerror(errno));
	}
	/* A disarmed one, to check it stays there and disarmed. */
	timer_t idle;
	struct sigevent none = { .sigev_notify = SIGEV_NONE };
	CHECK(timer_create(CLOCK_MONOTONIC, &none, &idle) == 0, "timer_create idle: %s", strerror(errno));

	zdtm_ready();
	zdtm_wait_go();

	for (int w = 0; w < 3; w++) {
		struct itimerval now;
		CHECK(getitimer(w, &now) == 0, "getitimer %s: %s", names[w], strerror(errno));
		long long left = us_ns(now.it_value), had = us_ns(it[w].it_value);
		CHECK(us_ns(now.it_interval) == us_ns(it[w].it_interval), "%s: interval %lld ns, was %lld ns", names[w],
		      us_ns(now.it_interval), us_ns(it[w].it_interval));
		CHECK(left > 0 && left <= had + NSEC / 50 && left > had - 120 * NSEC, "%s: %lld ns left of %lld (disarmed or wrong)",
		      names[w], left, had);
	}
	for (int i = 0; i < 3; i++) {
		struct itimerspec now;
		CHECK(timer_gettime(t[i], &now) == 0, "POSIX timer %d (id %ld) is gone: %s", i, (long)t[i],
		      strerror(errno));
		long long left = ns(now.it_value), had = ns(spec[i].it_value);
		CHECK(ns(now.it_interval) == ns(spec[i].it_interval), "POSIX timer %d: interval %lld ns, was %lld", i,
		      ns(now.it_interval), ns(spec[i].it_interval));
		CHECK(left > 0 && left <= had && left > had - 120 * NSEC, "POSIX timer %d: %lld ns left of %lld", i,
		      left, had);
	}
	struct itimerspec idle_now;
	CHECK(timer_gettime(idle, &idle_now) == 0, "the disarmed POSIX timer is gone: %s", strerror(errno));
	CHECK(ns(idle_now.it_value) == 0, "the disarmed POSIX timer is armed");

	/* The short one: its SIGALRM with its value, whenever it fired. */
	sigset_t alrm;
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	siginfo_t si;
	struct timespec wait = { 10, 0 };
	CHECK(sigtimedwait(&alrm, &si, &wait) == SIGALRM, "the short POSIX timer never fired: %s", strerror(errno));
	CHECK(si.si_code == SI_TIMER && si.si_value.sival_int == 4242, "SIGALRM with code %d value %d, not the timer's",
	      si.si_code, si.si_value.sival_int);
	/* The thread-directed one still targets this thread: re-arm it short and wait. */
	struct itimerspec soon = { { 0, 0 }, { 0, 50000000 } };
	CHECK(timer_settime(t[2], 0, &soon, NULL) == 0, "timer_settime: %s", strerror(errno));
	sigset_t rt1;
	sigemptyset(&rt1);
	sigaddset(&rt1, SIGRTMIN + 1);
	CHECK(sigtimedwait(&rt1, &si, &wait) == SIGRTMIN + 1, "the thread-directed timer did not fire: %s",
	      strerror(errno));
	CHECK(si.si_value.sival_int == 77, "thread-directed timer value %d, was 77", si.si_value.sival_int);
	zdtm_pass();
}
