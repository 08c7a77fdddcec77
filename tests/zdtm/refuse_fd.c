/* Holds an fd telefork does not capture on fd 5 (argv[1]: "inotify", "socket", "namespace" —
 * a network namespace fd — or "lease" — a file with a read lease). The runner expects
 * `telefork dump` to refuse, naming fd 5 and its kind, and this process to carry on
 * untouched: after go it checks fd 5 still works and prints PASS. */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
	int p[2];
	char buf[8] = { 0 };
	CHECK(argc == 2, "usage: refuse_fd inotify|socket|namespace|lease");
	if (strcmp(argv[1], "namespace") == 0 || strcmp(argv[1], "lease") == 0) {
		char path[4096];
		int lease = strcmp(argv[1], "lease") == 0;
		zdtm_init();
		zdtm_path(path, sizeof path, "leased");
		if (lease)
			CHECK(close(open(path, O_CREAT | O_WRONLY, 0600)) == 0, "create %s: %s", path, strerror(errno));
		int fd = open(lease ? path : "/proc/self/ns/net", O_RDONLY);
		CHECK(fd >= 0 && dup2(fd, 5) == 5, "open: %s", strerror(errno));
		if (fd != 5)
			close(fd);
		if (lease)
			CHECK(fcntl(5, F_SETLEASE, F_RDLCK) == 0, "F_SETLEASE: %s", strerror(errno));
		zdtm_ready();
		zdtm_wait_go();
		struct stat st;
		CHECK(fstat(5, &st) == 0, "fstat fd 5: %s", strerror(errno));
		if (lease)
			CHECK(fcntl(5, F_GETLEASE) == F_RDLCK, "the lease is gone");
		zdtm_pass();
	}
	if (strcmp(argv[1], "inotify") == 0) {
		int fd = inotify_init1(0);
		CHECK(fd >= 0 && dup2(fd, 5) == 5, "inotify_init1: %s", strerror(errno));
		close(fd);
		zdtm_ready();
		zdtm_wait_go();
		struct stat st;
		CHECK(fstat(5, &st) == 0, "fstat fd 5: %s", strerror(errno));
		zdtm_pass();
	}
	else
		CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, p) == 0, "socketpair: %s", strerror(errno));
	/* read end (or one socket) on fd 5, write end (or the peer) on fd 6 */
	CHECK(dup2(p[0], 5) == 5 && dup2(p[1], 6) == 6, "dup2");
	if (p[0] != 5 && p[0] != 6)
		close(p[0]);
	if (p[1] != 5 && p[1] != 6)
		close(p[1]);
	zdtm_ready();
	zdtm_wait_go();
	CHECK(write(6, "alive", 5) == 5, "write to fd 6: %s", strerror(errno));
	CHECK(read(5, buf, 5) == 5 && memcmp(buf, "alive", 5) == 0, "read from fd 5: %s", strerror(errno));
	zdtm_pass();
}
