/* A small process with a little of everything ordinary: used by the runner's tests of image
 * damage, --detach and --leave-running. Checks a heap and a stack pattern after go. */
#include "zdtm.h"
#include <stdint.h>

int main(void)
{
	size_t n = 256 * 1024, i;
	uint32_t *heap = malloc(n * 4), local[256];
	static uint32_t data[4096];
	for (i = 0; i < n; i++)
		heap[i] = (uint32_t)(i * 2654435761u);
	for (i = 0; i < 256; i++)
		local[i] = (uint32_t)i * 3;
	for (i = 0; i < 4096; i++)
		data[i] = (uint32_t)~i;
	zdtm_ready();
	zdtm_wait_go();
	for (i = 0; i < n; i++)
		CHECK(heap[i] == (uint32_t)(i * 2654435761u), "heap word %zu", i);
	for (i = 0; i < 256; i++)
		CHECK(local[i] == i * 3, "stack word %zu", i);
	for (i = 0; i < 4096; i++)
		CHECK(data[i] == (uint32_t)~i, "data word %zu", i);
	zdtm_pass();
}
