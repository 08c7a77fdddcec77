/* An fd opened before the process gave up root (setuid): a root-only file, still open, that
 * its new owner (nobody) could not open. The runner expects `telefork restore` to refuse it,
 * naming the fd and the reason, rather than reopen it with the restorer's privilege. */
#include "zdtm.h"
#include <fcntl.h>

int main(void)
{
	char path[4096];
	zdtm_init();
	zdtm_path(path, sizeof path, "root-only");
	int fd = open(path, O_CREAT | O_RDWR, 0600);
	CHECK(fd >= 0 && dup2(fd, 5) == 5, "open %s: %s", path, strerror(errno));
	if (fd != 5)
		close(fd);
	CHECK(setresgid(65534, 65534, 65534) == 0 && setresuid(65534, 65534, 65534) == 0, "dropping root: %s",
	      strerror(errno));
	CHECK(open(path, O_RDWR) < 0, "nobody can open %s", path);
	zdtm_ready();
	zdtm_wait_go();
	FAIL("restored with fd 5 reopened for a user who may not open it");
}
