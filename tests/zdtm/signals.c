/* Signals: handlers with SA_SIGINFO/SA_RESTART/SA_ONSTACK and specific masks, a SIG_IGN, the
 * blocked mask, signals queued while blocked (process-wide with sigqueue, thread-directed with
 * pthread_sigqueue) delivered exactly once with their values after restore, and the alternate
 * signal stack. */
#include "zdtm.h"
#include <pthread.h>
#include <signal.h>
#include <stdint.h>

#define NSIG_CHECK 64

static volatile sig_atomic_t got[NSIG_CHECK + 1];
static volatile int values[NSIG_CHECK + 1];
static volatile uintptr_t handler_sp;
static char altstack[64 * 1024];

static void h_info(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	got[sig]++;
	values[sig] = si->si_value.sival_int;
}

static void h_onstack(int sig)
{
	volatile char here;
	got[sig]++;
	handler_sp = (uintptr_t)&here;
}

static void h_plain(int sig) { got[sig]++; }

static int sa_equal(const struct sigaction *a, const struct sigaction *b)
{
	return a->sa_handler == b->sa_handler && a->sa_flags == b->sa_flags &&
	       memcmp(&a->sa_mask, &b->sa_mask, sizeof(uint64_t)) == 0 && a->sa_restorer == b->sa_restorer;
}

int main(void)
{
	struct sigaction sa, before[NSIG_CHECK + 1], now;
	sigset_t block, mask_before, mask_now, pend;
	stack_t ss = { 0 }, ss_before, ss_now;
	union sigval v;
	int s, rt_shared = SIGRTMIN + 2, rt_thread = SIGRTMIN + 3;

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = h_info;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGUSR2);
	sigaddset(&sa.sa_mask, SIGRTMIN + 5);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(rt_shared, &sa, NULL);
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGINT);
	sigaction(rt_thread, &sa, NULL);

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = h_onstack;
	sa.sa_flags = SA_ONSTACK | SA_NODEFER;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = h_plain;
	sa.sa_flags = SA_RESETHAND;
	sigaction(SIGHUP, &sa, NULL);
	sa.sa_handler = SIG_IGN;
	sa.sa_flags = 0;
	sigaction(SIGPIPE, &sa, NULL);

	ss.ss_sp = altstack;
	ss.ss_size = sizeof altstack;
	CHECK(sigaltstack(&ss, NULL) == 0, "sigaltstack: %s", strerror(errno));

	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGWINCH);
	sigaddset(&block, rt_shared);
	sigaddset(&block, rt_thread);
	sigprocmask(SIG_BLOCK, &block, NULL);
	v.sival_int = 424242;
	CHECK(sigqueue(getpid(), rt_shared, v) == 0, "sigqueue: %s", strerror(errno));
	v.sival_int = 777;
	CHECK(pthread_sigqueue(pthread_self(), rt_thread, v) == 0, "pthread_sigqueue failed");

	for (s = 1; s <= NSIG_CHECK; s++)
		if (s != SIGKILL && s != SIGSTOP && (s < 32 || s >= SIGRTMIN))
			sigaction(s, NULL, &before[s]);
	sigprocmask(SIG_BLOCK, NULL, &mask_before);
	sigaltstack(NULL, &ss_before);

	zdtm_ready();
	zdtm_wait_go();

	for (s = 1; s <= NSIG_CHECK; s++) {
		if (s == SIGKILL || s == SIGSTOP || (s >= 32 && s < SIGRTMIN))
			continue;
		sigaction(s, NULL, &now);
		CHECK(sa_equal(&now, &before[s]),
		      "sigaction(%d) changed: handler %p flags %#x mask %#lx, was handler %p flags %#x mask %#lx", s,
		      (void *)now.sa_handler, now.sa_flags, *(unsigned long *)&now.sa_mask, (void *)before[s].sa_handler,
		      before[s].sa_flags, *(unsigned long *)&before[s].sa_mask);
	}
	sigprocmask(SIG_BLOCK, NULL, &mask_now);
	CHECK(memcmp(&mask_now, &mask_before, 8) == 0, "blocked mask %#lx, was %#lx", *(unsigned long *)&mask_now,
	      *(unsigned long *)&mask_before);
	sigaltstack(NULL, &ss_now);
	CHECK(ss_now.ss_sp == ss_before.ss_sp && ss_now.ss_size == ss_before.ss_size &&
	      ss_now.ss_flags == ss_before.ss_flags,
	      "sigaltstack sp %p size %zu flags %d, was %p %zu %d", ss_now.ss_sp, ss_now.ss_size, ss_now.ss_flags,
	      ss_before.ss_sp, ss_before.ss_size, ss_before.ss_flags);

	CHECK(sigpending(&pend) == 0, "sigpending");
	CHECK(sigismember(&pend, rt_shared), "process-wide queued signal %d is no longer pending", rt_shared);
	CHECK(sigismember(&pend, rt_thread), "thread-directed queued signal %d is no longer pending", rt_thread);
	CHECK(!sigismember(&pend, SIGTERM), "SIGTERM pending out of nowhere");
	CHECK(got[rt_shared] == 0 && got[rt_thread] == 0, "a blocked signal was delivered while blocked");

	sigprocmask(SIG_UNBLOCK, &block, NULL);
	CHECK(got[rt_shared] == 1, "signal %d delivered %d times after unblocking, want once", rt_shared,
	      (int)got[rt_shared]);
	CHECK(values[rt_shared] == 424242, "sigqueue value %d, want 424242", values[rt_shared]);
	CHECK(got[rt_thread] == 1, "signal %d delivered %d times after unblocking, want once", rt_thread,
	      (int)got[rt_thread]);
	CHECK(values[rt_thread] == 777, "pthread_sigqueue value %d, want 777", values[rt_thread]);
	sigpending(&pend);
	for (s = 1; s <= NSIG_CHECK; s++)
		CHECK(!sigismember(&pend, s), "signal %d still pending after delivery", s);

	/* handlers still run, on the alternate stack where asked */
	raise(SIGUSR2);
	CHECK(got[SIGUSR2] == 1, "SIGUSR2 handler did not run");
	CHECK(handler_sp >= (uintptr_t)altstack && handler_sp < (uintptr_t)altstack + sizeof altstack,
	      "SA_ONSTACK handler ran at %#lx, outside the alternate stack %p..%p", (unsigned long)handler_sp,
	      (void *)altstack, (void *)(altstack + sizeof altstack));
	v.sival_int = 99;
	sigqueue(getpid(), SIGUSR1, v);
	CHECK(got[SIGUSR1] == 1 && values[SIGUSR1] == 99, "SIGUSR1 SA_SIGINFO handler: count %d value %d",
	      (int)got[SIGUSR1], values[SIGUSR1]);
	raise(SIGPIPE); /* ignored: we are still here */
	raise(SIGHUP);
	CHECK(got[SIGHUP] == 1, "SIGHUP handler did not run");
	sigaction(SIGHUP, NULL, &now);
	CHECK(now.sa_handler == SIG_DFL, "SA_RESETHAND did not reset SIGHUP");
	zdtm_pass();
}
