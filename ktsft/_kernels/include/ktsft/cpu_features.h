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

/* Linux keeps AMX tile data off until a process asks for it
 * (arch_prctl ARCH_REQ_XCOMP_PERM).  Asks once; 0 when granted, else a
 * negative code: -1 not Linux/x86-64, -2 request refused (errno in *err),
 * -3 granted but not reported back. */
int ktsft_amx_request(int *err);

#endif
