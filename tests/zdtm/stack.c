/* Stack: data on the stack is intact, and the main stack still grows down after restore
 * (recursion touching ~4 MiB below where the stack was at capture). */
#include "zdtm.h"
#include <stdint.h>

static unsigned long rec(int depth, unsigned long acc)
{
	volatile unsigned char frame[1024];
	unsigned long r;
	size_t i;
	for (i = 0; i < sizeof frame; i += 64)
		frame[i] = (unsigned char)(depth + i);
	if (depth == 0)
		return acc;
	r = rec(depth - 1, acc + frame[depth % 16 * 64]);
	/* work after the call: no tail call, the frame stays live */
	return r + frame[(depth + 1) % 16 * 64] - (unsigned char)(depth + (depth + 1) % 16 * 64);
}

static unsigned long rec_expected(int depth)
{
	unsigned long acc = 0;
	int d;
	for (d = depth; d > 0; d--)
		acc += (unsigned char)(d + d % 16 * 64);
	return acc;
}

int main(void)
{
	volatile uint64_t onstack[512];
	char line[512];
	unsigned long sp = (unsigned long)&line, s, e;
	int found = 0;
	FILE *f;
	size_t i;

	for (i = 0; i < 512; i++)
		onstack[i] = i * 0x0101010101010101ull;
	zdtm_ready();
	zdtm_wait_go();

	for (i = 0; i < 512; i++)
		CHECK(onstack[i] == i * 0x0101010101010101ull, "stack word %zu changed", i);
	f = fopen("/proc/self/maps", "r");
	while (f && fgets(line, sizeof line, f))
		if (sscanf(line, "%lx-%lx", &s, &e) == 2 && sp >= s && sp < e) {
			CHECK(strstr(line, "[stack]"), "sp %#lx is not in [stack]: %s", sp, line);
			found = 1;
		}
	if (f)
		fclose(f);
	CHECK(found, "sp %#lx in no mapping", sp);
	/* 4096 frames of > 1 KiB each: > 4 MiB of fresh stack below the captured one */
	CHECK(rec(4096, 0) == rec_expected(4096), "deep recursion computed a wrong value");
	zdtm_pass();
}
