/* Name -> kernel table, from the one ISA list (ktsft/isa_table.h).  Which
 * builds the CPU may run is decided in Python (ktsft/_kernels/moe_sft.pyx)
 * from the table's feature bits and the cpu_features probe. */
#include <stddef.h>
#include <string.h>
#include "ktsft/isa_table.h"

/* the builds linked into this extension (setup.py compiles them) */
#define KT_GETTER_scalar ktsft_kernels_scalar
#if defined(KTSFT_X86_KERNELS)
#define KT_GETTER_avx2 ktsft_kernels_avx2
#define KT_GETTER_avx512 ktsft_kernels_avx512
#define KT_GETTER_avx512bf16 ktsft_kernels_avx512bf16
#else
#define KT_GETTER_avx2 NULL
#define KT_GETTER_avx512 NULL
#define KT_GETTER_avx512bf16 NULL
#endif
#if defined(KTSFT_AMX_KERNELS)
#define KT_GETTER_amx ktsft_kernels_amx
#else
#define KT_GETTER_amx NULL
#endif

#define KT_ROW(name, flags, needs, fp32, bf16) {#name, KT_GETTER_##name, needs, fp32, bf16},
static const ktsft_isa_info kt_isas[] = {KTSFT_ISA_LIST(KT_ROW)};
#undef KT_ROW

const ktsft_isa_info *ktsft_isa_table(int *n)
{
    *n = (int)(sizeof kt_isas / sizeof kt_isas[0]);
    return kt_isas;
}

const ktsft_kernels *ktsft_kernels_by_name(const char *name)
{
    for (size_t i = 0; i < sizeof kt_isas / sizeof kt_isas[0]; ++i)
        if (strcmp(name, kt_isas[i].name) == 0)
            return kt_isas[i].get ? kt_isas[i].get() : NULL;
    return NULL;
}

int ktsft_amx_build(void)
{
#if defined(KTSFT_AMX_KERNELS)
    return KTSFT_AMX_KERNELS;
#else
    return 0;
#endif
}
