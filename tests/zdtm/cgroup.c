/* Cgroup membership: the target moves itself into the cgroup directory argv[1] (created by
 * the runner) and finds itself there again after a local restore. Before exiting it moves
 * back to the parent cgroup, so that the runner can remove the directory. */
#include "zdtm.h"
#include <fcntl.h>
#include <libgen.h>

static void join(const char *dir)
{
	char path[4096], pid[32];
	snprintf(path, sizeof path, "%s/cgroup.procs", dir);
	int fd = open(path, O_WRONLY);
	CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
	snprintf(pid, sizeof pid, "%d", getpid());
	CHECK(write(fd, pid, strlen(pid)) > 0, "write %s: %s", path, strerror(errno));
	close(fd);
}

/* Whether /proc/self/cgroup has a line ending in ":/NAME". */
static int inside(const char *name)
{
	char line[4096], want[512];
	FILE *f = fopen("/proc/self/cgroup", "r");
	int found = 0;
	CHECK(f, "open /proc/self/cgroup: %s", strerror(errno));
	snprintf(want, sizeof want, ":/%s\n", name);
	while (fgets(line, sizeof line, f))
		if (strlen(line) >= strlen(want) && strcmp(line + strlen(line) - strlen(want), want) == 0)
			found = 1;
	fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	CHECK(argc == 2, "usage: cgroup DIR");
	char dir[4096], parent[4096], base[512];
	snprintf(dir, sizeof dir, "%s", argv[1]);
	snprintf(parent, sizeof parent, "%s", argv[1]);
	snprintf(base, sizeof base, "%s", basename(dir));
	snprintf(dir, sizeof dir, "%s", argv[1]);
	join(dir);
	CHECK(inside(base), "not in cgroup %s after joining it", base);
	zdtm_ready();
	zdtm_wait_go();
	int ok = inside(base);
	join(dirname(parent));
	CHECK(ok, "no longer in cgroup %s after restore", base);
	zdtm_pass();
}
