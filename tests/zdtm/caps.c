/* Capabilities: a process that dropped root but kept two capabilities (one of them ambient),
 * with a capability dropped from its bounding set and SECBIT_NOROOT set, has exactly those
 * after restore — not the restorer's full set, and not none. */
#include "zdtm.h"
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef SECBIT_NOROOT
#define SECBIT_NOROOT (1 << 0)
#endif

static void get_caps(unsigned long long sets[3])
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	CHECK(syscall(SYS_capget, &h, d) == 0, "capget: %s", strerror(errno));
	sets[0] = d[0].effective | (unsigned long long)d[1].effective << 32;
	sets[1] = d[0].permitted | (unsigned long long)d[1].permitted << 32;
	sets[2] = d[0].inheritable | (unsigned long long)d[1].inheritable << 32;
}

int main(void)
{
	unsigned long long keep = (1ULL << CAP_NET_BIND_SERVICE) | (1ULL << CAP_CHOWN);
	CHECK(geteuid() == 0, "must start as root");
	CHECK(prctl(PR_CAPBSET_DROP, CAP_NET_RAW) == 0, "PR_CAPBSET_DROP: %s", strerror(errno));
	CHECK(prctl(PR_SET_SECUREBITS, SECBIT_NOROOT) == 0, "PR_SET_SECUREBITS: %s", strerror(errno));
	CHECK(prctl(PR_SET_KEEPCAPS, 1) == 0, "PR_SET_KEEPCAPS: %s", strerror(errno));
	CHECK(setresgid(1000, 1000, 1000) == 0 && setresuid(1000, 1000, 1000) == 0, "setresuid: %s",
	      strerror(errno));
	CHECK(prctl(PR_SET_KEEPCAPS, 0) == 0, "PR_SET_KEEPCAPS 0: %s", strerror(errno));
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = { { (unsigned)keep, (unsigned)keep, 1u << CAP_NET_BIND_SERVICE },
					      { 0, 0, 0 } };
	CHECK(syscall(SYS_capset, &h, d) == 0, "capset: %s", strerror(errno));
	CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) == 0, "ambient raise: %s",
	      strerror(errno));
	unsigned long long before[3];
	get_caps(before);
	int bits_before = prctl(PR_GET_SECUREBITS);
	zdtm_ready();
	zdtm_wait_go();

	unsigned long long now[3];
	get_caps(now);
	const char *names[3] = { "effective", "permitted", "inheritable" };
	for (int i = 0; i < 3; i++)
		CHECK(now[i] == before[i], "%s capabilities %#llx, were %#llx", names[i], now[i], before[i]);
	CHECK(getuid() == 1000 && geteuid() == 1000, "uid %d/%d, was 1000", getuid(), geteuid());
	CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_BIND_SERVICE, 0, 0) == 1,
	      "CAP_NET_BIND_SERVICE is no longer ambient");
	CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_CHOWN, 0, 0) == 0, "CAP_CHOWN became ambient");
	CHECK(prctl(PR_CAPBSET_READ, CAP_NET_RAW) == 0, "CAP_NET_RAW is back in the bounding set");
	CHECK(prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN) == 1, "CAP_SYS_ADMIN left the bounding set");
	CHECK(prctl(PR_GET_SECUREBITS) == bits_before, "securebits %#x, were %#x", prctl(PR_GET_SECUREBITS),
	      bits_before);
	zdtm_pass();
}
