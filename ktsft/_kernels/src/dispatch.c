/* Name -> kernel table.  Which names the CPU may run is decided in Python
 * (ktsft/_kernels/moe_sft.pyx) from the cpu_features probe. */
#include <string.h>
#include "ktsft/kernels.h"

const ktsft_kernels *ktsft_kernels_by_name(const char *name)
{
    if (strcmp(name, "scalar") == 0) return ktsft_kernels_scalar();
#if defined(KTSFT_X86_KERNELS)
    if (strcmp(name, "avx2") == 0) return ktsft_kernels_avx2();
    if (strcmp(name, "avx512") == 0) return ktsft_kernels_avx512();
    if (strcmp(name, "avx512bf16") == 0) return ktsft_kernels_avx512bf16();
#endif
#if defined(KTSFT_AMX_KERNELS)
    if (strcmp(name, "amx") == 0) return ktsft_kernels_amx();
#endif
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
