/* Runs under a seccomp filter (one that allows everything). Its filters cannot be captured
 * yet, and a restored copy without them would have left its sandbox: the runner expects
 * `telefork dump` to refuse, naming seccomp, and this process to carry on untouched. */
#include "zdtm.h"
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>

int main(void)
{
	struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	struct sock_fprog prog = { .len = 1, .filter = &allow };
	CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0, "PR_SET_SECCOMP: %s", strerror(errno));
	zdtm_ready();
	zdtm_wait_go();
	zdtm_pass();
}
