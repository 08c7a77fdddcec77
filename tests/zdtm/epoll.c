/* epoll: an interest list (an edge-triggered eventfd with its data, a level-triggered pipe,
 * a one-shot entry that already fired and stays disarmed) and an epoll watching that epoll
 * are the same after restore, seen by what epoll_wait reports. */
#include "zdtm.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

static int wait_data(int ep, uint64_t *data)
{
	struct epoll_event ev[4];
	int n = epoll_wait(ep, ev, 4, 0);
	CHECK(n >= 0, "epoll_wait: %s", strerror(errno));
	if (n > 0)
		*data = ev[0].data.u64;
	return n;
}

int main(void)
{
	int e1 = eventfd(0, EFD_NONBLOCK), e2 = eventfd(0, EFD_NONBLOCK), p[2];
	CHECK(e1 >= 0 && e2 >= 0 && pipe(p) == 0, "eventfd/pipe: %s", strerror(errno));
	int ep = epoll_create1(0), ep2 = epoll_create1(0);
	struct epoll_event a = { EPOLLIN | EPOLLET, { .u64 = 0x1234 } };
	struct epoll_event b = { EPOLLIN, { .u64 = 42 } };
	struct epoll_event c = { EPOLLIN | EPOLLONESHOT, { .u64 = 99 } };
	struct epoll_event d = { EPOLLIN, { .u64 = 7 } };
	CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, e1, &a) == 0 && epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &b) == 0 &&
	      epoll_ctl(ep, EPOLL_CTL_ADD, e2, &c) == 0 && epoll_ctl(ep2, EPOLL_CTL_ADD, ep, &d) == 0,
	      "epoll_ctl: %s", strerror(errno));
	uint64_t one = 1, data = 0;
	/* The one-shot entry fires once, and is then disarmed. */
	CHECK(write(e2, &one, 8) == 8 && wait_data(ep, &data) == 1 && data == 99, "one-shot setup");
	CHECK(read(e2, &one, 8) == 8, "read e2");
	zdtm_ready();
	zdtm_wait_go();

	CHECK(wait_data(ep, &data) == 0, "events before anything happened (data %#llx)", (unsigned long long)data);
	one = 1;
	CHECK(write(e2, &one, 8) == 8, "write e2");
	CHECK(wait_data(ep, &data) == 0, "the fired one-shot entry was armed again (data %#llx)",
	      (unsigned long long)data);
	CHECK(write(e1, &one, 8) == 8, "write e1");
	CHECK(wait_data(ep2, &data) == 1 && data == 7, "the outer epoll did not see the inner one ready");
	CHECK(wait_data(ep, &data) == 1 && data == 0x1234, "the eventfd's entry: data %#llx", (unsigned long long)data);
	CHECK(wait_data(ep, &data) == 0, "the eventfd's entry is no longer edge-triggered");
	CHECK(read(e1, &one, 8) == 8, "read e1");
	CHECK(write(p[1], "z", 1) == 1, "write pipe");
	CHECK(wait_data(ep, &data) == 1 && data == 42, "the pipe's entry: data %#llx", (unsigned long long)data);
	CHECK(wait_data(ep, &data) == 1 && data == 42, "the pipe's entry is no longer level-triggered");
	zdtm_pass();
}
