# AdamW over fp32 tensors: the native half of ktsft.optim.CPUAdamW (included
# into moe_sft.pyx: one extension, one kernel table).  The Python side
# validates every array (ktsft/optim.py); here the typed memoryviews check
# kind and contiguity, and the sizes are checked to agree.
from libc.math cimport pow as c_pow, sqrt as c_sqrt

from .kernels cimport ktsft_adamw_hp

cdef enum:
    ADAMW_BLOCK = 16384  # elements per task: 64 KiB of each array, L2-sized


def adamw_step(float[::1] param, const float[::1] grad, float[::1] exp_avg,
               float[::1] exp_avg_sq, float[::1] max_exp_avg_sq, double lr, double beta1,
               double beta2, double eps, double weight_decay, double step, bint maximize,
               int threads, str isa):
    """One AdamW step in place over one flat fp32 tensor (and its state):
    blocks of ADAMW_BLOCK elements spread over `threads` OpenMP threads.
    The math is element-wise, so the bits never depend on the thread count.
    max_exp_avg_sq: the AMSGrad maximum, or None.  The scalars are formed in
    double, as torch forms them in Python, then rounded to fp32."""
    cdef const ktsft_kernels *kern = ktsft_kernels_by_name(isa.encode())
    if kern == NULL:
        raise ValueError(f"ISA {isa!r} is not compiled in")
    cdef ktsft_adamw_hp hp
    cdef double bc1 = 1.0 - c_pow(beta1, step)  # libc pow: a real result, as Python's
    hp.decay = <float>(1.0 - lr * weight_decay)
    hp.lerp_weight = <float>(1.0 - beta1)
    hp.beta2 = <float>beta2
    hp.one_minus_beta2 = <float>(1.0 - beta2)
    hp.neg_step_size = <float>(-(lr / bc1))
    hp.inv_bc2_sqrt = <float>(1.0 / c_sqrt(1.0 - c_pow(beta2, step)))
    hp.eps = <float>eps
    hp.maximize = maximize
    cdef int64_t n = param.shape[0]
    if grad.shape[0] != n or exp_avg.shape[0] != n or exp_avg_sq.shape[0] != n or (
            max_exp_avg_sq is not None and max_exp_avg_sq.shape[0] != n):
        raise ValueError(f"adamw_step: param has {n} elements; grad, exp_avg, exp_avg_sq (and "
                         "max_exp_avg_sq) must have as many")
    if n == 0:
        return
    cdef float *p = &param[0]
    cdef const float *g = &grad[0]
    cdef float *m = &exp_avg[0]
    cdef float *v = &exp_avg_sq[0]
    cdef float *vmax = &max_exp_avg_sq[0] if max_exp_avg_sq is not None else NULL
    cdef int64_t nb = (n + ADAMW_BLOCK - 1) // ADAMW_BLOCK, b, lo, cnt
    cdef int nt = threads if threads > 1 and nb > 1 else 1
    with nogil:
        for b in prange(nb, schedule="static", num_threads=nt):
            lo = b * ADAMW_BLOCK
            cnt = n - lo if n - lo < ADAMW_BLOCK else ADAMW_BLOCK
            kern.adamw_f32(cnt, p + lo, g + lo, m + lo, v + lo,
                           vmax + lo if vmax != NULL else NULL, &hp)
