/* How fast this machine places fresh anonymous memory, three ways — the experiment behind
 * huge pages in docs/performance.md, "Where the memory goes" (measured by hand, not built by
 * the tests):
 *
 *   4k        MADV_POPULATE_WRITE: 4 KiB pages, each faulted, zeroed and charged
 *   advised   MADV_HUGEPAGE, then MADV_POPULATE_WRITE: huge pages (but the mapping now
 *             carries the advice, visible in smaps and inherited — not for a restorer)
 *   collapse  one byte written per 2 MiB block, then MADV_COLLAPSE: huge pages without advice
 *             (what telefork's restorer does, from outside, with process_madvise)
 *
 * then copies 1 MiB buffers into the placed memory, as a restorer writing pages would.
 *
 *   gcc -O2 -o /tmp/hugepages scripts/hugepages.c
 *   /tmp/hugepages MIB 4k|advised|collapse
 *
 * A VM whose host takes freed memory back (free page reporting) makes the first run after a
 * pause "cold" (the host faults every page in again): run each way several times, in turns.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define HUGE (2ul << 20)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* AnonHugePages of this process, in MiB. */
static long anon_huge_mib(void)
{
	FILE *f = fopen("/proc/self/smaps_rollup", "r");
	char line[256];
	long kb = 0;
	while (f && fgets(line, sizeof line, f))
		if (!strncmp(line, "AnonHugePages:", 14))
			kb = atol(line + 14);
	if (f)
		fclose(f);
	return kb >> 10;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s MIB 4k|advised|collapse\n", argv[0]);
		return 2;
	}
	size_t len = (size_t)atol(argv[1]) << 20, off;
	const char *way = argv[2];
	char *raw = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	char *p = (char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
	double t0 = now();
	if (!strcmp(way, "4k")) {
		if (madvise(p, len, MADV_POPULATE_WRITE))
			perror("MADV_POPULATE_WRITE");
	} else if (!strcmp(way, "advised")) {
		if (madvise(p, len, MADV_HUGEPAGE) || madvise(p, len, MADV_POPULATE_WRITE))
			perror("MADV_HUGEPAGE + MADV_POPULATE_WRITE");
	} else if (!strcmp(way, "collapse")) {
		for (off = 0; off < len; off += HUGE)
			p[off] = 0;
		if (madvise(p, len, MADV_COLLAPSE))
			perror("MADV_COLLAPSE");
	} else {
		fprintf(stderr, "unknown way %s\n", way);
		return 2;
	}
	double t1 = now();
	char *src = malloc(1 << 20);
	memset(src, 7, 1 << 20);
	for (off = 0; off + (1 << 20) <= len; off += 1 << 20)
		memcpy(p + off, src, 1 << 20);
	double t2 = now();
	printf("%s %zu MiB: placed at %.2f GB/s, then written at %.2f GB/s (together %.2f GB/s); %ld MiB in huge pages\n", way,
	       len >> 20, len / (t1 - t0) / 1e9, len / (t2 - t1) / 1e9, len / (t2 - t0) / 1e9, anon_huge_mib());
	return 0;
}
