/* mm fields: /proc/self/cmdline, environ, exe, auxv and the mm addresses of /proc/self/stat
 * (fields 26-28 and 45-51) read the same before capture and after restore. */
#include "zdtm.h"
#include <limits.h>

struct snap {
	char *cmdline, *environ, *auxv, exe[PATH_MAX], statmm[512];
	size_t cmdline_len, environ_len, auxv_len;
};

static void stat_mm(char *out, size_t len)
{
	size_t n;
	char *s = zdtm_slurp("/proc/self/stat", &n), *p = strrchr(s, ')');
	int field = 2;
	unsigned long long v;
	size_t o = 0;
	/* fields after the comm, 1-based numbering as in proc(5) */
	p += 2;
	while (*p) {
		char *end = strchr(p, ' ');
		field++;
		if ((field >= 26 && field <= 28) || (field >= 45 && field <= 51)) {
			v = strtoull(p, NULL, 10);
			o += snprintf(out + o, len - o, "f%d=%#llx ", field, v);
		}
		if (!end)
			break;
		p = end + 1;
	}
	free(s);
}

static void take(struct snap *s)
{
	ssize_t n;
	s->cmdline = zdtm_slurp("/proc/self/cmdline", &s->cmdline_len);
	s->environ = zdtm_slurp("/proc/self/environ", &s->environ_len);
	s->auxv = zdtm_slurp("/proc/self/auxv", &s->auxv_len);
	n = readlink("/proc/self/exe", s->exe, sizeof s->exe - 1);
	CHECK(n > 0, "readlink /proc/self/exe: %s", strerror(errno));
	s->exe[n] = 0;
	stat_mm(s->statmm, sizeof s->statmm);
}

static void show(const char *what, const char *a, size_t alen, const char *b, size_t blen)
{
	size_t i;
	for (i = 0; i < alen && i < blen && a[i] == b[i]; i++)
		;
	FAIL("%s differs (lengths %zu vs %zu, first difference at byte %zu)", what, alen, blen, i);
}

int main(int argc, char **argv)
{
	struct snap b, a;
	(void)argv;
	CHECK(argc >= 3, "run me with a few arguments (the runner does)");
	zdtm_init();
	take(&b);
	zdtm_ready();
	zdtm_wait_go();
	take(&a);
	if (a.cmdline_len != b.cmdline_len || memcmp(a.cmdline, b.cmdline, a.cmdline_len))
		show("/proc/self/cmdline", b.cmdline, b.cmdline_len, a.cmdline, a.cmdline_len);
	if (a.environ_len != b.environ_len || memcmp(a.environ, b.environ, a.environ_len))
		show("/proc/self/environ", b.environ, b.environ_len, a.environ, a.environ_len);
	if (a.auxv_len != b.auxv_len || memcmp(a.auxv, b.auxv, a.auxv_len)) {
		size_t i;
		for (i = 0; i + 16 <= a.auxv_len && i + 16 <= b.auxv_len; i += 16)
			if (memcmp(a.auxv + i, b.auxv + i, 16))
				FAIL("/proc/self/auxv differs: entry type %lu was %#lx, now type %lu = %#lx",
				     *(unsigned long *)(b.auxv + i), *(unsigned long *)(b.auxv + i + 8),
				     *(unsigned long *)(a.auxv + i), *(unsigned long *)(a.auxv + i + 8));
		show("/proc/self/auxv", b.auxv, b.auxv_len, a.auxv, a.auxv_len);
	}
	CHECK(strcmp(a.exe, b.exe) == 0, "/proc/self/exe was %s, now %s", b.exe, a.exe);
	CHECK(strcmp(a.statmm, b.statmm) == 0, "mm fields of /proc/self/stat differ:\nbefore %s\nafter  %s", b.statmm,
	      a.statmm);
	zdtm_pass();
}
