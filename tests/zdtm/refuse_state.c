/* Holds a piece of state telefork refuses (argv[1]): "uts" — a UTS namespace of its own;
 * "alias" — one shared anonymous memory object mapped twice (mremap with old size 0). The
 * runner expects `telefork dump` to refuse it by name, and this process to carry on
 * untouched: after go it checks the state is still there and prints PASS. */
#define _GNU_SOURCE
#include "zdtm.h"
#include <sched.h>
#include <sys/mman.h>
#include <sys/utsname.h>

int main(int argc, char **argv)
{
	CHECK(argc == 2, "usage: refuse_state uts|alias");
	char *a = NULL, *b = NULL;
	if (strcmp(argv[1], "uts") == 0) {
		CHECK(unshare(CLONE_NEWUTS) == 0, "unshare: %s", strerror(errno));
		CHECK(sethostname("zdtm-own-uts", 12) == 0, "sethostname: %s", strerror(errno));
	} else {
		a = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		CHECK(a != MAP_FAILED, "mmap: %s", strerror(errno));
		b = mremap(a, 0, 8192, MREMAP_MAYMOVE);
		CHECK(b != MAP_FAILED, "mremap: %s", strerror(errno));
	}
	zdtm_ready();
	zdtm_wait_go();
	if (a) {
		a[100] = 'x';
		CHECK(b[100] == 'x', "the two mappings no longer alias");
	} else {
		struct utsname u;
		uname(&u);
		CHECK(strcmp(u.nodename, "zdtm-own-uts") == 0, "hostname %s", u.nodename);
	}
	zdtm_pass();
}
