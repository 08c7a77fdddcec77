/* Anonymous memory: private patterned pages, a PROT_NONE guard page that must still fault, a
 * read-only page that must still refuse writes, and a MAP_SHARED region that keeps both its
 * contents and its sharing (a fork child's write is seen by the parent). */
#include "zdtm.h"
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096
#define NPRIV 64

static sigjmp_buf jb;
static volatile sig_atomic_t faults;
static volatile void *fault_addr;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	faults++;
	fault_addr = si->si_addr;
	siglongjmp(jb, 1);
}

static uint64_t pat(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ 0xA5A5A5A5ull; }

/* 1 if touching p (read, or write when w) faults with SIGSEGV at p. */
static int faults_on(volatile char *p, int w)
{
	int before = faults;
	if (sigsetjmp(jb, 1) == 0) {
		if (w)
			*p = 1;
		else
			(void)*p;
		return 0;
	}
	return faults == before + 1 && fault_addr == (void *)p;
}

static char *find_maps_line(void *addr, char *out, size_t outlen)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	while (f && fgets(line, sizeof line, f)) {
		unsigned long s, e;
		if (sscanf(line, "%lx-%lx", &s, &e) == 2 && (unsigned long)addr >= s && (unsigned long)addr < e) {
			snprintf(out, outlen, "%s", line);
			fclose(f);
			return out;
		}
	}
	if (f)
		fclose(f);
	return NULL;
}

int main(void)
{
	struct sigaction sa = { 0 };
	char line[512];
	uint64_t *priv, *shared;
	char *guard_area, *ro;
	size_t i;

	sa.sa_sigaction = on_segv;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);

	priv = mmap(NULL, NPRIV * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* three pages: rw | PROT_NONE guard | rw */
	guard_area = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ro = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shared = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(priv != MAP_FAILED && guard_area != MAP_FAILED && ro != MAP_FAILED && shared != MAP_FAILED,
	      "mmap: %s", strerror(errno));

	for (i = 0; i < NPRIV * PG / 8; i++)
		priv[i] = pat(i);
	/* leave a hole: page 10 never touched, must read back as zeros */
	memset((char *)priv + 10 * PG, 0, PG);
	madvise((char *)priv + 10 * PG, PG, MADV_DONTNEED);
	memset(guard_area, 0x11, PG);
	memset(guard_area + 2 * PG, 0x33, PG);
	CHECK(mprotect(guard_area + PG, PG, PROT_NONE) == 0, "mprotect none: %s", strerror(errno));
	memset(ro, 0x5A, PG);
	CHECK(mprotect(ro, PG, PROT_READ) == 0, "mprotect ro: %s", strerror(errno));
	for (i = 0; i < 4 * PG / 8; i++)
		shared[i] = pat(i + 1000000);

	/* the guards work before capture (sanity of the test itself) */
	CHECK(faults_on(guard_area + PG + 8, 0), "guard page did not fault before capture");
	CHECK(faults_on(ro + 8, 1), "read-only page accepted a write before capture");

	zdtm_ready();
	zdtm_wait_go();

	for (i = 0; i < NPRIV * PG / 8; i++) {
		uint64_t want = (i >= 10 * PG / 8 && i < 11 * PG / 8) ? 0 : pat(i);
		CHECK(priv[i] == want, "private anon word %zu: %#lx, want %#lx", i, (unsigned long)priv[i],
		      (unsigned long)want);
	}
	for (i = 0; i < PG; i++) {
		CHECK(guard_area[i] == 0x11, "page before the guard changed at %zu", i);
		CHECK(guard_area[2 * PG + i] == 0x33, "page after the guard changed at %zu", i);
		CHECK(ro[i] == 0x5A, "read-only page changed at %zu", i);
	}
	CHECK(faults_on(guard_area + PG + 8, 0), "PROT_NONE guard page readable after restore");
	CHECK(faults_on(guard_area + PG + 16, 1), "PROT_NONE guard page writable after restore");
	CHECK(faults_on(ro + 8, 1), "read-only page writable after restore");
	CHECK(ro[8] == 0x5A, "read-only page modified by the refused write");

	for (i = 0; i < 4 * PG / 8; i++)
		CHECK(shared[i] == pat(i + 1000000), "shared anon word %zu lost", i);
	CHECK(find_maps_line(shared, line, sizeof line), "shared mapping missing from maps");
	CHECK(strstr(line, "rw-s"), "shared anon mapping is not MAP_SHARED after restore: %s", line);
	CHECK(find_maps_line(priv, line, sizeof line) && strstr(line, "rw-p"), "private anon mapping: %s", line);
	CHECK(find_maps_line(guard_area + PG, line, sizeof line) && strstr(line, "---p"), "guard mapping: %s", line);
	CHECK(find_maps_line(ro, line, sizeof line) && strstr(line, "r--p"), "read-only mapping: %s", line);

	{
		pid_t c = fork();
		int st;
		CHECK(c >= 0, "fork: %s", strerror(errno));
		if (c == 0) {
			shared[5] = 0xC0FFEE;
			priv[5] = 0xBAD;
			_exit(0);
		}
		CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork child failed");
		CHECK(shared[5] == 0xC0FFEE, "child's write to the shared mapping not seen (not shared after restore)");
		CHECK(priv[5] == pat(5), "child's write to the private mapping leaked to the parent");
	}
	zdtm_pass();
}
