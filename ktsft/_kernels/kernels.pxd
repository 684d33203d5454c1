# C declarations of the kernel table (include/ktsft/kernels.h) and the CPU probe.
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "ktsft/kernels.h" nogil:
    ctypedef uint16_t ktsft_bf16
    enum: KT_NN_STREAM_MAX
    enum: KT_NN_STREAM_FEW
    ctypedef struct ktsft_gemm:
        int64_t M, N, K
        const void *A
        int64_t lda
        const int32_t *arows
        const void *W
        int64_t ldw
        int64_t K2
        const float *A2
        int64_t lda2
        const float *W2
        int64_t ldw2
        float *C
        int64_t ldc
        int accumulate
        const float *wscale
        int64_t group, sld
    ctypedef void (*ktsft_gemm_fn)(const ktsft_gemm *g) noexcept nogil
    enum:
        KTSFT_W_F32
        KTSFT_W_BF16
        KTSFT_W_Q8
        KTSFT_W_Q4
        KTSFT_W_KINDS
    ctypedef void (*ktsft_outer_f32_fn)(int64_t, int64_t, int64_t, const float*, int64_t,
                                        const int32_t*, const float*, const float*, int64_t,
                                        const int32_t*, float*, int64_t, int) noexcept nogil
    ctypedef void (*ktsft_swiglu_forward_fn)(int64_t, const float*, const float*, float*,
                                             ktsft_bf16*) noexcept nogil
    ctypedef float (*ktsft_swiglu_backward_fn)(int64_t, float, float*, float*,
                                               float*) noexcept nogil
    ctypedef void (*ktsft_round_bf16_fn)(int64_t, const float*, ktsft_bf16*) noexcept nogil
    ctypedef void (*ktsft_combine_fn)(int64_t, int64_t, const float*, const int32_t*,
                                      const float*, float*) noexcept nogil
    ctypedef void (*ktsft_dropout_f32_fn)(int64_t, uint64_t, int32_t, int64_t, int64_t, uint32_t,
                                          float, const float*, float*, int) noexcept nogil

    ctypedef struct ktsft_adamw_hp:
        float decay
        float lerp_weight
        float beta2
        float one_minus_beta2
        float neg_step_size
        float inv_bc2_sqrt
        float eps
        int maximize
    ctypedef void (*ktsft_adamw_f32_fn)(int64_t, float*, const float*, float*, float*, float*,
                                        const ktsft_adamw_hp*) noexcept nogil

    ctypedef struct ktsft_kernels:
        const char *name
        ktsft_gemm_fn nt[4]
        ktsft_gemm_fn nn[4]
        ktsft_outer_f32_fn outer_f32
        ktsft_swiglu_forward_fn swiglu_forward
        ktsft_swiglu_backward_fn swiglu_backward
        ktsft_round_bf16_fn round_bf16
        ktsft_combine_fn combine
        ktsft_dropout_f32_fn dropout_f32
        ktsft_adamw_f32_fn adamw_f32
        void (*release_scratch)()
        size_t (*scratch_bytes)()

    const ktsft_kernels *ktsft_kernels_by_name(const char *name)
    int ktsft_amx_build()

cdef extern from "ktsft/cpu_features.h" nogil:
    ctypedef struct ktsft_cpu_features:
        int x86
        int avx2, fma, f16c
        int avx512f, avx512dq, avx512bw, avx512vl
        int avx512_bf16, avx512_fp16, avx512_vnni
        int amx_tile, amx_bf16, amx_int8
        int os_avx, os_avx512, os_amx
    void ktsft_probe_cpu(ktsft_cpu_features *out)
    unsigned ktsft_feature_mask(const ktsft_cpu_features *f)
    int ktsft_amx_request(int *err)


cdef extern from "ktsft/isa_table.h" nogil:
    ctypedef struct ktsft_isa_info:
        const char *name
        const ktsft_kernels *(*get)()
        unsigned needs
        const char *fp32
        const char *bf16

    const ktsft_isa_info *ktsft_isa_table(int *n)
