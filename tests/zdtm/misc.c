/* Misc per-process state: cwd, umask, a lowered RLIMIT_NOFILE soft limit, the comm name, the
 * nice value and no_new_privs are the same after restore, and the process runs on the same
 * CPUs as before (the restorer pins itself and the process-to-be together while it works):
 * pinned to the last CPU where there are several, all of them where there is one; it leads
 * its own session (or, failing that, process group) again. */
#define _GNU_SOURCE
#include "zdtm.h"
#include <limits.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

int main(void)
{
	char cwd_before[PATH_MAX], cwd_now[PATH_MAX], dir[PATH_MAX], comm[17] = { 0 };
	struct rlimit rl_before, rl_now, st_before, st_now;
	int nice_before, nice_now;
	mode_t um;

	zdtm_path(dir, sizeof dir, "cwd-dir");
	CHECK(mkdir(dir, 0755) == 0 || errno == EEXIST, "mkdir %s: %s", dir, strerror(errno));
	CHECK(chdir(dir) == 0, "chdir: %s", strerror(errno));
	umask(027);
	getrlimit(RLIMIT_NOFILE, &rl_before);
	rl_before.rlim_cur = 321;
	CHECK(setrlimit(RLIMIT_NOFILE, &rl_before) == 0, "setrlimit: %s", strerror(errno));
	getrlimit(RLIMIT_STACK, &st_before);
	CHECK(prctl(PR_SET_NAME, "zdtm-misc-42", 0, 0, 0) == 0, "PR_SET_NAME");
	errno = 0;
	nice_before = getpriority(PRIO_PROCESS, 0);
	CHECK(setpriority(PRIO_PROCESS, 0, nice_before + 5) == 0, "setpriority: %s", strerror(errno));
	nice_before += 5;
	CHECK(getcwd(cwd_before, sizeof cwd_before), "getcwd");
	CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	cpu_set_t cpus_before, cpus_now;
	CHECK(sched_getaffinity(0, sizeof cpus_before, &cpus_before) == 0, "sched_getaffinity: %s", strerror(errno));
	if (CPU_COUNT(&cpus_before) > 1) {
		int last = 0;
		for (int c = 0; c < CPU_SETSIZE; c++)
			if (CPU_ISSET(c, &cpus_before))
				last = c;
		CPU_ZERO(&cpus_before);
		CPU_SET(last, &cpus_before);
		CHECK(sched_setaffinity(0, sizeof cpus_before, &cpus_before) == 0, "sched_setaffinity: %s",
		      strerror(errno));
	}
	/* Lead a session of its own (or, if it cannot, its own process group). */
	if (setsid() < 0)
		CHECK(setpgid(0, 0) == 0, "setpgid: %s", strerror(errno));
	int led_session = getsid(0) == getpid(), led_group = getpgrp() == getpid();
	CHECK(led_group, "does not lead its process group");
	zdtm_ready();
	zdtm_wait_go();

	CHECK((getsid(0) == getpid()) == led_session, "session leader before: %d, now: %d", led_session,
	      getsid(0) == getpid());
	CHECK(getpgrp() == getpid(), "no longer leads its process group (pgid %d)", getpgrp());

	CHECK(getcwd(cwd_now, sizeof cwd_now), "getcwd after restore: %s", strerror(errno));
	CHECK(strcmp(cwd_now, cwd_before) == 0, "cwd is %s, was %s", cwd_now, cwd_before);
	um = umask(0);
	CHECK(um == 027, "umask is %03o, was 027", (unsigned)um);
	getrlimit(RLIMIT_NOFILE, &rl_now);
	CHECK(rl_now.rlim_cur == 321 && rl_now.rlim_max == rl_before.rlim_max,
	      "RLIMIT_NOFILE is %lu/%lu, was 321/%lu", (unsigned long)rl_now.rlim_cur, (unsigned long)rl_now.rlim_max,
	      (unsigned long)rl_before.rlim_max);
	getrlimit(RLIMIT_STACK, &st_now);
	CHECK(st_now.rlim_cur == st_before.rlim_cur && st_now.rlim_max == st_before.rlim_max, "RLIMIT_STACK changed");
	CHECK(prctl(PR_GET_NAME, comm, 0, 0, 0) == 0, "PR_GET_NAME");
	CHECK(strcmp(comm, "zdtm-misc-42") == 0, "comm is '%s', was 'zdtm-misc-42'", comm);
	errno = 0;
	nice_now = getpriority(PRIO_PROCESS, 0);
	CHECK(errno == 0 && nice_now == nice_before, "nice is %d, was %d", nice_now, nice_before);
	CHECK(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1, "no_new_privs was lost");
	CHECK(sched_getaffinity(0, sizeof cpus_now, &cpus_now) == 0, "sched_getaffinity: %s", strerror(errno));
	CHECK(CPU_EQUAL(&cpus_now, &cpus_before), "runs on %d CPUs (not the same), did on %d", CPU_COUNT(&cpus_now),
	      CPU_COUNT(&cpus_before));
	zdtm_pass();
}
