/* Pipes: one whose two ends the process holds keeps its buffered bytes, its size, its ends'
 * flags and every fd number on it (a write end dup'd on fd 30, the read end opened again
 * through /proc on fd 31); one whose write end another process holds (a grandchild, not a
 * child) stays that very pipe: the bytes written before the capture and those written after
 * the restore (once the restored process says it is back) both arrive. */
#define _GNU_SOURCE
#include "zdtm.h"
#include <fcntl.h>
#include <sys/wait.h>

#define BYTES 5000

static void read_all(int fd, char *buf, int n, const char *what)
{
	int got = 0;
	for (int tries = 0; got < n && tries < 5000; tries++) {
		int k = read(fd, buf + got, n - got);
		if (k > 0)
			got += k;
		else if (k == 0)
			break;
		else if (errno == EAGAIN)
			usleep(1000);
		else
			FAIL("%s: read: %s", what, strerror(errno));
	}
	CHECK(got == n, "%s: %d of %d bytes", what, got, n);
}

int main(void)
{
	zdtm_init();
	int p[2], q[2];
	char in[BYTES], out[BYTES];
	for (int i = 0; i < BYTES; i++)
		in[i] = 'a' + i % 23;
	CHECK(pipe2(p, O_NONBLOCK) == 0, "pipe2: %s", strerror(errno));
	CHECK(fcntl(p[1], F_SETFL, 0) == 0, "F_SETFL: %s", strerror(errno)); /* write end blocking */
	CHECK(fcntl(p[0], F_SETPIPE_SZ, 128 << 10) >= 128 << 10, "F_SETPIPE_SZ: %s", strerror(errno));
	CHECK(write(p[1], in, BYTES) == BYTES, "write: %s", strerror(errno));
	CHECK(dup2(p[1], 30) == 30, "dup2: %s", strerror(errno));
	/* The read end opened again through /proc: an open file description of its own
	 * (blocking, where p[0] is not), on fd 31. */
	char self_fd[64];
	snprintf(self_fd, sizeof self_fd, "/proc/self/fd/%d", p[0]);
	int again = open(self_fd, O_RDONLY);
	CHECK(again >= 0 && dup2(again, 31) == 31, "reopening the read end: %s", strerror(errno));
	close(again);

	/* The external one: its write end in a grandchild that writes "before", then "after"
	 * once the go file exists (after the restore). */
	CHECK(pipe(q) == 0, "pipe: %s", strerror(errno));
	pid_t child = fork();
	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0) {
		if (fork() == 0) {
			close(q[0]);
			CHECK(write(q[1], "before", 6) == 6, "grandchild write");
			/* "after" once the restored process says it is back (while it travels the
			 * pipe has no reader: a write would get SIGPIPE). */
			char back[4200];
			zdtm_path(back, sizeof back, "back");
			for (int i = 0; i < 60000 && access(back, F_OK) != 0; i++)
				usleep(1000);
			CHECK(write(q[1], "after", 5) == 5, "grandchild write after");
			/* It holds the pipe until the restored process has read it (or a minute). */
			char done[4200];
			zdtm_path(done, sizeof done, "read");
			for (int i = 0; i < 60000 && access(done, F_OK) != 0; i++)
				usleep(1000);
			_exit(0);
		}
		_exit(0);
	}
	CHECK(waitpid(child, NULL, 0) == child, "waitpid: %s", strerror(errno));
	close(q[1]);
	usleep(100000); /* "before" is in the pipe */

	zdtm_ready();
	zdtm_wait_go();

	CHECK(fcntl(p[0], F_GETPIPE_SZ) == 128 << 10, "pipe size %d, was %d", fcntl(p[0], F_GETPIPE_SZ), 128 << 10);
	CHECK(fcntl(p[0], F_GETFL) & O_NONBLOCK, "the read end lost O_NONBLOCK");
	CHECK(!(fcntl(p[1], F_GETFL) & O_NONBLOCK), "the write end became non-blocking");
	CHECK((fcntl(p[0], F_GETFL) & O_ACCMODE) == O_RDONLY && (fcntl(30, F_GETFL) & O_ACCMODE) == O_WRONLY,
	      "the ends are swapped");
	read_all(p[0], out, BYTES, "the buffered bytes");
	CHECK(memcmp(in, out, BYTES) == 0, "the buffered bytes changed");
	CHECK(read(p[0], out, 1) < 0 && errno == EAGAIN, "more bytes than were buffered");
	CHECK(write(30, "x", 1) == 1, "write through fd 30: %s", strerror(errno));
	read_all(p[0], out, 1, "the byte written through fd 30");
	CHECK(out[0] == 'x', "fd 30 is not the pipe's write end");
	CHECK(!(fcntl(31, F_GETFL) & O_NONBLOCK), "fd 31 shares the read end's open file (non-blocking)");
	CHECK(write(30, "y", 1) == 1, "write through fd 30: %s", strerror(errno));
	CHECK(read(31, out, 1) == 1 && out[0] == 'y', "fd 31 does not read the same pipe");

	char back[4200];
	zdtm_path(back, sizeof back, "back");
	close(open(back, O_CREAT | O_WRONLY, 0600));
	char got[12] = { 0 };
	read_all(q[0], got, 11, "the other process's bytes");
	CHECK(memcmp(got, "beforeafter", 11) == 0, "from the other process: '%s'", got);
	char done[4200];
	zdtm_path(done, sizeof done, "read");
	close(open(done, O_CREAT | O_WRONLY, 0600));
	zdtm_pass();
}
