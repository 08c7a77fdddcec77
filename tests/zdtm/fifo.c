/* A named pipe (FIFO) the process opened for reading (non-blocking), for writing, and again
 * read-write on fd 33: its buffered bytes, each open's access mode and flags are the same
 * after restore, and all three still lead into one pipe. */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/stat.h>

#define BYTES 3000

int main(void)
{
	char path[4096], in[BYTES], out[BYTES];
	zdtm_init();
	zdtm_path(path, sizeof path, "fifo");
	CHECK(mkfifo(path, 0600) == 0, "mkfifo: %s", strerror(errno));
	int r = open(path, O_RDONLY | O_NONBLOCK), w = open(path, O_WRONLY);
	CHECK(r >= 0 && w >= 0, "open %s: %s", path, strerror(errno));
	int rw = open(path, O_RDWR);
	CHECK(rw >= 0 && dup2(rw, 33) == 33, "open O_RDWR: %s", strerror(errno));
	close(rw);
	for (int i = 0; i < BYTES; i++)
		in[i] = 'A' + i % 17;
	CHECK(write(w, in, BYTES) == BYTES, "write: %s", strerror(errno));
	zdtm_ready();
	zdtm_wait_go();

	struct stat st;
	CHECK(fstat(r, &st) == 0 && S_ISFIFO(st.st_mode), "fd %d is no FIFO", r);
	CHECK(fcntl(r, F_GETFL) & O_NONBLOCK, "the read end lost O_NONBLOCK");
	CHECK(!(fcntl(w, F_GETFL) & O_NONBLOCK), "the write end became non-blocking");
	CHECK((fcntl(33, F_GETFL) & O_ACCMODE) == O_RDWR, "fd 33 is no longer read-write");
	CHECK(read(r, out, BYTES) == BYTES && memcmp(in, out, BYTES) == 0, "the buffered bytes changed");
	CHECK(read(r, out, 1) < 0 && errno == EAGAIN, "more bytes than were buffered");
	CHECK(write(33, "q", 1) == 1 && read(r, out, 1) == 1 && out[0] == 'q', "fd 33 leads elsewhere");
	CHECK(write(w, "v", 1) == 1 && read(r, out, 1) == 1 && out[0] == 'v', "the write end leads elsewhere");
	zdtm_pass();
}
