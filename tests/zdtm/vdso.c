/* vDSO: clock_gettime and gettimeofday work after restore, CLOCK_MONOTONIC does not go back,
 * and AT_SYSINFO_EHDR still points into the mapping named [vdso]. */
#include "zdtm.h"
#include <sys/auxv.h>
#include <sys/time.h>
#include <time.h>

static int in_vdso(unsigned long addr)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	unsigned long s, e;
	int r = 0;
	while (f && fgets(line, sizeof line, f))
		if (sscanf(line, "%lx-%lx", &s, &e) == 2 && addr >= s && addr < e)
			r = strstr(line, "[vdso]") != NULL;
	if (f)
		fclose(f);
	return r;
}

static double ts(struct timespec t) { return t.tv_sec + t.tv_nsec / 1e9; }

int main(void)
{
	struct timespec m0, m1, m2, r0, r1, b1;
	struct timeval tv0, tv1;
	unsigned long ehdr = getauxval(AT_SYSINFO_EHDR);
	int i;

	CHECK(ehdr && in_vdso(ehdr), "AT_SYSINFO_EHDR %#lx not in [vdso] before capture", ehdr);
	CHECK(clock_gettime(CLOCK_MONOTONIC, &m0) == 0, "clock_gettime before");
	clock_gettime(CLOCK_REALTIME, &r0);
	gettimeofday(&tv0, NULL);
	zdtm_ready();
	zdtm_wait_go();

	CHECK(clock_gettime(CLOCK_MONOTONIC, &m1) == 0, "clock_gettime(CLOCK_MONOTONIC) failed after restore: %s",
	      strerror(errno));
	CHECK(ts(m1) >= ts(m0), "CLOCK_MONOTONIC went back: %.9f before capture, %.9f after", ts(m0), ts(m1));
	CHECK(clock_gettime(CLOCK_REALTIME, &r1) == 0 && ts(r1) >= ts(r0) - 1, "CLOCK_REALTIME after restore");
	CHECK(clock_gettime(CLOCK_BOOTTIME, &b1) == 0, "CLOCK_BOOTTIME after restore");
	CHECK(gettimeofday(&tv1, NULL) == 0, "gettimeofday after restore");
	CHECK(tv1.tv_sec + 1 >= tv0.tv_sec, "gettimeofday went back: %ld -> %ld", (long)tv0.tv_sec, (long)tv1.tv_sec);
	CHECK(labs(tv1.tv_sec - r1.tv_sec) <= 1, "gettimeofday (%ld) and CLOCK_REALTIME (%ld) disagree",
	      (long)tv1.tv_sec, (long)r1.tv_sec);
	/* time advances */
	usleep(20000);
	clock_gettime(CLOCK_MONOTONIC, &m2);
	CHECK(ts(m2) - ts(m1) >= 0.019 && ts(m2) - ts(m1) < 10, "CLOCK_MONOTONIC does not advance sanely: %.9f -> %.9f",
	      ts(m1), ts(m2));
	for (i = 0; i < 100000; i++) {
		clock_gettime(CLOCK_MONOTONIC, &m1);
		CHECK(ts(m1) >= ts(m2), "CLOCK_MONOTONIC went back in a loop");
		m2 = m1;
	}
	CHECK(getauxval(AT_SYSINFO_EHDR) == ehdr, "AT_SYSINFO_EHDR changed: %#lx -> %#lx", ehdr,
	      getauxval(AT_SYSINFO_EHDR));
	CHECK(in_vdso(ehdr), "AT_SYSINFO_EHDR %#lx is not inside [vdso] after restore", ehdr);
	zdtm_pass();
}
