/* Heap and brk: the program break is where it was, sbrk() grows from there, and malloc'd data
 * (small chunks on the brk heap and large ones in their own mmaps) is intact and usable. */
#include "zdtm.h"
#include <stdint.h>

#define NSMALL 2000

static unsigned char *small[NSMALL];
static size_t small_len[NSMALL];
static unsigned char *big;
#define BIGLEN (3 << 20)

static unsigned char bpat(size_t i, size_t k) { return (unsigned char)(i * 7 + k * 3 + 1); }

int main(void)
{
	void *brk_before, *brk_after, *grown;
	size_t i, k;
	char *mapsline = NULL;

	for (i = 0; i < NSMALL; i++) {
		small_len[i] = 16 + (i * 37) % 2000;
		small[i] = malloc(small_len[i]);
		CHECK(small[i], "malloc");
		for (k = 0; k < small_len[i]; k++)
			small[i][k] = bpat(i, k);
	}
	/* free every third: the free lists must survive too */
	for (i = 0; i < NSMALL; i += 3) {
		free(small[i]);
		small[i] = NULL;
	}
	big = malloc(BIGLEN);
	CHECK(big, "malloc big");
	for (k = 0; k < BIGLEN; k++)
		big[k] = bpat(99999, k);

	zdtm_ready();
	brk_before = sbrk(0);
	zdtm_wait_go();

	brk_after = sbrk(0);
	CHECK(brk_after == brk_before, "sbrk(0) is %p after restore, was %p", brk_after, brk_before);
	for (i = 0; i < NSMALL; i++)
		for (k = 0; small[i] && k < small_len[i]; k++)
			CHECK(small[i][k] == bpat(i, k), "malloc'd chunk %zu byte %zu changed", i, k);
	for (k = 0; k < BIGLEN; k++)
		CHECK(big[k] == bpat(99999, k), "big malloc'd block byte %zu changed", k);

	grown = sbrk(4096);
	CHECK(grown == brk_before, "sbrk(4096) returned %p, want the old break %p", grown, brk_before);
	CHECK(sbrk(0) == (char *)brk_before + 4096, "break did not move by 4096");
	memset(grown, 0xAB, 4096);
	CHECK(((unsigned char *)grown)[4095] == 0xAB, "grown brk memory not writable");
	CHECK(sbrk(-4096) != (void *)-1, "sbrk(-4096) failed");

	/* the allocator still works: reuse freed chunks, allocate new ones */
	for (i = 0; i < NSMALL; i += 3) {
		small[i] = malloc(small_len[i]);
		CHECK(small[i], "malloc after restore");
		memset(small[i], 0x42, small_len[i]);
	}
	for (i = 1; i < NSMALL; i += 3)
		free(small[i]);
	mapsline = malloc(1 << 20);
	CHECK(mapsline, "malloc 1 MiB after restore");
	memset(mapsline, 1, 1 << 20);
	free(mapsline);
	zdtm_pass();
}
