/* File descriptors: a regular file O_RDWR at offset 1234, an O_APPEND file, an O_RDONLY
 * directory fd, two fds sharing one open file (dup: lseek on one moves the other), a high fd
 * number (700), FD_CLOEXEC kept on one fd and absent on another, and stdout a pipe. */
#include "zdtm.h"
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>

#define NFD 8
static const int fdnums[NFD] = { 3, 4, 5, 6, 7, 700, 8, 9 };
static struct stat st_before[NFD];
static char fdset_before[8192], fdset_now[8192];

/* "0 1 2 3 ..." : the open fds but the one reading the directory, in directory order sorted */
static void list_fds(char *out)
{
	static char seen[1024];
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int self = dirfd(d), n;
	size_t o = 0;
	memset(seen, 0, sizeof seen);
	while ((e = readdir(d))) {
		n = atoi(e->d_name);
		if (e->d_name[0] != '.' && n != self && n < 1024)
			seen[n] = 1;
	}
	closedir(d);
	out[0] = 0;
	for (n = 0; n < 1024; n++)
		if (seen[n])
			o += snprintf(out + o, 8192 - o, "%d ", n);
}

static void mkfile(const char *path, int n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	char buf[4096];
	int i;
	for (i = 0; i < (int)sizeof buf; i++)
		buf[i] = (char)('a' + (i + n) % 26);
	CHECK(fd >= 0 && write(fd, buf, sizeof buf) == sizeof buf, "create %s", path);
	close(fd);
}

int main(void)
{
	char rw[PATH_MAX], ap[PATH_MAX], dir[PATH_MAX], hi[PATH_MAX], inside[PATH_MAX + 16], c = 0;
	int fd_rw, fd_ap, fd_dir, fd_dup, fd_hi, fd_cloexec, fd_nocloexec, i, flags;
	struct stat st;

	zdtm_path(rw, sizeof rw, "rw.txt");
	zdtm_path(ap, sizeof ap, "append.txt");
	zdtm_path(dir, sizeof dir, "dir");
	zdtm_path(hi, sizeof hi, "high.txt");
	mkfile(rw, 0);
	mkfile(ap, 1);
	mkfile(hi, 2);
	CHECK(mkdir(dir, 0755) == 0 || errno == EEXIST, "mkdir");
	snprintf(inside, sizeof inside, "%s/inside.txt", dir);
	mkfile(inside, 3);

	fd_rw = open(rw, O_RDWR);                        /* 3 */
	fd_ap = open(ap, O_WRONLY | O_APPEND);           /* 4 */
	fd_dir = open(dir, O_RDONLY | O_DIRECTORY);      /* 5 */
	fd_dup = dup(fd_rw);                             /* 6 */
	fd_cloexec = open(hi, O_RDONLY | O_CLOEXEC);     /* 7 */
	fd_hi = dup2(open(hi, O_RDONLY), 700);           /* 700 (via 8, closed below) */
	close(8);
	fd_nocloexec = open(rw, O_RDONLY);               /* 8 */
	i = open(ap, O_RDONLY | O_NONBLOCK | O_CLOEXEC); /* 9 */
	CHECK(fd_rw == 3 && fd_ap == 4 && fd_dir == 5 && fd_dup == 6 && fd_cloexec == 7 && fd_hi == 700 &&
	      fd_nocloexec == 8 && i == 9, "unexpected fd numbers %d %d %d %d %d %d %d %d", fd_rw, fd_ap, fd_dir,
	      fd_dup, fd_cloexec, fd_hi, fd_nocloexec, i);
	CHECK(lseek(fd_rw, 1234, SEEK_SET) == 1234, "lseek");
	CHECK(lseek(fd_hi, 77, SEEK_SET) == 77, "lseek 700");
	for (i = 0; i < NFD; i++)
		CHECK(fstat(fdnums[i], &st_before[i]) == 0, "fstat %d", fdnums[i]);

	list_fds(fdset_before);
	zdtm_ready();
	zdtm_wait_go();

	for (i = 0; i < NFD; i++) {
		CHECK(fstat(fdnums[i], &st) == 0, "fd %d is not open after restore: %s", fdnums[i], strerror(errno));
		CHECK(st.st_dev == st_before[i].st_dev && st.st_ino == st_before[i].st_ino,
		      "fd %d names another file after restore (ino %lu, was %lu)", fdnums[i], (unsigned long)st.st_ino,
		      (unsigned long)st_before[i].st_ino);
	}
	/* the same set of fds as before capture, nothing more */
	list_fds(fdset_now);
	CHECK(strcmp(fdset_now, fdset_before) == 0, "open fds after restore: %s; before capture: %s", fdset_now,
	      fdset_before);
	/* O_RDWR file at 1234 */
	flags = fcntl(fd_rw, F_GETFL);
	CHECK((flags & O_ACCMODE) == O_RDWR, "fd 3 access mode %#x, want O_RDWR", flags & O_ACCMODE);
	CHECK(lseek(fd_rw, 0, SEEK_CUR) == 1234, "fd 3 offset %ld, want 1234", (long)lseek(fd_rw, 0, SEEK_CUR));
	CHECK(read(fd_rw, &c, 1) == 1 && c == 'a' + 1234 % 26, "read at 1234 gave '%c'", c);
	CHECK(write(fd_rw, "Z", 1) == 1, "write to O_RDWR fd: %s", strerror(errno));
	/* dup'd pair shares the offset */
	CHECK(lseek(fd_dup, 0, SEEK_CUR) == 1236, "dup'd fd 6 offset %ld, want 1236 (shared with fd 3)",
	      (long)lseek(fd_dup, 0, SEEK_CUR));
	CHECK(lseek(fd_rw, 100, SEEK_SET) == 100, "lseek fd 3");
	CHECK(lseek(fd_dup, 0, SEEK_CUR) == 100, "lseek on fd 3 did not move fd 6: they no longer share an open file");
	/* O_APPEND */
	flags = fcntl(fd_ap, F_GETFL);
	CHECK(flags & O_APPEND, "fd 4 lost O_APPEND (flags %#x)", flags);
	CHECK((flags & O_ACCMODE) == O_WRONLY, "fd 4 access mode %#x, want O_WRONLY", flags & O_ACCMODE);
	lseek(fd_ap, 0, SEEK_SET);
	CHECK(write(fd_ap, "END", 3) == 3, "append write: %s", strerror(errno));
	CHECK(stat(ap, &st) == 0 && st.st_size == 4099, "append file size %ld, want 4099", (long)st.st_size);
	/* directory fd */
	CHECK(S_ISDIR(st_before[2].st_mode), "fd 5 not a directory before");
	flags = fcntl(fd_dir, F_GETFL);
	CHECK((flags & O_ACCMODE) == O_RDONLY && (flags & O_DIRECTORY), "fd 5 flags %#x, want O_RDONLY|O_DIRECTORY",
	      flags);
	i = openat(fd_dir, "inside.txt", O_RDONLY);
	CHECK(i >= 0, "openat through the directory fd: %s", strerror(errno));
	close(i);
	/* high fd keeps its own offset */
	CHECK(lseek(fd_hi, 0, SEEK_CUR) == 77, "fd 700 offset %ld, want 77", (long)lseek(fd_hi, 0, SEEK_CUR));
	/* close-on-exec */
	CHECK(fcntl(fd_cloexec, F_GETFD) == FD_CLOEXEC, "fd 7 lost FD_CLOEXEC");
	CHECK(fcntl(9, F_GETFD) == FD_CLOEXEC, "fd 9 lost FD_CLOEXEC");
	CHECK(fcntl(fd_nocloexec, F_GETFD) == 0, "fd 8 gained FD_CLOEXEC");
	CHECK(fcntl(fd_rw, F_GETFD) == 0 && fcntl(700, F_GETFD) == 0, "fd 3 or 700 gained FD_CLOEXEC");
	CHECK(fcntl(9, F_GETFL) & O_NONBLOCK, "fd 9 lost O_NONBLOCK");
	/* stdout is a pipe */
	CHECK(fstat(1, &st) == 0 && S_ISFIFO(st.st_mode), "stdout is not a pipe after restore");
	zdtm_pass();
}
