/* The demo's process: prints a counter every 100 ms, forever. Its state is memory, registers
 * and its stdio, so after `telefork restore` it goes on from where it was. It first closes any
 * fd beyond stdio that the shell let it inherit (telefork refuses fds it cannot capture). */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	struct timespec tenth = { 0, 100 * 1000 * 1000 };
	unsigned long n = 0;
	syscall(SYS_close_range, 3u, ~0u, 0u);
	for (;;) {
		printf("tick %lu\n", ++n);
		fflush(stdout);
		nanosleep(&tenth, NULL);
	}
}
