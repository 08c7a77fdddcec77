/* Sparse memory: 64 GiB reserved with MAP_NORESERVE, 10 MiB touched in scattered pages. Only
 * touched pages may go into the image (the runner checks its size is < 20 MiB). */
#include "zdtm.h"
#include <stdint.h>
#include <sys/mman.h>

#define PG 4096ul
#define SPAN (64ul << 30)
#define TOUCHED ((10ul << 20) / PG)

static uint64_t page_of(uint64_t k) { return (k * 2654435761ul) % (SPAN / PG); }
static uint64_t word(uint64_t pg, uint64_t w) { return (pg << 20) ^ (w * 0x9E3779B97F4A7C15ull) ^ 0x5151; }

int main(void)
{
	uint64_t *base = mmap(NULL, SPAN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	static unsigned char touched_map[SPAN / PG / 8];
	uint64_t k, w, n = 0;

	CHECK(base != MAP_FAILED, "mmap 64 GiB: %s", strerror(errno));
	for (k = 0; k < TOUCHED; k++) {
		uint64_t pg = page_of(k);
		uint64_t *p = base + pg * (PG / 8);
		if (touched_map[pg / 8] & (1 << pg % 8))
			continue;
		touched_map[pg / 8] |= 1 << pg % 8;
		n++;
		for (w = 0; w < PG / 8; w++)
			p[w] = word(pg, w);
	}
	CHECK(n > TOUCHED * 9 / 10, "only %lu distinct pages", (unsigned long)n);
	zdtm_ready();
	zdtm_wait_go();

	for (k = 0; k < TOUCHED; k++) {
		uint64_t pg = page_of(k);
		uint64_t *p = base + pg * (PG / 8);
		for (w = 0; w < PG / 8; w++)
			CHECK(p[w] == word(pg, w), "page %#lx word %lu: %#lx, want %#lx", (unsigned long)pg, (unsigned long)w,
			      (unsigned long)p[w], (unsigned long)word(pg, w));
	}
	/* a sample of untouched pages reads as zero */
	for (k = 0; k < SPAN / PG; k += 7919) {
		if (touched_map[k / 8] & (1 << k % 8))
			continue;
		CHECK(base[k * (PG / 8)] == 0 && base[k * (PG / 8) + 511] == 0, "untouched page %#lx is not zero",
		      (unsigned long)k);
	}
	zdtm_pass();
}
