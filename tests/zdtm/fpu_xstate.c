/* FPU / extended state: distinct values in zmm0-31 (so xmm/ymm too) and k0-7, a non-default
 * MXCSR rounding mode, a non-default x87 control word and two values on the x87 stack.
 *
 * C code would clobber these registers, so one asm block loads them, writes READY with a raw
 * write(2), polls for the go file with raw access(2)/nanosleep(2) syscalls (a syscall clobbers
 * only rax, rcx and r11), then stores everything back to memory; C compares afterwards.
 * Build with -mavx512f -mavx512bw. */
#include "zdtm.h"
#include <stdint.h>
#include <time.h>
#include <cpuid.h>

struct ctx {
	uint8_t zmm_in[32 * 64];  /* 0 */
	uint64_t k_in[8];         /* 2048 */
	uint32_t mxcsr_in;        /* 2112 */
	uint16_t fcw_in;          /* 2116 */
	uint16_t pad0;
	double x87_in[2];         /* 2120 */
	const char *go;           /* 2136 */
	struct timespec nap;      /* 2144 */
	uint64_t polls;           /* 2160 */
	uint8_t zmm_out[32 * 64]; /* 2168 */
	uint64_t k_out[8];        /* 4216 */
	uint32_t mxcsr_out;       /* 4280 */
	uint16_t fcw_out;         /* 4284 */
	uint16_t pad1;
	double x87_out[2];        /* 4288 */
} __attribute__((aligned(64)));

_Static_assert(__builtin_offsetof(struct ctx, k_in) == 2048, "layout");
_Static_assert(__builtin_offsetof(struct ctx, mxcsr_in) == 2112, "layout");
_Static_assert(__builtin_offsetof(struct ctx, fcw_in) == 2116, "layout");
_Static_assert(__builtin_offsetof(struct ctx, x87_in) == 2120, "layout");
_Static_assert(__builtin_offsetof(struct ctx, go) == 2136, "layout");
_Static_assert(__builtin_offsetof(struct ctx, nap) == 2144, "layout");
_Static_assert(__builtin_offsetof(struct ctx, polls) == 2160, "layout");
_Static_assert(__builtin_offsetof(struct ctx, zmm_out) == 2168, "layout");
_Static_assert(__builtin_offsetof(struct ctx, k_out) == 4216, "layout");
_Static_assert(__builtin_offsetof(struct ctx, mxcsr_out) == 4280, "layout");
_Static_assert(__builtin_offsetof(struct ctx, fcw_out) == 4284, "layout");
_Static_assert(__builtin_offsetof(struct ctx, x87_out) == 4288, "layout");

static struct ctx c;
static const char ready_msg[] = "READY\n";
static const uint32_t default_mxcsr = 0x1F80;

#define LZ(n) "vmovdqu64 " #n "*64(%%rbx), %%zmm" #n "\n\t"
#define SZ(n) "vmovdqu64 %%zmm" #n ", 2168+" #n "*64(%%rbx)\n\t"
#define LK(n) "kmovq 2048+" #n "*8(%%rbx), %%k" #n "\n\t"
#define SK(n) "kmovq %%k" #n ", 4216+" #n "*8(%%rbx)\n\t"

int main(void)
{
	unsigned a, b, cc, d;
	int i;

	__cpuid_count(7, 0, a, b, cc, d);
	if (!(b & (1u << 16)) || !(b & (1u << 30))) {
		/* no AVX-512F/BW: the runner treats this line as "skipped", not as a pass */
		printf("SKIP: CPU has no AVX-512F/BW\n");
		return 0;
	}
	zdtm_init();
	for (i = 0; i < 32 * 64; i++)
		c.zmm_in[i] = (uint8_t)(i * 131 + i / 64 * 7 + 1);
	for (i = 0; i < 8; i++)
		c.k_in[i] = 0x0123456789ABCDEFull * (i + 3) ^ ((uint64_t)i << 56);
	c.mxcsr_in = 0x1F80 | (3 << 13); /* all exceptions masked, round toward zero */
	c.fcw_in = 0x0E7F;               /* round toward zero, double precision */
	c.x87_in[0] = 3.25;
	c.x87_in[1] = -1234.5;
	c.go = zdtm_go_path;
	c.nap.tv_sec = 0;
	c.nap.tv_nsec = 1000000;

	/* The real block: everything from load to store in one asm statement. */
	__asm__ volatile(
		"mov %[ctx], %%rbx\n\t"
		LZ(0) LZ(1) LZ(2) LZ(3) LZ(4) LZ(5) LZ(6) LZ(7)
		LZ(8) LZ(9) LZ(10) LZ(11) LZ(12) LZ(13) LZ(14) LZ(15)
		LZ(16) LZ(17) LZ(18) LZ(19) LZ(20) LZ(21) LZ(22) LZ(23)
		LZ(24) LZ(25) LZ(26) LZ(27) LZ(28) LZ(29) LZ(30) LZ(31)
		LK(0) LK(1) LK(2) LK(3) LK(4) LK(5) LK(6) LK(7)
		"ldmxcsr 2112(%%rbx)\n\t"
		"fninit\n\t"
		"fldcw 2116(%%rbx)\n\t"
		"fldl 2128(%%rbx)\n\t"
		"fldl 2120(%%rbx)\n\t"
		/* write(1, "READY\n", 6) */
		"mov $1, %%eax\n\t"
		"mov $1, %%edi\n\t"
		"lea %[msg], %%rsi\n\t"
		"mov $6, %%edx\n\t"
		"syscall\n"
		"1:\n\t"
		/* access(go, F_OK) */
		"mov $21, %%eax\n\t"
		"mov 2136(%%rbx), %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"test %%rax, %%rax\n\t"
		"jz 2f\n\t"
		"incq 2160(%%rbx)\n\t"
		/* nanosleep(&nap, NULL) */
		"mov $35, %%eax\n\t"
		"lea 2144(%%rbx), %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"jmp 1b\n"
		"2:\n\t"
		SZ(0) SZ(1) SZ(2) SZ(3) SZ(4) SZ(5) SZ(6) SZ(7)
		SZ(8) SZ(9) SZ(10) SZ(11) SZ(12) SZ(13) SZ(14) SZ(15)
		SZ(16) SZ(17) SZ(18) SZ(19) SZ(20) SZ(21) SZ(22) SZ(23)
		SZ(24) SZ(25) SZ(26) SZ(27) SZ(28) SZ(29) SZ(30) SZ(31)
		SK(0) SK(1) SK(2) SK(3) SK(4) SK(5) SK(6) SK(7)
		"stmxcsr 4280(%%rbx)\n\t"
		"fnstcw 4284(%%rbx)\n\t"
		"fstpl 4288(%%rbx)\n\t"
		"fstpl 4296(%%rbx)\n\t"
		/* back to the ABI's defaults for the C code that follows */
		"fninit\n\t"
		"ldmxcsr %[defmx]\n\t"
		"vzeroupper\n\t"
		:
		: [ctx] "r"(&c), [msg] "m"(ready_msg), [defmx] "m"(default_mxcsr)
		: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r11", "memory", "cc",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
		  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
		  "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31",
		  "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7",
		  "st", "st(1)", "st(2)", "st(3)", "st(4)", "st(5)", "st(6)", "st(7)");

	for (i = 0; i < 32 * 64; i++)
		if (c.zmm_out[i] != c.zmm_in[i])
			FAIL("zmm%d byte %d: %#x, want %#x (%s part)", i / 64, i % 64, c.zmm_out[i], c.zmm_in[i],
			     i % 64 < 16 ? "xmm" : i % 64 < 32 ? "ymm upper" : "zmm upper");
	for (i = 0; i < 8; i++)
		CHECK(c.k_out[i] == c.k_in[i], "k%d: %#llx, want %#llx", i, (unsigned long long)c.k_out[i],
		      (unsigned long long)c.k_in[i]);
	CHECK(c.mxcsr_out == c.mxcsr_in, "MXCSR %#x, want %#x", c.mxcsr_out, c.mxcsr_in);
	CHECK(c.fcw_out == c.fcw_in, "x87 control word %#x, want %#x", c.fcw_out, c.fcw_in);
	CHECK(c.x87_out[0] == c.x87_in[0] && c.x87_out[1] == c.x87_in[1], "x87 stack %g %g, want %g %g",
	      c.x87_out[0], c.x87_out[1], c.x87_in[0], c.x87_in[1]);
	zdtm_pass();
}
