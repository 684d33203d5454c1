/* CPUID + XGETBV feature probe (x86-64); every flag is 0 elsewhere. */
#ifndef KTSFT_CPU_FEATURES_H
#define KTSFT_CPU_FEATURES_H

typedef struct ktsft_cpu_features {
    int x86;
    int avx2, fma, f16c;
    int avx512f, avx512dq, avx512bw, avx512vl;
    int avx512_bf16, avx512_fp16, avx512_vnni;
    int amx_tile, amx_bf16, amx_int8;
    /* the OS saves the registers: XCR0 bits for YMM and for ZMM/opmask */
    int os_avx, os_avx512, os_amx;
} ktsft_cpu_features;

void ktsft_probe_cpu(ktsft_cpu_features *out);

/* The probe's features as bits (what an ISA build needs: isa_table.h) */
enum {
    KTSFT_F_AVX2 = 1u << 0, KTSFT_F_FMA = 1u << 1, KTSFT_F_F16C = 1u << 2,
    KTSFT_F_AVX512F = 1u << 3, KTSFT_F_AVX512DQ = 1u << 4, KTSFT_F_AVX512BW = 1u << 5,
    KTSFT_F_AVX512VL = 1u << 6, KTSFT_F_AVX512_BF16 = 1u << 7, KTSFT_F_AMX_TILE = 1u << 8,
    KTSFT_F_AMX_BF16 = 1u << 9
};
unsigned ktsft_feature_mask(const ktsft_cpu_features *f);

/* Linux keeps AMX tile data off until a process asks for it
 * (arch_prctl ARCH_REQ_XCOMP_PERM).  Asks once; 0 when granted, else a
 * negative code: -1 not Linux/x86-64, -2 request refused (errno in *err),
 * -3 granted but not reported back. */
int ktsft_amx_request(int *err);

#endif
