/* Holds an fd kind telefork does not capture (argv[1]: "pipe" or "socket") on fd 5. The runner
 * expects `telefork dump` to refuse, naming fd 5 and its kind, and this process to carry on
 * untouched: after go it checks fd 5 still works and prints PASS. */
#include "zdtm.h"
#include <sys/socket.h>

int main(int argc, char **argv)
{
	int p[2];
	char buf[8] = { 0 };
	CHECK(argc == 2, "usage: refuse_fd pipe|socket");
	if (strcmp(argv[1], "pipe") == 0)
		CHECK(pipe(p) == 0, "pipe: %s", strerror(errno));
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
