/* Identity: the same PID after restore (when free), gettid() == getpid(), and glibc's cached
 * tid still right: raise(), pthread_kill(self) and an error-checking mutex locked before
 * capture (unlock works, lock + lock gives EDEADLK). */
#include "zdtm.h"
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

static volatile sig_atomic_t usr1, usr2;
static void h1(int s) { (void)s; usr1++; }
static void h2(int s) { (void)s; usr2++; }

static void *thread_fn(void *arg) { return (char *)arg + 1; }

int main(void)
{
	pthread_mutexattr_t at;
	pthread_mutex_t m;
	pthread_t th;
	void *ret;
	pid_t pid_before;
	int r;

	signal(SIGUSR1, h1);
	signal(SIGUSR2, h2);
	pthread_mutexattr_init(&at);
	pthread_mutexattr_settype(&at, PTHREAD_MUTEX_ERRORCHECK);
	pthread_mutex_init(&m, &at);
	CHECK(pthread_mutex_lock(&m) == 0, "lock before capture");
	pid_before = getpid();
	zdtm_ready();
	zdtm_wait_go();

	CHECK(getpid() == pid_before, "getpid() is %d after restore, was %d", getpid(), pid_before);
	CHECK(syscall(SYS_gettid) == getpid(), "gettid %ld != getpid %d", syscall(SYS_gettid), getpid());
	CHECK(raise(SIGUSR1) == 0 && usr1 == 1, "raise(SIGUSR1): handler ran %d times", (int)usr1);
	CHECK(pthread_kill(pthread_self(), SIGUSR2) == 0 && usr2 == 1, "pthread_kill(self): handler ran %d times",
	      (int)usr2);
	r = pthread_mutex_unlock(&m);
	CHECK(r == 0, "unlocking the error-checking mutex locked before capture: %s", strerror(r));
	r = pthread_mutex_lock(&m);
	CHECK(r == 0, "relocking: %s", strerror(r));
	r = pthread_mutex_lock(&m);
	CHECK(r == EDEADLK, "locking twice gave %d (%s), want EDEADLK", r, strerror(r));
	CHECK(pthread_mutex_unlock(&m) == 0, "final unlock");
	/* threads can still be made */
	CHECK(pthread_create(&th, NULL, thread_fn, (void *)0x1000) == 0, "pthread_create after restore");
	CHECK(pthread_join(th, &ret) == 0 && ret == (void *)0x1001, "pthread_join after restore");
	zdtm_pass();
}
