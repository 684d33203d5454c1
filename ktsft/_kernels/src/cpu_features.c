/* CPUID + XGETBV: a feature counts only if the CPU has it and the OS saves
 * its registers on context switch (XCR0), as numpy's npy_cpu_features does. */
#define _GNU_SOURCE /* syscall() */
#include <string.h>
#include "ktsft/cpu_features.h"

#if defined(__linux__) && defined(__x86_64__)
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
#define KT_ARCH_GET_XCOMP_PERM 0x1022
#define KT_ARCH_REQ_XCOMP_PERM 0x1023
#define KT_XFEATURE_XTILEDATA 18

int ktsft_amx_request(int *err)
{
    unsigned long bits = 0;
    *err = 0;
    if (syscall(SYS_arch_prctl, KT_ARCH_REQ_XCOMP_PERM, KT_XFEATURE_XTILEDATA) != 0) {
        *err = errno;
        return -2;
    }
    if (syscall(SYS_arch_prctl, KT_ARCH_GET_XCOMP_PERM, &bits) != 0) {
        *err = errno;
        return -3;
    }
    return (bits & (1ul << KT_XFEATURE_XTILEDATA)) ? 0 : -3;
}
#else
int ktsft_amx_request(int *err)
{
    *err = 0;
    return -1;
}
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long kt_xgetbv0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

void ktsft_probe_cpu(ktsft_cpu_features *f)
{
    unsigned int a, b, c, d;
    memset(f, 0, sizeof *f);
    f->x86 = 1;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const int osxsave = (c >> 27) & 1;
    f->fma = (c >> 12) & 1;
    f->f16c = (c >> 29) & 1;
    const int avx = (c >> 28) & 1;
    if (osxsave && avx) {
        unsigned long long xcr0 = kt_xgetbv0();
        f->os_avx = (xcr0 & 0x6) == 0x6;
        f->os_avx512 = f->os_avx && (xcr0 & 0xe0) == 0xe0;
        f->os_amx = (xcr0 & 0x60000) == 0x60000;
    }
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f->avx2 = (b >> 5) & 1;
        f->avx512f = (b >> 16) & 1;
        f->avx512dq = (b >> 17) & 1;
        f->avx512bw = (b >> 30) & 1;
        f->avx512vl = (b >> 31) & 1;
        f->avx512_vnni = (c >> 11) & 1;
        f->avx512_fp16 = (d >> 23) & 1;
        f->amx_bf16 = (d >> 22) & 1;
        f->amx_tile = (d >> 24) & 1;
        f->amx_int8 = (d >> 25) & 1;
        unsigned int max7 = a;
        if (max7 >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f->avx512_bf16 = (a >> 5) & 1;
    }
    if (!f->os_avx) f->avx2 = f->fma = f->f16c = 0;
    if (!f->os_avx512)
        f->avx512f = f->avx512dq = f->avx512bw = f->avx512vl = f->avx512_bf16 =
            f->avx512_fp16 = f->avx512_vnni = 0;
    if (!f->os_amx) f->amx_tile = f->amx_bf16 = f->amx_int8 = 0;
}
#else
void ktsft_probe_cpu(ktsft_cpu_features *f) { memset(f, 0, sizeof *f); }
#endif

unsigned ktsft_feature_mask(const ktsft_cpu_features *f)
{
    return (f->avx2 ? KTSFT_F_AVX2 : 0u) | (f->fma ? KTSFT_F_FMA : 0u) |
           (f->f16c ? KTSFT_F_F16C : 0u) | (f->avx512f ? KTSFT_F_AVX512F : 0u) |
           (f->avx512dq ? KTSFT_F_AVX512DQ : 0u) | (f->avx512bw ? KTSFT_F_AVX512BW : 0u) |
           (f->avx512vl ? KTSFT_F_AVX512VL : 0u) | (f->avx512_bf16 ? KTSFT_F_AVX512_BF16 : 0u) |
           (f->amx_tile ? KTSFT_F_AMX_TILE : 0u) | (f->amx_bf16 ? KTSFT_F_AMX_BF16 : 0u);
}
