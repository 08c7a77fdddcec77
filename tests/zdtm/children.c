/* A process with children: one that runs (pause) and one that has exited and is not reaped (a
 * zombie). argv[1] says what the runner does with it:
 *   "refused": `telefork dump` must refuse, naming both children; after go this process must
 *              still have them: the zombie reaps with its exit status, the other ends on
 *              SIGTERM and reaps;
 *   "alone":   dumped with --ignore-children and restored; after go the restored process has
 *              no children at all: wait() gives ECHILD, as the option says. */
#include "zdtm.h"
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

static pid_t spawn(int exit_at_once)
{
	pid_t pid = fork();
	CHECK(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		/* never outlive this process (a dump kills it) */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (exit_at_once)
			_exit(7);
		for (;;)
			pause();
	}
	return pid;
}

int main(int argc, char **argv)
{
	CHECK(argc == 2, "usage: children refused|alone");
	int alone = strcmp(argv[1], "alone") == 0;
	pid_t running = spawn(0), zombie = spawn(1);
	/* the zombie is one before READY: the runner finds it in /proc */
	for (int i = 0; i < 1000; i++) {
		char path[64], state = 0;
		snprintf(path, sizeof path, "/proc/%d/stat", zombie);
		FILE *f = fopen(path, "r");
		if (f) {
			CHECK(fscanf(f, "%*d %*s %c", &state) == 1, "reading %s", path);
			fclose(f);
		}
		if (state == 'Z')
			break;
		usleep(1000);
	}
	printf("CHILDREN %d %d\n", running, zombie);
	zdtm_ready();
	zdtm_wait_go();
	if (alone) {
		errno = 0;
		CHECK(waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD,
		      "restored alone, yet wait() finds children (errno %d)", errno);
		zdtm_pass();
	}
	int st;
	CHECK(waitpid(zombie, &st, WNOHANG) == zombie && WIFEXITED(st) && WEXITSTATUS(st) == 7,
	      "the zombie child %d is not reapable with status 7", zombie);
	CHECK(kill(running, SIGTERM) == 0, "kill %d: %s", running, strerror(errno));
	CHECK(waitpid(running, &st, 0) == running && WIFSIGNALED(st), "reaping child %d", running);
	zdtm_pass();
}
