/* File mappings: a private mapping with a few pages modified (the modifications survive,
 * untouched pages still equal the file, and it stays private), a shared mapping (a write after
 * restore reaches the file), and /proc/self/maps naming the same files at the same addresses. */
#include "zdtm.h"
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>

#define PG 4096
#define NPG 16

static char before[64 * 1024];

/* The lines of /proc/self/maps that name a file (path starts with '/'). */
static void file_maps(char *out, size_t len)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[1024];
	size_t n = 0;
	out[0] = 0;
	while (f && fgets(line, sizeof line, f)) {
		char *slash = strchr(line, '/');
		if (slash && n + strlen(line) < len) {
			strcpy(out + n, line);
			n += strlen(line);
		}
	}
	if (f)
		fclose(f);
}

static unsigned char fpat(size_t off, int which) { return (unsigned char)((off * 13 + off / PG + which * 101) ^ 0x5c); }

static int make_file(const char *path, int which)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	unsigned char buf[PG];
	size_t p, i;
	CHECK(fd >= 0, "create %s: %s", path, strerror(errno));
	for (p = 0; p < NPG; p++) {
		for (i = 0; i < PG; i++)
			buf[i] = fpat(p * PG + i, which);
		CHECK(write(fd, buf, PG) == PG, "write %s", path);
	}
	return fd;
}

int main(void)
{
	char ppath[4200], spath[4200];
	static char after[sizeof before];
	unsigned char *priv, *shr, buf[PG];
	int pfd, sfd;
	size_t p, i;

	zdtm_path(ppath, sizeof ppath, "private.bin");
	zdtm_path(spath, sizeof spath, "shared.bin");
	pfd = make_file(ppath, 1);
	sfd = make_file(spath, 2);
	priv = mmap(NULL, NPG * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, pfd, 0);
	/* map the shared file from page 2 on, to check the offset too */
	shr = mmap(NULL, (NPG - 2) * PG, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 2 * PG);
	CHECK(priv != MAP_FAILED && shr != MAP_FAILED, "mmap: %s", strerror(errno));
	close(pfd);
	close(sfd);

	/* read every page (so unmodified pages are present, file-backed), modify pages 3 and 9 */
	for (i = 0; i < NPG * PG; i++)
		CHECK(priv[i] == fpat(i, 1), "private mapping differs from its file before capture");
	memset(priv + 3 * PG, 0xE3, PG);
	memset(priv + 9 * PG + 100, 0xE9, 200);
	/* a write through the shared mapping before capture */
	memset(shr + PG, 0x77, 64);

	file_maps(before, sizeof before);
	zdtm_ready();
	zdtm_wait_go();

	file_maps(after, sizeof after);
	CHECK(strcmp(before, after) == 0, "file mappings in /proc/self/maps changed.\nbefore:\n%safter:\n%s", before, after);

	pfd = open(ppath, O_RDWR);
	sfd = open(spath, O_RDWR);
	CHECK(pfd >= 0 && sfd >= 0, "reopen files: %s", strerror(errno));
	for (p = 0; p < NPG; p++) {
		CHECK(pread(pfd, buf, PG, p * PG) == PG, "pread private file");
		for (i = 0; i < PG; i++) {
			unsigned char want = buf[i];
			if (p == 3)
				want = 0xE3;
			else if (p == 9 && i >= 100 && i < 300)
				want = 0xE9;
			CHECK(buf[i] == fpat(p * PG + i, 1), "private mapping's file was written to (page %zu)", p);
			CHECK(priv[p * PG + i] == want, "private mapping page %zu byte %zu: %#x, want %#x", p, i,
			      priv[p * PG + i], want);
		}
	}
	/* still private: a write now does not reach the file */
	priv[5 * PG] ^= 0xFF;
	CHECK(pread(pfd, buf, 1, 5 * PG) == 1 && buf[0] == fpat(5 * PG, 1), "private mapping became shared");

	/* shared: contents, the pre-capture write, and a write after restore reaching the file */
	for (i = 0; i < (NPG - 2) * PG; i++) {
		unsigned char want = (i >= PG && i < PG + 64) ? 0x77 : fpat(2 * PG + i, 2);
		CHECK(shr[i] == want, "shared mapping byte %zu: %#x, want %#x", i, shr[i], want);
	}
	memcpy(shr + 4 * PG + 10, "after-restore", 13);
	CHECK(pread(sfd, buf, 13, 6 * PG + 10) == 13, "pread shared file");
	CHECK(memcmp(buf, "after-restore", 13) == 0, "write to the shared mapping after restore did not reach the file");
	CHECK(pwrite(sfd, "from-file", 9, 7 * PG) == 9, "pwrite shared file");
	CHECK(memcmp(shr + 5 * PG, "from-file", 9) == 0, "write to the file not seen through the shared mapping");
	zdtm_pass();
}
