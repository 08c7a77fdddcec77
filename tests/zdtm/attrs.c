/* Process attributes: oom_score_adj, the audit login uid, PR_SET_THP_DISABLE,
 * PR_SET_CHILD_SUBREAPER, timer slack, a membarrier registration, dumpable (cleared, as
 * secret-keeping programs do), memory-deny-write-execute, the scheduling policy
 * (SCHED_BATCH with SCHED_RESET_ON_FORK), the I/O priority and coredump_filter are the same
 * after restore. */
#include "zdtm.h"
#include <fcntl.h>
#include <linux/membarrier.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif
#ifndef MEMBARRIER_CMD_GET_REGISTRATIONS
#define MEMBARRIER_CMD_GET_REGISTRATIONS (1 << 9)
#endif

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
	CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text), "write %s: %s", path, strerror(errno));
	close(fd);
}

static long read_long(const char *path)
{
	char buf[64] = { 0 };
	int fd = open(path, O_RDONLY);
	CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
	CHECK(read(fd, buf, sizeof buf - 1) > 0, "read %s: %s", path, strerror(errno));
	close(fd);
	return strtol(buf, NULL, 10);
}

int main(void)
{
	write_file("/proc/self/oom_score_adj", "321");
	/* The login uid can be set once per process by root (CAP_AUDIT_CONTROL). */
	int loginuid_set = 0;
	if (access("/proc/self/loginuid", F_OK) == 0) {
		int fd = open("/proc/self/loginuid", O_WRONLY);
		loginuid_set = fd >= 0 && write(fd, "4242", 4) == 4;
		if (fd >= 0)
			close(fd);
	}
	CHECK(prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0, "PR_SET_THP_DISABLE: %s", strerror(errno));
	CHECK(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0, "PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
	CHECK(prctl(PR_SET_TIMERSLACK, 123456) == 0, "PR_SET_TIMERSLACK: %s", strerror(errno));
	int membarrier = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
	long regs_before = membarrier ? syscall(SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0) : -1;
	struct sched_param sp = { 0 };
	CHECK(sched_setscheduler(0, SCHED_BATCH | SCHED_RESET_ON_FORK, &sp) == 0, "sched_setscheduler: %s",
	      strerror(errno));
	int ioprio = (2 << 13) | 6; /* best effort, level 6 */
	CHECK(syscall(SYS_ioprio_set, 1, 0, ioprio) == 0, "ioprio_set: %s", strerror(errno));
	write_file("/proc/self/coredump_filter", "0x27");
	CHECK(prctl(PR_SET_DUMPABLE, 0) == 0, "PR_SET_DUMPABLE: %s", strerror(errno));
	int mdwe = prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0;
	printf("loginuid %s, membarrier %s, mdwe %s\n", loginuid_set ? "set" : "not settable here",
	       membarrier ? "registered" : "not available", mdwe ? "set" : "not available");

	zdtm_ready();
	zdtm_wait_go();

	long adj = read_long("/proc/self/oom_score_adj");
	CHECK(adj == 321, "oom_score_adj is %ld, was 321", adj);
	if (loginuid_set) {
		long uid = read_long("/proc/self/loginuid");
		CHECK(uid == 4242, "loginuid is %ld, was 4242", uid);
	}
	CHECK(prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1, "THP disable was lost");
	int subreaper = 0;
	CHECK(prctl(PR_GET_CHILD_SUBREAPER, &subreaper) == 0 && subreaper == 1, "child subreaper was lost");
	CHECK(prctl(PR_GET_TIMERSLACK) == 123456, "timer slack is %d, was 123456", prctl(PR_GET_TIMERSLACK));
	if (membarrier) {
		long regs = syscall(SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0);
		CHECK(regs == regs_before, "membarrier registrations %#lx, were %#lx", regs, regs_before);
		CHECK(syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0,
		      "private expedited membarrier refused: %s", strerror(errno));
	}
	CHECK(prctl(PR_GET_DUMPABLE) == 0, "the process is dumpable again (it had made itself not)");
	int policy = sched_getscheduler(0);
	CHECK(policy == (SCHED_BATCH | SCHED_RESET_ON_FORK), "scheduling policy %#x, was SCHED_BATCH|RESET_ON_FORK",
	      policy);
	long prio = syscall(SYS_ioprio_get, 1, 0);
	CHECK(prio == ioprio, "I/O priority %#lx, was %#x", prio, ioprio);
	char buf[32] = { 0 };
	int fd = open("/proc/self/coredump_filter", O_RDONLY);
	CHECK(fd >= 0 && read(fd, buf, sizeof buf - 1) > 0, "reading coredump_filter: %s", strerror(errno));
	CHECK(strtol(buf, NULL, 16) == 0x27, "coredump_filter %s, was 27", buf);
	if (mdwe)
		CHECK(prctl(PR_GET_MDWE, 0, 0, 0, 0) == PR_MDWE_REFUSE_EXEC_GAIN, "MDWE was lost");
	zdtm_pass();
}
