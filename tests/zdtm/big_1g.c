/* 1 GiB of written anonymous memory, a pattern depending on the offset; every word of every
 * page is verified after restore, and the memory must still be one mapping (a restorer that
 * placed parts of it differently — huge pages, userfaultfd — must leave no seams). Prints the
 * mapping's AnonHugePages (kB) for the harness. */
#include "zdtm.h"
#include <stdint.h>
#include <sys/mman.h>

#define SIZE (1ul << 30)

static uint64_t pat(uint64_t off) { return (off * 0x9E3779B97F4A7C15ull) ^ (off >> 12) ^ 0xD1CEull; }

int main(void)
{
	uint64_t *m = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t i;
	CHECK(m != MAP_FAILED, "mmap 1 GiB: %s", strerror(errno));
	for (i = 0; i < SIZE / 8; i++)
		m[i] = pat(i * 8);
	zdtm_ready();
	zdtm_wait_go();
	for (i = 0; i < SIZE / 8; i++)
		if (m[i] != pat(i * 8))
			FAIL("word at offset %#lx: %#lx, want %#lx", (unsigned long)(i * 8), (unsigned long)m[i],
			     (unsigned long)pat(i * 8));
	{
		FILE *f = fopen("/proc/self/smaps", "r");
		char line[512];
		unsigned long lo, hi, start = (unsigned long)m, end = start + SIZE;
		int mappings = 0, inside = 0;
		long huge_kb = -1;
		CHECK(f != NULL, "opening /proc/self/smaps: %s", strerror(errno));
		while (fgets(line, sizeof line, f)) {
			if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
				inside = lo < end && hi > start;
				mappings += inside;
				if (inside)
					CHECK(lo <= start && hi >= end, "the memory is split: a mapping %lx-%lx inside %lx-%lx", lo, hi, start, end);
			} else if (inside && sscanf(line, "AnonHugePages: %ld kB", &huge_kb) == 1) {
			}
		}
		fclose(f);
		CHECK(mappings == 1, "the memory is %d mappings, not one", mappings);
		printf("ANON_HUGE_KB %ld\n", huge_kb);
	}
	zdtm_pass();
}
