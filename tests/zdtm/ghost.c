/* A file deleted while open: its contents (with a hole in the middle that stays a hole),
 * size, permissions (0666: no umask applies), each open file description's flags and offset,
 * and which fds share what (fd 40 a dup of one description, another description of the same
 * file) are the same after restore; it is still a regular file with no name. */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/stat.h>

#define SIZE 10000
#define HOLE_END (2 << 20)

int main(void)
{
	char path[4096], buf[SIZE], got[SIZE];
	zdtm_init();
	zdtm_path(path, sizeof path, "ghost");
	for (int i = 0; i < SIZE; i++)
		buf[i] = 'a' + i % 26;
	int a = open(path, O_CREAT | O_RDWR, 0666);
	CHECK(a >= 0 && write(a, buf, SIZE) == SIZE, "write %s: %s", path, strerror(errno));
	CHECK(fchmod(a, 0666) == 0, "fchmod: %s", strerror(errno));
	/* A hole of 1 MiB, then 4 KiB of data. */
	CHECK(pwrite(a, buf, 4096, HOLE_END) == 4096, "pwrite: %s", strerror(errno));
	int b = open(path, O_RDONLY);
	CHECK(b >= 0 && lseek(a, 100, SEEK_SET) == 100 && lseek(b, 5000, SEEK_SET) == 5000, "open/lseek: %s",
	      strerror(errno));
	CHECK(dup2(a, 40) == 40, "dup2: %s", strerror(errno));
	CHECK(unlink(path) == 0, "unlink: %s", strerror(errno));
	zdtm_ready();
	zdtm_wait_go();

	struct stat st;
	CHECK(fstat(a, &st) == 0, "fstat: %s", strerror(errno));
	CHECK(S_ISREG(st.st_mode) && st.st_nlink == 0, "not a regular file without a name (mode %o, %ld links)",
	      st.st_mode, (long)st.st_nlink);
	CHECK((st.st_mode & 0777) == 0666, "permissions %o, were 666", st.st_mode & 0777);
	CHECK(st.st_size == HOLE_END + 4096, "size %ld, was %d", (long)st.st_size, HOLE_END + 4096);
	off_t hole = lseek(b, SIZE, SEEK_HOLE);
	CHECK(hole >= SIZE && hole < HOLE_END, "the hole is gone (SEEK_HOLE gave %ld)", (long)hole);
	CHECK(lseek(b, 5000, SEEK_SET) == 5000, "lseek back: %s", strerror(errno));
	CHECK(pread(a, got, 4096, HOLE_END) == 4096 && memcmp(got, buf, 4096) == 0, "the data after the hole changed");
	CHECK(pread(a, got, SIZE, 0) == SIZE && memcmp(got, buf, SIZE) == 0, "the contents changed");
	CHECK(lseek(a, 0, SEEK_CUR) == 100 && lseek(b, 0, SEEK_CUR) == 5000, "offsets %ld and %ld, were 100 and 5000",
	      (long)lseek(a, 0, SEEK_CUR), (long)lseek(b, 0, SEEK_CUR));
	CHECK((fcntl(b, F_GETFL) & O_ACCMODE) == O_RDONLY && (fcntl(a, F_GETFL) & O_ACCMODE) == O_RDWR,
	      "access modes changed");
	CHECK(lseek(40, 300, SEEK_SET) == 300 && lseek(a, 0, SEEK_CUR) == 300, "fd 40 no longer shares fd %d's offset", a);
	CHECK(lseek(b, 0, SEEK_CUR) == 5000, "fd %d shares fd %d's offset: they were two opens", b, a);
	CHECK(pwrite(a, "Z", 1, 0) == 1 && pread(b, got, 1, 0) == 1 && got[0] == 'Z', "fds %d and %d are different files",
	      a, b);
	zdtm_pass();
}
