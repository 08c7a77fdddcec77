/*
 * zdtm.h — the protocol every zdtm target follows (see README.md in this folder).
 *
 *   1. set up the one kind of state the target owns, recording what it expects in memory;
 *   2. zdtm_ready(): print READY on stdout (flushed);
 *   3. zdtm_wait_go(): poll (access + usleep) for the file named by $ZDTM_GO — the runner
 *      dumps the target in this loop and creates the file only after `telefork restore`
 *      has started, so everything after this call runs in the restored process;
 *   4. check the state from inside; zdtm_pass() or FAIL(...) (exit 0 / exit 1).
 *
 * $ZDTM_TMP names a scratch directory owned by the runner for files the target needs.
 */
#ifndef ZDTM_H
#define ZDTM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#pragma GCC diagnostic ignored "-Wunused-function"

static char zdtm_go_path[4096];
static char zdtm_tmp[4096];

static void zdtm_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void zdtm_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("FAIL: ", stdout);
	vfprintf(stdout, fmt, ap);
	fputc('\n', stdout);
	va_end(ap);
	fflush(stdout);
	exit(1);
}

#define FAIL(...) zdtm_die(__VA_ARGS__)
/* CHECK(cond, fmt, ...): FAIL with the message unless cond holds. */
#define CHECK(cond, ...) do { if (!(cond)) zdtm_die(__VA_ARGS__); } while (0)

/* Reads $ZDTM_GO and $ZDTM_TMP into memory; called by zdtm_ready, or earlier by targets that
 * need ZDTM_TMP while setting up. */
static void zdtm_init(void)
{
	const char *go = getenv("ZDTM_GO");
	const char *tmp = getenv("ZDTM_TMP");
	if (zdtm_go_path[0])
		return;
	if (!go || !*go || strlen(go) >= sizeof(zdtm_go_path))
		FAIL("ZDTM_GO is not set (run me through the zdtm runner)");
	strcpy(zdtm_go_path, go);
	if (tmp && strlen(tmp) < sizeof(zdtm_tmp))
		strcpy(zdtm_tmp, tmp);
	else
		strcpy(zdtm_tmp, "/tmp");
	if (access(zdtm_go_path, F_OK) == 0)
		FAIL("go file %s exists before capture", zdtm_go_path);
}

static void zdtm_ready(void)
{
	zdtm_init();
	fputs("READY\n", stdout);
	fflush(stdout);
}

static void zdtm_wait_go(void)
{
	while (access(zdtm_go_path, F_OK) != 0)
		usleep(1000);
}

static void zdtm_pass(void) __attribute__((noreturn));
static void zdtm_pass(void)
{
	fputs("PASS\n", stdout);
	fflush(stdout);
	exit(0);
}

/* Path of a file in $ZDTM_TMP (static buffer per call site is the caller's business). */
static __attribute__((unused)) void zdtm_path(char *buf, size_t len, const char *name)
{
	zdtm_init();
	snprintf(buf, len, "%s/%s", zdtm_tmp, name);
}

/* Reads a whole (small) file into a malloc'd buffer; returns its length in *len. */
static __attribute__((unused)) char *zdtm_slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "r");
	size_t cap = 4096, n = 0, r;
	char *buf;
	if (!f)
		FAIL("open %s: %s", path, strerror(errno));
	buf = malloc(cap + 1);
	while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
		n += r;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
		}
	}
	fclose(f);
	buf[n] = 0;
	*len = n;
	return buf;
}

#endif
