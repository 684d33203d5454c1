/* The ISA builds of the kernels, defined once.  Everything that names a
 * build derives from this list: setup.py reads each unit's compile flags
 * from it, the C dispatch (ktsft_kernels_by_name) and the Python one
 * (runnable builds, KTSFT_ISA, cpu_info's descriptions) read the table
 * ktsft_isa_table() makes of it.  Slowest first: at import the last build
 * the CPU runs is chosen.  Each build is the unit src/kernels_<name>.c.
 *
 * X(name, compile flags, CPU features it needs (KTSFT_F_*),
 *   what the base GEMMs run on in fp32, and in bf16) */
#ifndef KTSFT_ISA_TABLE_H
#define KTSFT_ISA_TABLE_H

#include "ktsft/cpu_features.h"
#include "ktsft/kernels.h"

#define KTSFT_F_AVX2_SET (KTSFT_F_AVX2 | KTSFT_F_FMA | KTSFT_F_F16C)
#define KTSFT_F_AVX512_SET (KTSFT_F_AVX2_SET | KTSFT_F_AVX512F | KTSFT_F_AVX512BW | \
                            KTSFT_F_AVX512VL | KTSFT_F_AVX512DQ)

#define KTSFT_ISA_LIST(X)                                                                   \
    X(scalar, "", 0u,                                                                       \
      "portable C, one fp32 lane", "portable C, one fp32 lane")                             \
    X(avx2, "-mavx2 -mfma -mf16c", KTSFT_F_AVX2_SET,                                        \
      "AVX2 FMA, 8 fp32 lanes", "AVX2 FMA on bf16 widened to fp32")                         \
    X(avx512, "-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq",              \
      KTSFT_F_AVX512_SET,                                                                   \
      "AVX-512 FMA, 16 fp32 lanes", "AVX-512 FMA on bf16 widened to fp32")                  \
    X(avx512bf16,                                                                           \
      "-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16",         \
      KTSFT_F_AVX512_SET | KTSFT_F_AVX512_BF16,                                             \
      "AVX-512 FMA, 16 fp32 lanes", "AVX512-BF16 vdpbf16ps, fp32 accumulation")             \
    /* the tiles themselves are checked at run time (ktsft_amx_request): the */            \
    /* C model of the tiles (KTSFT_AMX_EMULATE) runs without them */                       \
    X(amx, "-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 "    \
           "-mamx-tile -mamx-bf16",                                                         \
      KTSFT_F_AVX512_SET | KTSFT_F_AVX512_BF16,                                             \
      "AVX-512 FMA, 16 fp32 lanes",                                                         \
      "AMX-BF16 tiles (tdpbf16ps), fp32 accumulation; vdpbf16ps under 8 tokens")

typedef struct ktsft_isa_info {
    const char *name;
    const ktsft_kernels *(*get)(void); /* NULL: not built into this extension */
    unsigned needs;                    /* KTSFT_F_* bits the CPU must have */
    const char *fp32;                  /* what the base GEMMs run on, fp32 */
    const char *bf16;                  /* and bf16 */
} ktsft_isa_info;

/* The table of KTSFT_ISA_LIST, slowest first; *n its length. */
const ktsft_isa_info *ktsft_isa_table(int *n);

#endif
