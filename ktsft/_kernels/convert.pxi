# Casts between the caller's float32 / bfloat16 arrays and the kernels'
# float32 buffers, with the finite check of the inputs fused in: multi-
# threaded passes over memory where numpy's casts and isfinite run on one
# core (included into moe_sft.pyx).  The Python side checks shapes and
# dtypes (ktsft/wrapper.py); the arrays' memory is checked again where it
# is bound (_arg: kind, contiguity, size).
from libc.string cimport memcpy

cdef enum:
    CAST_BLOCK = 65536  # elements per task


cdef int64_t _first_bad16(const uint16_t *s, int64_t lo, int64_t hi) noexcept nogil:
    cdef int64_t i
    cdef uint32_t any_bad = 0
    for i in range(lo, hi):  # an OR-reduction first: vectorisable
        any_bad |= (s[i] & 0x7f80u) == 0x7f80u
    if any_bad:
        for i in range(lo, hi):
            if (s[i] & 0x7f80u) == 0x7f80u:
                return i
    return -1


cdef enum:
    F32_INF = 0x7f800000      # |bits| from here: inf or NaN
    F32_BF16_INF = 0x7f7f8000  # |bits| from here: inf or NaN once rounded to bf16 (RNE)


cdef int64_t _first_bad32(const uint32_t *s, int64_t lo, int64_t hi, uint32_t lim) noexcept nogil:
    """First element whose magnitude bits reach `lim` (F32_INF: not finite;
    F32_BF16_INF: not finite in bf16)."""
    cdef int64_t i
    cdef uint32_t any_bad = 0
    for i in range(lo, hi):
        any_bad |= (s[i] & 0x7fffffffu) >= lim
    if any_bad:
        for i in range(lo, hi):
            if (s[i] & 0x7fffffffu) >= lim:
                return i
    return -1


def cast_checked(src, dst, int threads, str isa, bint check=True, bint bf16_range=False):
    """dst[:] = src for two C-contiguous arrays of the same size, each
    float32 or bfloat16 (itemsize 4 or 2); dst None: check only.  Returns
    the flat index of the first non-finite element of src (check=True), or
    -1; bf16_range: also of the first float32 element that is finite but
    becomes inf once rounded to bfloat16 (|v| >= 2^128 - 2^119, the values
    a bf16 layer rounds its inputs from).  dst is written whatever src
    holds; the caller decides what to do with it.  bf16 -> fp32 is exact,
    fp32 -> bf16 rounds to nearest even (the kernels' rounding)."""
    cdef const ktsft_kernels *kern = ktsft_kernels_by_name(isa.encode())
    if kern == NULL:
        raise ValueError(f"ISA {isa!r} is not compiled in")
    cdef int64_t n = src.size
    if n == 0:
        return -1
    if src.itemsize == 2:  # bfloat16 bits (ml_dtypes arrays: through a uint16 view)
        src = src.view("uint16")
    if dst is not None and dst.itemsize == 2:
        dst = dst.view("uint16")
    cdef int s16 = src.itemsize == 2
    cdef int d16 = dst is not None and dst.itemsize == 2
    cdef const void *sp = _arg(src, "cast source", K_U16 if s16 else K_F32, n, False, True)
    cdef void *dp = (_arg(dst, "cast target", K_U16 if d16 else K_F32, n, True, True)
                     if dst is not None else NULL)
    cdef int64_t nb = (n + CAST_BLOCK - 1) // CAST_BLOCK, b, lo, hi, i
    cdef int nt = threads if threads > 1 and nb > 1 else 1
    import numpy as np
    first = np.full(nb, -1, np.int64)
    cdef int64_t[::1] fb = first
    cdef uint32_t u
    cdef uint32_t lim = F32_BF16_INF if bf16_range else F32_INF
    with nogil:
        for b in prange(nb, schedule="static", num_threads=nt):
            lo = b * CAST_BLOCK
            hi = n if n - lo < CAST_BLOCK else lo + CAST_BLOCK
            if check:
                fb[b] = (_first_bad16(<const uint16_t *>sp, lo, hi) if s16
                         else _first_bad32(<const uint32_t *>sp, lo, hi, lim))
            if dp == NULL:
                continue
            if s16 == d16:
                memcpy(<char *>dp + lo * (2 if s16 else 4), <const char *>sp + lo * (2 if s16 else 4),
                       (hi - lo) * (2 if s16 else 4))
            elif s16:
                for i in range(lo, hi):
                    u = (<uint32_t>(<const uint16_t *>sp)[i]) << 16
                    memcpy(<uint32_t *>dp + i, &u, 4)
            else:
                kern.round_bf16(hi - lo, <const float *>sp + lo, <ktsft_bf16 *>dp + lo)
    if check:
        for b in range(nb):
            if fb[b] >= 0:
                return int(fb[b])
    return -1
