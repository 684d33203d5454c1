# The typed memory the kernels read and write, owned by the kernel module:
# a forward's cache entry and the scratch of one call, each sized from the
# layer's shape when it is made (ktsft/_kernels/cache.pxi; docs/cache.md).
# Others can cimport them:  from ktsft._kernels.moe_sft cimport CacheEntry
from libc.stdint cimport int32_t, int64_t, uint16_t


cdef class CacheEntry:
    cdef readonly int64_t capacity, E, H, I, k, r
    cdef readonly int64_t T            # tokens of the forward it holds (<= capacity)
    cdef public object dropout         # (p, seed) of that forward
    cdef readonly bint written         # holds a forward its backward has not consumed yet
    cdef readonly dict storage         # name -> the whole array (capacity tokens)
    cdef readonly dict arrays          # name -> its view for T tokens
    cdef float[:, ::1] x, G, U, xs_gate, xs_up, hs_down
    cdef int32_t[::1] offs, order, pair_tok, pair_tj, pos
    cdef float[::1] pair_w


cdef class Workspace:
    cdef readonly int64_t H, I, k, r
    cdef readonly int64_t T            # tokens it is sized for (grown on demand)
    cdef readonly bint bf16
    cdef public object lock
    cdef readonly dict arrays
    cdef object __weakref__
    cdef float[:, ::1] h32, ybuf, bds, gbs_gate, gbs_up, y32, do32
    cdef uint16_t[:, ::1] x_act, h_act, do_act, dg_act, du_act
