/* File locks: a flock write lock, a POSIX record lock and an OFD read lock held on files
 * reopened by restore are held again by the restored process: a child made after restore
 * finds each of them in its way. */
#include "zdtm.h"
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>

static int open_tmp(const char *name)
{
	char path[4096];
	zdtm_path(path, sizeof path, name);
	int fd = open(path, O_RDWR | O_CREAT, 0600);
	CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
	CHECK(ftruncate(fd, 100) == 0, "ftruncate: %s", strerror(errno));
	return fd;
}

/* In a child: 0 if every lock is seen held, else which one is not. */
static int check_from_child(void)
{
	char path[4096];
	zdtm_path(path, sizeof path, "flocked");
	int a = open(path, O_RDWR);
	if (a < 0 || flock(a, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		return 1;
	zdtm_path(path, sizeof path, "posix-locked");
	int b = open(path, O_RDWR);
	struct flock want = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 15, .l_len = 1 };
	if (b < 0 || fcntl(b, F_GETLK, &want) != 0 || want.l_type != F_WRLCK || want.l_pid != getppid() ||
	    want.l_start != 10 || want.l_len != 10)
		return 2;
	zdtm_path(path, sizeof path, "ofd-locked");
	int c = open(path, O_RDWR);
	struct flock w = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	if (c < 0 || fcntl(c, F_OFD_SETLK, &w) == 0 || errno != EAGAIN)
		return 3;
	struct flock r = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	if (fcntl(c, F_OFD_SETLK, &r) != 0) /* a read lock is shared */
		return 4;
	return 0;
}

int main(void)
{
	zdtm_init();
	int a = open_tmp("flocked"), b = open_tmp("posix-locked"), c = open_tmp("ofd-locked");
	CHECK(flock(a, LOCK_EX) == 0, "flock: %s", strerror(errno));
	struct flock pl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 10 };
	CHECK(fcntl(b, F_SETLK, &pl) == 0, "F_SETLK: %s", strerror(errno));
	struct flock ol = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	CHECK(fcntl(c, F_OFD_SETLK, &ol) == 0, "F_OFD_SETLK: %s", strerror(errno));
	zdtm_ready();
	zdtm_wait_go();

	pid_t child = fork();
	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0)
		_exit(check_from_child());
	int st;
	CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st), "the checking child died");
	const char *lost[] = { "", "the flock write lock", "the POSIX record lock (bytes 10-19, this pid)",
			       "the OFD read lock (a write lock got through)", "the OFD read lock (not shared?)" };
	CHECK(WEXITSTATUS(st) == 0, "lost after restore: %s", lost[WEXITSTATUS(st) < 5 ? WEXITSTATUS(st) : 0]);
	zdtm_pass();
}
