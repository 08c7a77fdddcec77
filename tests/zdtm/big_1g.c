/* 1 GiB of written anonymous memory, a pattern depending on the offset; every word of every
 * page is verified after restore. */
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
	zdtm_pass();
}
