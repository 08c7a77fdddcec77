/* Holds a piece of state telefork refuses (argv[1]): "uts" — a UTS namespace of its own;
 * "alias" — one shared anonymous memory object mapped twice (mremap with old size 0);
 * "epoll" — an epoll entry whose fd was closed since (its file lives on under another fd). The
 * runner expects `telefork dump` to refuse it by name, and this process to carry on
 * untouched: after go it checks the state is still there and prints PASS. */
#define _GNU_SOURCE
#include "zdtm.h"
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <stdint.h>
#include <sys/utsname.h>

int main(int argc, char **argv)
{
	CHECK(argc == 2, "usage: refuse_state uts|alias|epoll");
	int ep = -1, moved = -1;
	char *a = NULL, *b = NULL;
	if (strcmp(argv[1], "uts") == 0) {
		CHECK(unshare(CLONE_NEWUTS) == 0, "unshare: %s", strerror(errno));
		CHECK(sethostname("zdtm-own-uts", 12) == 0, "sethostname: %s", strerror(errno));
	} else if (strcmp(argv[1], "epoll") == 0) {
		int e = eventfd(0, 0);
		ep = epoll_create1(0);
		struct epoll_event ev = { EPOLLIN, { .u64 = 5 } };
		CHECK(e >= 0 && ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, e, &ev) == 0, "epoll: %s", strerror(errno));
		moved = dup(e);
		close(e);
	} else {
		a = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		CHECK(a != MAP_FAILED, "mmap: %s", strerror(errno));
		b = mremap(a, 0, 8192, MREMAP_MAYMOVE);
		CHECK(b != MAP_FAILED, "mremap: %s", strerror(errno));
	}
	zdtm_ready();
	zdtm_wait_go();
	if (ep >= 0) {
		uint64_t one = 1;
		struct epoll_event ev;
		CHECK(write(moved, &one, 8) == 8, "write: %s", strerror(errno));
		CHECK(epoll_wait(ep, &ev, 1, 1000) == 1 && ev.data.u64 == 5, "the epoll entry is gone");
	} else if (a) {
		a[100] = 'x';
		CHECK(b[100] == 'x', "the two mappings no longer alias");
	} else {
		struct utsname u;
		uname(&u);
		CHECK(strcmp(u.nodename, "zdtm-own-uts") == 0, "hostname %s", u.nodename);
	}
	zdtm_pass();
}
