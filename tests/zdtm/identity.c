/* Identity: the same PID after restore (when free), gettid() == getpid(), and glibc's cached
 * tid still right: raise(), pthread_kill(self) and an error-checking mutex locked before
 * capture (unlock works, lock + lock gives EDEADLK). The kernel-side thread state too: rseq
 * registered again with the same area (registering it once more gives EBUSY), the
 * set_tid_address pointer and the robust list as they were. */
#include "zdtm.h"
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

static int rseq_state(void)
{
	/* glibc registered this thread's area at thread pointer + __rseq_offset; the kernel
	 * answers EBUSY to the very same registration, EINVAL to another, 0 if none. */
	void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
	if (__rseq_size == 0)
		return -1;
	/* glibc 2.36 registers the original 32-byte struct rseq (and exports __rseq_size = 20,
	 * the part it uses); try both lengths. */
	if (syscall(SYS_rseq, area, 32, 0, RSEQ_SIG) == 0)
		return 0;
	if (errno == EBUSY)
		return EBUSY;
	if (syscall(SYS_rseq, area, __rseq_size, 0, RSEQ_SIG) == 0)
		return 0;
	return errno;
}

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
	void *tid_addr_before = NULL, *tid_addr_after = NULL, *robust_before = NULL, *robust_after = NULL;
	size_t robust_len_before = 0, robust_len_after = 0;
	CHECK(prctl(PR_GET_TID_ADDRESS, &tid_addr_before) == 0, "PR_GET_TID_ADDRESS: %s", strerror(errno));
	CHECK(syscall(SYS_get_robust_list, 0, &robust_before, &robust_len_before) == 0, "get_robust_list");
	CHECK(rseq_state() == EBUSY, "rseq not registered before capture (%d)", rseq_state());
	zdtm_ready();
	zdtm_wait_go();

	int rs = rseq_state();
	CHECK(rs == EBUSY, "rseq after restore: registering the same area again gave %s, want EBUSY (registered)",
	      rs == 0 ? "success (it was not registered)" : strerror(rs));
	CHECK(prctl(PR_GET_TID_ADDRESS, &tid_addr_after) == 0 && tid_addr_after == tid_addr_before,
	      "set_tid_address pointer is %p after restore, was %p", tid_addr_after, tid_addr_before);
	CHECK(syscall(SYS_get_robust_list, 0, &robust_after, &robust_len_after) == 0 && robust_after == robust_before &&
	      robust_len_after == robust_len_before,
	      "robust list is %p/%zu after restore, was %p/%zu", robust_after, robust_len_after, robust_before,
	      robust_len_before);

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
