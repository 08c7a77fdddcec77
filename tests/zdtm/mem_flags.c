/* Memory flags: mlock and mlock2(MLOCK_ONFAULT), MADV_SEQUENTIAL, MADV_RANDOM,
 * MADV_MERGEABLE, MAP_DROPPABLE, mseal, guard regions (MADV_GUARD_INSTALL) and a name given
 * with PR_SET_VMA_ANON_NAME are the same after restore, seen in /proc/self/smaps and in behaviour, with the memory's contents. A
 * flag this kernel does not offer is left out at setup, and said so. */
#include "zdtm.h"
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif
#define MADV_GUARD_INSTALL_ 102
#define SYS_mseal_ 462
#define PAGE 4096
#define LEN (4 * PAGE)

enum { LOCKED, ONFAULT, SEQ, RAND, MERGE, DROP, SEALED, GUARDED, NAMED, N };
static const char *names[N] = { "mlock", "mlock2 ONFAULT", "MADV_SEQUENTIAL", "MADV_RANDOM", "MADV_MERGEABLE",
				 "MAP_DROPPABLE", "mseal", "guard region", "PR_SET_VMA_ANON_NAME" };
/* The VmFlag each shows (guard regions and names show in none). */
static const char *flag[N] = { "lo", "lf", "sr", "rr", "mg", "dp", "sl", NULL, NULL };

/* Whether /proc/self/maps names the mapping at `addr` `name`. */
static int named(char *addr, const char *name)
{
	FILE *m = fopen("/proc/self/maps", "r");
	char line[512];
	int found = 0;
	CHECK(m, "open maps: %s", strerror(errno));
	while (fgets(line, sizeof line, m)) {
		unsigned long a, b;
		if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && (unsigned long)addr >= a && (unsigned long)addr < b)
			found = strstr(line, name) != NULL;
	}
	fclose(m);
	return found;
}

static char *region[N];
static int have[N];

/* Whether the mapping at `addr` has VmFlag `f` in /proc/self/smaps. */
static int has_flag(char *addr, const char *f)
{
	FILE *s = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0, found = 0;
	CHECK(s, "open smaps: %s", strerror(errno));
	while (fgets(line, sizeof line, s)) {
		unsigned long a, b;
		if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' ')) {
			in = (unsigned long)addr >= a && (unsigned long)addr < b;
			continue;
		}
		if (in && strncmp(line, "VmFlags:", 8) == 0) {
			char *tok = strtok(line + 8, " \n");
			for (; tok; tok = strtok(NULL, " \n"))
				found |= strcmp(tok, f) == 0;
			break;
		}
	}
	fclose(s);
	return found;
}

static sigjmp_buf jump;
static void on_segv(int sig) { (void)sig; siglongjmp(jump, 1); }

int main(void)
{
	for (int i = 0; i < N; i++) {
		int type = i == DROP ? MAP_DROPPABLE : MAP_PRIVATE;
		region[i] = mmap(NULL, LEN, PROT_READ | PROT_WRITE, type | MAP_ANONYMOUS, -1, 0);
		if (region[i] == MAP_FAILED && i == DROP) {
			printf("%s: not offered here (%s)\n", names[i], strerror(errno));
			continue;
		}
		CHECK(region[i] != MAP_FAILED, "mmap: %s", strerror(errno));
		/* Keep neighbours apart: each region its own mapping. */
		CHECK(mprotect(region[i] + LEN - PAGE, PAGE, PROT_READ) == 0, "mprotect: %s", strerror(errno));
		for (int p = 0; p < LEN / PAGE - 1; p++)
			memset(region[i] + p * PAGE, 'a' + i, PAGE);
		int r = 0;
		switch (i) {
		case LOCKED: r = mlock(region[i], LEN); break;
		case ONFAULT: r = syscall(SYS_mlock2, region[i], LEN, MLOCK_ONFAULT); break;
		case SEQ: r = madvise(region[i], LEN, MADV_SEQUENTIAL); break;
		case RAND: r = madvise(region[i], LEN, MADV_RANDOM); break;
		case MERGE: r = madvise(region[i], LEN, MADV_MERGEABLE); break;
		case DROP: r = 0; break;
		case SEALED: r = syscall(SYS_mseal_, region[i], LEN, 0); break;
		case GUARDED: r = madvise(region[i] + PAGE, PAGE, MADV_GUARD_INSTALL_); break;
		case NAMED: r = prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, region[i], LEN, "zdtm arena"); break;
		}
		if (r != 0) {
			printf("%s: not offered here (%s)\n", names[i], strerror(errno));
			continue;
		}
		have[i] = 1;
	}
	for (int i = 0; i < N; i++)
		if (have[i] && flag[i])
			CHECK(has_flag(region[i], flag[i]), "%s: no VmFlag %s before capture", names[i], flag[i]);
	zdtm_ready();
	zdtm_wait_go();

	for (int i = 0; i < N; i++) {
		if (!have[i])
			continue;
		if (flag[i])
			CHECK(has_flag(region[i], flag[i]), "%s: VmFlag %s is gone after restore", names[i], flag[i]);
		for (int p = 0; p < LEN / PAGE - 1; p++) {
			if (i == GUARDED && p == 1)
				continue;
			if (i == DROP)
				continue; /* the kernel may have dropped them: that is what they are for */
			for (int b = 0; b < PAGE; b += 512)
				CHECK(region[i][p * PAGE + b] == 'a' + i, "%s: page %d lost its contents", names[i], p);
		}
	}
	if (have[NAMED])
		CHECK(named(region[NAMED], "[anon:zdtm arena]"), "the mapping's name is gone");
	if (have[SEALED]) {
		CHECK(munmap(region[SEALED], LEN) != 0 && errno == EPERM, "the sealed mapping could be unmapped");
	}
	if (have[GUARDED]) {
		signal(SIGSEGV, on_segv);
		volatile char *g = region[GUARDED] + PAGE;
		if (sigsetjmp(jump, 1) == 0) {
			(void)*g;
			FAIL("the guard region can be read after restore");
		}
		signal(SIGSEGV, SIG_DFL);
	}
	if (have[ONFAULT]) /* on fault: still not locked with MLOCK_ONFAULT lost? lf checked above */
		CHECK(has_flag(region[ONFAULT], "lo"), "mlock2 ONFAULT: not locked");
	zdtm_pass();
}
