# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Native orchestration of the MoE-expert LoRA forward and backward.

Everything numeric happens here or in the per-ISA C kernels.  The work of
each phase is a flat list of (expert, block) tasks, largest experts first,
handed to OpenMP with dynamic scheduling.  Every output element has exactly
one owner task that reduces in a fixed order, so results are bitwise equal
for any thread count.  Inputs are validated in Python (ktsft.validation)
before anything here runs; on top of that every array crossing into this
module is checked where it is bound (``_arg``): its element type,
C-contiguity, writability where written, and that it holds at least what the
layer's shape needs, so a layout change on the Python side raises here
instead of becoming an out-of-bounds access in nogil code.
"""
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free, qsort
from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cython.parallel cimport parallel, prange

from ._openmp cimport (KTSFT_OPENMP, omp_get_max_threads, omp_get_num_threads,
                      omp_get_thread_num, ktsft_probe_threads)
from ._pools cimport (kt_pools, kt_pools_new, kt_pools_free, kt_pool_enter, kt_pool_leave,
                      kt_current_cpu, kt_fetch_add)
from .kernels cimport (ktsft_kernels, ktsft_bf16, ktsft_gemm, ktsft_gemm_fn, KTSFT_W_F32,
                       KTSFT_W_BF16, KTSFT_W_Q8, KTSFT_W_Q4, ktsft_kernels_by_name, ktsft_amx_build,
                       ktsft_cpu_features, ktsft_probe_cpu, ktsft_amx_request,
                       ktsft_feature_mask, ktsft_isa_info, ktsft_isa_table, KT_NN_STREAM_MAX,
                       KT_NN_STREAM_FEW)


def isa_table():
    """The ISA builds (ktsft/_kernels/include/ktsft/isa_table.h, the one list),
    slowest first: name, whether it is built in, the CPU feature bits it
    needs, and what the base GEMMs run on in fp32 and in bf16."""
    cdef int n = 0, i
    cdef const ktsft_isa_info *t = ktsft_isa_table(&n)
    return tuple(dict(name=t[i].name.decode(), built=t[i].get != NULL, needs=t[i].needs,
                      fp32=t[i].fp32.decode(), bf16=t[i].bf16.decode()) for i in range(n))


ISA_ORDER = tuple(row["name"] for row in isa_table())

# block sizes: fixed, so the work split (and thus every rounding) never
# depends on the thread count
cdef enum:
    ROW_BLOCK = 64      # NT output rows per task
    AMX_ROW_BLOCK = 256  # the same on AMX tiles: the tokens' pack is amortised over more rows
    COL_BLOCK = 256     # NN output columns per task (one packed block)
    # AMX: 2 KiB runs of each weight row per task, streamed.  2048 columns
    # left DeepSeek-V3's dh (I = 2048) one task per expert, 16 for 16 threads:
    # on the lent Xeon 1024 took its backward from 161 to 129-140 ms (down_T
    # 53 -> 37-43 ms) and Qwen3's T = 2048 step from 135-151 to 130-136 ms;
    # 512 did no better (docs/performance.md).  Each output element is still
    # computed whole by one task, so the bits do not change.
    AMX_COL_BLOCK = 1024
    PAIR_BLOCK = 32     # (token, slot) pairs per task
    GRAD_BLOCK = 256    # LoRA-gradient rows/columns per task
    # Base-GEMM tasks of an expert with more pairs take them in near-equal
    # chunks of at most this many: a skewed router (a random-init Qwen3-MoE
    # sends a tenth of a layer's pairs to one expert) would otherwise leave
    # that expert's few tasks running alone on a core for most of the phase
    # (on AMX, dx was one task per expert).  Measured on the 16-core Xeon in
    # the whole model (docs/performance.md): Qwen3-30B-A3B 157 -> 224 tok/s
    # at 512 tokens, 228 -> 344 at 2048; a split only as deep as a per-thread
    # share needs gained less (185, 251).  Each output element is still
    # computed whole by one task, and the chunks depend only on the routing.
    PAIR_SPLIT = 256
    # With LoRA dropout the A gradients read masked inputs regenerated into
    # per-thread scratch: an expert's pairs x a column sub-block, the
    # sub-block narrowed so the slot holds about this many floats (1 MiB),
    # and never below one 16-float vector.  Each gradient element is still
    # summed over all its expert's pairs in one accumulator, so the bits do
    # not depend on the split (nor on the threads).
    DROP_GRAD_FLOATS = 262144


# --------------------------------------------------------------------------
# CPU features and the kernel table
# --------------------------------------------------------------------------
def cpu_features():
    """Features seen by CPUID and enabled by the OS (XGETBV)."""
    cdef ktsft_cpu_features f
    ktsft_probe_cpu(&f)
    return {
        "x86_64": bool(f.x86), "avx2": bool(f.avx2), "fma": bool(f.fma), "f16c": bool(f.f16c),
        "avx512f": bool(f.avx512f), "avx512dq": bool(f.avx512dq),
        "avx512bw": bool(f.avx512bw), "avx512vl": bool(f.avx512vl),
        "avx512_bf16": bool(f.avx512_bf16), "avx512_fp16": bool(f.avx512_fp16),
        "avx512_vnni": bool(f.avx512_vnni), "amx_tile": bool(f.amx_tile),
        "amx_bf16": bool(f.amx_bf16), "amx_int8": bool(f.amx_int8),
    }


def compiled_isas():
    """ISA builds linked into this extension."""
    return tuple(row["name"] for row in isa_table() if row["built"])


_AMX_STATUS = None


def amx_build():
    """0: no AMX build; 1: AMX tiles; 2: the C model of the tiles (development)."""
    return ktsft_amx_build()


def amx_status():
    """(usable, reason) for the AMX build on this CPU and OS.  The first call
    asks Linux for the tile-data state (once per process)."""
    global _AMX_STATUS
    cdef int err = 0, rc
    if _AMX_STATUS is not None:
        return _AMX_STATUS
    build = ktsft_amx_build()
    f = cpu_features()
    if build == 0:
        st = (False, "not built (the compiler has no AMX intrinsics)")
    elif build == 2:
        st = (f["avx512_bf16"], "C model of the tiles (KTSFT_AMX_EMULATE build, for development)"
              if f["avx512_bf16"] else "the emulated build needs AVX512-BF16")
    elif not (f["amx_tile"] and f["amx_bf16"]):
        st = (False, "no AMX-BF16: not in CPUID, or its state not enabled by the OS (XCR0)")
    elif not f["avx512_bf16"]:
        st = (False, "AMX without AVX512-BF16 (needed for the epilogues)")
    else:
        rc = ktsft_amx_request(&err)
        if rc == 0:
            st = (True, "tile data granted by the kernel (arch_prctl ARCH_REQ_XCOMP_PERM)")
        elif rc == -1:
            st = (False, "AMX permission request is implemented for Linux x86-64 only")
        else:
            import os
            st = (False, f"the kernel refused AMX tile data (arch_prctl: "
                         f"{os.strerror(err) if err else 'permission not reported'})")
    _AMX_STATUS = st
    return st


def runnable_isas():
    """Compiled ISA builds this CPU and OS can run, slowest first (the
    feature bits of the ISA table against the probe's; AMX also needs the
    tile data the OS grants: amx_status)."""
    cdef ktsft_cpu_features f
    ktsft_probe_cpu(&f)
    cdef unsigned have = ktsft_feature_mask(&f)
    return tuple(row["name"] for row in isa_table() if row["built"]
                 and (row["needs"] & ~have) == 0
                 and (row["name"] != "amx" or amx_status()[0]))


def openmp_enabled():
    return bool(KTSFT_OPENMP)


def openmp_max_threads():
    return omp_get_max_threads()


def probe_threads(int n, size_t stack_bytes=0):
    """Create n threads (stack_bytes each, 0: the default), all alive at
    once, and join them: 0 when that worked, else the errno of the first
    that failed.  ktsft._threads calls it before an OpenMP region would
    have to grow its team, because GNU OpenMP exits the process when it
    cannot create a thread."""
    if n < 0:
        raise ValueError(f"probe_threads: n={n} < 0")
    cdef int err
    with nogil:
        err = ktsft_probe_threads(n, stack_bytes)
    return err


# --------------------------------------------------------------------------
# Per-layer state and per-call arrays, as plain C structs for nogil code
# --------------------------------------------------------------------------
cdef struct Layer:
    const ktsft_kernels *kern
    ktsft_gemm_fn nt         # the base products of this layer's weight kind
    ktsft_gemm_fn nn
    int64_t E, H, I, r, k
    bint bf16                # activations read by the base GEMMs are bf16
    bint q8                  # base weights are int8 with per-row scales
    bint q4                  # base weights are int4 with per-group scales
    int64_t wbits            # bits per base-weight element
    int64_t group            # quantization group along a row's inputs
    int64_t ng_in_h          # scale groups per row of gate/up (inputs: H)
    int64_t ng_in_i          # scale groups per row of down (inputs: I)
    int64_t nt_rows          # NT output rows per task (per ISA, never per thread count)
    int64_t nn_cols          # NN output columns per task (likewise)
    int64_t nn_whole_upto    # experts with at most this many pairs: one NN task per row span
    float scaling
    const void *w_gate       # [E, I, H] physical slots, fp32 or bf16
    const void *w_up         # [E, I, H]
    const void *w_down       # [E, H, I]
    # elements from one expert's weights to the next: I*H, I*H, H*I when each
    # projection is its own [E, ., .] array; 2*I*H for gate and up read in
    # place from a fused [E, 2I, H] gate_up_proj (rows stay contiguous)
    int64_t es_gate
    int64_t es_up
    int64_t es_down
    const int32_t *slot      # logical expert -> physical slot
    const float *s_gate      # [E, I, ng_in_h] scales of quantized weights
    const float *s_up        # [E, I, ng_in_h]
    const float *s_down      # [E, H, ng_in_i]
    const float *a_gate      # [E, r, H]
    const float *b_gate      # [E, I, r]
    const float *a_up
    const float *b_up
    const float *a_down      # [E, r, I]
    const float *b_down      # [E, H, r]
    # NUMA pools (threadpool_count > 1; docs/dispatch.md): each physical
    # slot's experts belong to one pool, whose threads run its tasks first
    int npools               # 1: one pool, the plain dynamic schedule
    const int32_t *slot_pool # [E] pool of each physical slot
    const kt_pools *pools    # the CPU set of each pool


cdef struct Step:
    int64_t T, P
    const int32_t *offs      # [E + 1] first pair of each expert
    const int32_t *pair_tok  # [P] token of each pair (pairs sorted by expert)
    const int32_t *pair_tj   # [P] t * k + j of each pair
    const float *pair_w      # [P] routing weight of each pair
    const int32_t *pos       # [T * k] pair of each (t, j)
    const float *rw          # [T, k]
    const float *x32         # [T, H]
    const void *x_act        # [T, H] what the base GEMMs read (bf16 copy or x32)
    float *G                 # [P, I] cache; backward turns it into dG
    float *U                 # [P, I] cache; backward turns it into dU
    float *xs_g              # [P, r] s * A_gate x
    float *xs_u              # [P, r] s * A_up x
    float *hs                # [P, r] s * A_down h
    float *h32               # [P, I] work: h (forward), dh then h (backward)
    void *h_act              # [P, I] work: h as the down GEMM reads it
    float *ybuf              # [P, H] work: y (forward), dx per pair (backward)
    float *out               # [T, H]
    const float *do32        # [T, H]
    const void *do_act       # [T, H]
    void *dg_act             # [P, I]
    void *du_act             # [P, I]
    float *bds               # [P, r] s * B_down^T dO
    float *gbs_g             # [P, r] s * B_gate^T dG
    float *gbs_u             # [P, r] s * B_up^T dU
    float *grad_w            # [T, k]
    float *g_ag
    float *g_bg
    float *g_au
    float *g_bu
    float *g_ad
    float *g_bd
    bint accum               # add the LoRA gradients to g_* (gradient accumulation)
    # LoRA dropout (docs/derivation.md): masks regenerated from the seed
    bint drop                # on for this call (training, p > 0)
    uint64_t drop_seed
    uint32_t drop_thr        # element kept when its hash >= floor(p * 2^32)
    float drop_inv           # 1 / (1 - p)


cdef struct Task:
    int32_t e
    int32_t part
    int64_t lo
    int64_t hi
    int64_t p0   # the pairs this task covers: the expert's own [offs[e], offs[e+1])
    int64_t p1   # or, for an expert with many pairs, one chunk of them


cdef inline const void *_expert_w(const Layer *L, const void *base, int64_t e,
                                  int64_t per_expert) noexcept nogil:
    return <const char *>base + <int64_t>L.slot[e] * per_expert * L.wbits // 8


cdef inline const void *_woff(const Layer *L, const void *base, int64_t elems) noexcept nogil:
    # int4: element offsets are even (rows and column blocks)
    return <const char *>base + elems * L.wbits // 8


cdef inline const float *_scales(const Layer *L, const float *base, int64_t e, int64_t rows,
                                 int64_t ngroups) noexcept nogil:
    return base + <int64_t>L.slot[e] * rows * ngroups if base != NULL else NULL


cdef inline const float *_nn_scales(const Layer *L, const float *base, int64_t e, int64_t rows,
                                    int64_t ngroups, int64_t col0) noexcept nogil:
    """Scales for an NN product over columns [col0, ...) of W: int4 column
    blocks start on a group boundary (blocks are multiples of 256)."""
    if base == NULL:
        return NULL
    return _scales(L, base, e, rows, ngroups) + (col0 // L.group if L.q4 else 0)


cdef inline const void *_off(const Layer *L, const void *base, int64_t elems) noexcept nogil:
    """An activation buffer's element `elems` (bf16 or fp32)."""
    cdef int64_t esz = 2 if L.bf16 else 4
    return <const char *>base + elems * esz


cdef inline void _nt(const Layer *L, int64_t M, int64_t N, int64_t K, const void *A, int64_t lda,
                     const int32_t *arows, const void *W, int64_t ldw, int64_t K2, const float *A2,
                     int64_t lda2, const float *W2, int64_t ldw2, float *C,
                     int64_t ldc, const float *ws) noexcept nogil:
    """A base NT product of the layer's weight kind (L.nt, chosen at build)."""
    cdef ktsft_gemm g
    g.M, g.N, g.K, g.A, g.lda, g.arows, g.W, g.ldw = M, N, K, A, lda, arows, W, ldw
    g.K2, g.A2, g.lda2, g.W2, g.ldw2, g.C, g.ldc, g.accumulate = K2, A2, lda2, W2, ldw2, C, ldc, 0
    # the scale groups run along the rows' inputs (K): int8 one per row
    g.wscale = ws
    g.group = L.group if L.q4 else K
    g.sld = K // L.group if L.q4 else 1
    L.nt(&g)


cdef inline void _nn(const Layer *L, int64_t M, int64_t N, int64_t O, const void *A, int64_t lda,
                     const int32_t *arows, const void *W, int64_t ldw, int64_t O2, const float *A2,
                     int64_t lda2, const float *W2, int64_t ldw2, float *C, int64_t ldc,
                     int accumulate, const float *ws) noexcept nogil:
    """A base NN product of the layer's weight kind (L.nn, chosen at build)."""
    cdef ktsft_gemm g
    g.M, g.N, g.K, g.A, g.lda, g.arows, g.W, g.ldw = M, N, O, A, lda, arows, W, ldw
    g.K2, g.A2, g.lda2, g.W2, g.ldw2, g.C, g.ldc = O2, A2, lda2, W2, ldw2, C, ldc
    g.accumulate = accumulate
    # NN: the quantization groups run along W's columns (its inputs), ldw long
    g.wscale = ws
    g.group = L.group if L.q4 else ldw
    g.sld = ldw // L.group if L.q4 else 1
    L.nn(&g)


cdef inline void _lora(const Layer *L, bint nn, int64_t M, int64_t N, int64_t K,
                       const float *A, int64_t lda, const int32_t *arows, const float *W,
                       int64_t ldw, float *C, int64_t ldc) noexcept nogil:
    """An fp32 LoRA product, C = A[rows] W^T (NT) or A[rows] W (nn; C
    overwritten): the fp32 entry points of the table, no second term."""
    cdef ktsft_gemm g
    memset(&g, 0, sizeof(ktsft_gemm))
    g.M, g.N, g.K, g.A, g.lda, g.arows, g.W, g.ldw = M, N, K, A, lda, arows, W, ldw
    g.C, g.ldc = C, ldc
    if nn:
        L.kern.nn[KTSFT_W_F32](&g)
    else:
        L.kern.nt[KTSFT_W_F32](&g)


cdef inline void _drop(const Layer *L, const Step *S, int32_t proj, int64_t p, int64_t i0,
                       int64_t n, const float *x, float *out, int accumulate) noexcept nogil:
    """out[:n] (+)= mask(proj, pair p)[i0:i0 + n] * x[:n], mask in {0, 1/(1-p)}."""
    L.kern.dropout_f32(n, S.drop_seed, proj, S.pair_tj[p], i0, S.drop_thr, S.drop_inv, x, out,
                       accumulate)


cdef enum:
    PROJ_GATE = 0
    PROJ_UP = 1
    PROJ_DOWN = 2


cdef inline void _scale(float *x, int64_t n, float s) noexcept nogil:
    cdef int64_t i
    for i in range(n):
        x[i] *= s


# --------------------------------------------------------------------------
# Routing and task lists
# --------------------------------------------------------------------------
cdef void _route(int64_t T, int64_t k, int64_t E, const int32_t *ids, const float *rw,
                 int32_t *offs, int32_t *pair_tok, int32_t *pair_tj, float *pair_w,
                 int32_t *pos, int32_t *cursor) noexcept nogil:
    """Counting sort of the (token, slot) pairs by expert, stable in t then j."""
    cdef int64_t e, t, j, q, i
    for e in range(E + 1):
        offs[e] = 0
    for i in range(T * k):
        offs[ids[i] + 1] += 1
    for e in range(E):
        offs[e + 1] += offs[e]
        cursor[e] = offs[e]
    for t in range(T):
        for j in range(k):
            i = t * k + j
            e = ids[i]
            q = cursor[e]
            cursor[e] += 1
            pair_tok[q] = <int32_t>t
            pair_tj[q] = <int32_t>i
            pair_w[q] = rw[i]
            pos[i] = <int32_t>q


cdef int _cmp_i64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0], y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


cdef int64_t _expert_order(int64_t E, const int32_t *offs, int32_t *order) noexcept nogil:
    """Experts with tokens, most tokens first (ties by id); returns how many."""
    cdef int64_t *keys = <int64_t *>_alloc(max(E, 1) * sizeof(int64_t))
    cdef int64_t e, n = 0, cnt
    if keys == NULL:
        return -1
    for e in range(E):
        cnt = offs[e + 1] - offs[e]
        if cnt > 0:
            keys[n] = ((<int64_t>(1 << 30) - cnt) << 32) | e
            n += 1
    qsort(keys, n, sizeof(int64_t), _cmp_i64)
    for e in range(n):
        order[e] = <int32_t>(keys[e] & <int64_t>0x7fffffff)
    free(keys)
    return n


cdef inline int64_t _block(int64_t blk, int64_t d, int64_t count, int64_t whole_upto) noexcept nogil:
    # few tokens: memory-bound, so a task streams whole weight rows
    return d if count <= whole_upto else blk


cdef inline int64_t _pair_chunks(int64_t count, int64_t split) noexcept nogil:
    """How many near-equal chunks an expert's `count` pairs are taken in."""
    if split <= 0 or count <= split:
        return 1
    return (count + split - 1) // split


cdef Task *_blocks(int64_t n_exp, const int32_t *order, const int32_t *offs, int nparts,
                   const int64_t *dims, const int64_t *blocks, bint over_pairs,
                   int64_t *ntasks, int64_t whole_upto=0, int64_t pair_split=0) noexcept nogil:
    """Tasks (expert, part, [lo, hi), pairs [p0, p1)) over each part's
    dimension in fixed blocks; over_pairs: the dimension is the expert's own
    pair range; experts with at most whole_upto pairs get one task spanning
    the dimension; pair_split > 0: an expert with more pairs is also split
    over its pairs, in near-equal chunks of at most pair_split rounded up to
    16 (each output element is still computed whole by one task, so the
    split changes no bits).  Block sizes depend only on the routing, never on
    the thread count."""
    cdef int64_t cap = 0, i, e, d, lo, hi, n = 0, base, blk, cnt, nch, c, q0, q1, csz
    cdef int part
    for i in range(n_exp):
        e = order[i]
        cnt = offs[e + 1] - offs[e]
        nch = 1 if over_pairs else _pair_chunks(cnt, pair_split)
        for part in range(nparts):
            d = cnt if over_pairs else dims[part]
            blk = _block(blocks[part], d, cnt, whole_upto)
            cap += nch * ((d + blk - 1) // blk)
    cdef Task *tasks = <Task *>_alloc(max(cap, 1) * sizeof(Task))
    if tasks == NULL:
        ntasks[0] = -1
        return NULL
    for i in range(n_exp):
        e = order[i]
        cnt = offs[e + 1] - offs[e]
        nch = 1 if over_pairs else _pair_chunks(cnt, pair_split)
        csz = (cnt + nch - 1) // nch
        csz = (csz + 15) // 16 * 16
        for c in range(nch):
            q0 = offs[e] + min(c * csz, cnt)
            q1 = offs[e] + min((c + 1) * csz, cnt)
            if q1 <= q0:
                continue
            for part in range(nparts):
                base = offs[e] if over_pairs else 0
                d = cnt if over_pairs else dims[part]
                blk = _block(blocks[part], d, cnt, whole_upto)
                lo = 0
                while lo < d:
                    hi = min(lo + blk, d)
                    tasks[n].e = <int32_t>e
                    tasks[n].part = part
                    tasks[n].lo = base + lo
                    tasks[n].hi = base + hi
                    tasks[n].p0 = q0
                    tasks[n].p1 = q1
                    n += 1
                    lo = hi
    ntasks[0] = n
    return tasks


# --------------------------------------------------------------------------
# Forward phases (one function per task kind)
# --------------------------------------------------------------------------
cdef void _f_lora_a_in(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """xs_{g,u}[p] = s * A_{g,u}[e] x_p for a block of pairs; with dropout,
    A reads the masked rows m_{g,u} * x_p (scr: PAIR_BLOCK x H)."""
    cdef int64_t e = t.e, lo = t.lo, n = t.hi - t.lo, r = L.r, H = L.H, q
    if S.drop:
        for q in range(n):
            _drop(L, S, PROJ_GATE, lo + q, 0, H, S.x32 + S.pair_tok[lo + q] * H, scr + q * H, 0)
        _lora(L, False, n, r, H, scr, H, NULL, L.a_gate + e * r * H, H, S.xs_g + lo * r, r)
        for q in range(n):
            _drop(L, S, PROJ_UP, lo + q, 0, H, S.x32 + S.pair_tok[lo + q] * H, scr + q * H, 0)
        _lora(L, False, n, r, H, scr, H, NULL, L.a_up + e * r * H, H, S.xs_u + lo * r, r)
    else:
        _lora(L, False, n, r, H, S.x32, H, S.pair_tok + lo, L.a_gate + e * r * H, H,
                 S.xs_g + lo * r, r)
        _lora(L, False, n, r, H, S.x32, H, S.pair_tok + lo, L.a_up + e * r * H, H,
                 S.xs_u + lo * r, r)
    _scale(S.xs_g + lo * r, n * r, L.scaling)
    _scale(S.xs_u + lo * r, n * r, L.scaling)


cdef void _f_gate_up(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """G or U rows [lo, hi) of one expert: W x + B (s A x)."""
    cdef int64_t e = t.e, off = t.p0, n = t.p1 - t.p0
    cdef int64_t H = L.H, I = L.I, r = L.r, lo = t.lo, nb = t.hi - t.lo
    cdef const void *W = L.w_gate if t.part == 0 else L.w_up
    cdef const float *B = L.b_gate if t.part == 0 else L.b_up
    cdef float *xs = S.xs_g if t.part == 0 else S.xs_u
    cdef float *C = S.G if t.part == 0 else S.U
    cdef const float *ws = _scales(L, L.s_gate if t.part == 0 else L.s_up, e, I, L.ng_in_h)
    _nt(L, n, nb, H, S.x_act, H, S.pair_tok + off, _woff(L, _expert_w(L, W, e, L.es_gate if t.part == 0 else L.es_up), lo * H), H,
        r, xs + off * r, r, B + e * I * r + lo * r, r, C + off * I + lo, I,
        ws + lo * L.ng_in_h if ws != NULL else NULL)


cdef void _f_swiglu(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """h = silu(g) u for a block of pairs, then hs = s * A_down h (fp32 h);
    with dropout A_down reads m_d * h (scr: PAIR_BLOCK x I)."""
    cdef int64_t p, I = L.I, r = L.r, lo = t.lo, n = t.hi - t.lo
    for p in range(lo, t.hi):
        L.kern.swiglu_forward(I, S.G + p * I, S.U + p * I, S.h32 + p * I,
                              (<ktsft_bf16 *>S.h_act) + p * I if L.bf16 else NULL)
    if S.drop:
        for p in range(lo, t.hi):
            _drop(L, S, PROJ_DOWN, p, 0, I, S.h32 + p * I, scr + (p - lo) * I, 0)
        _lora(L, False, n, r, I, scr, I, NULL, L.a_down + t.e * r * I, I, S.hs + lo * r, r)
    else:
        _lora(L, False, n, r, I, S.h32 + lo * I, I, NULL, L.a_down + t.e * r * I, I,
                 S.hs + lo * r, r)
    _scale(S.hs + lo * r, n * r, L.scaling)


cdef void _f_down(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """y rows [lo, hi) of H for one expert: W_down h + B_down hs."""
    cdef int64_t e = t.e, off = t.p0, n = t.p1 - t.p0
    cdef int64_t H = L.H, I = L.I, r = L.r, lo = t.lo, nb = t.hi - t.lo
    cdef const float *ws = _scales(L, L.s_down, e, H, L.ng_in_i)
    _nt(L, n, nb, I, _off(L, S.h_act, off * I), I, NULL,
        _woff(L, _expert_w(L, L.w_down, e, L.es_down), lo * I), I,
        r, S.hs + off * r, r, L.b_down + e * H * r + lo * r, r, S.ybuf + off * H + lo, H,
        ws + lo * L.ng_in_i if ws != NULL else NULL)


# --------------------------------------------------------------------------
# Backward phases
# --------------------------------------------------------------------------
cdef void _b_lora_b_down(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """bds[p] = s * B_down[e]^T dO_t (unweighted) for a block of pairs."""
    cdef int64_t lo = t.lo, n = t.hi - t.lo, r = L.r, H = L.H
    _lora(L, True, n, r, H, S.do32, H, S.pair_tok + lo, L.b_down + t.e * H * r, r,
             S.bds + lo * r, r)
    _scale(S.bds + lo * r, n * r, L.scaling)


cdef void _lora_nn_masked(const Layer *L, const Step *S, int32_t proj, int64_t off, int64_t n,
                          int64_t lo, int64_t nb, const float *Z, const float *A, int64_t lda,
                          float *C, int64_t ldc, float *scr) noexcept nogil:
    """C[p, lo:lo+nb] += m_proj(p)[lo:lo+nb] * (Z[p] A[:, lo:lo+nb]) for the
    pairs [off, off + n): Z [P, r] (already scaled by s), A the expert's
    LoRA A at column lo.  Chunks of PAIR_BLOCK pairs through scr
    (PAIR_BLOCK x nb); each C element gets one add, in a fixed order."""
    cdef int64_t c0, nc, q, r = L.r
    c0 = 0
    while c0 < n:
        nc = min(<int64_t>PAIR_BLOCK, n - c0)
        _lora(L, True, nc, nb, r, Z + (off + c0) * r, r, NULL, A, lda, scr, nb)
        for q in range(nc):
            _drop(L, S, proj, off + c0 + q, lo, nb, scr + q * nb, C + (off + c0 + q) * ldc, 1)
        c0 += nc


cdef void _b_down(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """dh (unweighted) columns [lo, hi) of I: W_down^T dO + A_down^T bds
    (with dropout: + m_d * A_down^T bds, added after the base product)."""
    cdef int64_t e = t.e, off = t.p0, n = t.p1 - t.p0
    cdef int64_t H = L.H, I = L.I, r = L.r, lo = t.lo, nb = t.hi - t.lo
    if S.drop:
        _nn(L, n, nb, H, S.do_act, H, S.pair_tok + off,
            _woff(L, _expert_w(L, L.w_down, e, L.es_down), lo), I,
            0, NULL, 0, NULL, 0, S.h32 + off * I + lo, I, 0,
            _nn_scales(L, L.s_down, e, H, L.ng_in_i, lo))
        _lora_nn_masked(L, S, PROJ_DOWN, off, n, lo, nb, S.bds, L.a_down + e * r * I + lo, I,
                        S.h32 + lo, I, scr)
        return
    _nn(L, n, nb, H, S.do_act, H, S.pair_tok + off,
        _woff(L, _expert_w(L, L.w_down, e, L.es_down), lo), I,
        r, S.bds + off * r, r, L.a_down + e * r * I + lo, I, S.h32 + off * I + lo, I, 0,
        _nn_scales(L, L.s_down, e, H, L.ng_in_i, lo))


cdef void _b_swiglu(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """Routing-weight gradient, dG and dU for a block of pairs; then the LoRA-B
    projections of dG and dU."""
    cdef int64_t p, I = L.I, r = L.r, lo = t.lo, n = t.hi - t.lo
    for p in range(lo, t.hi):
        S.grad_w[S.pair_tj[p]] = L.kern.swiglu_backward(I, S.pair_w[p], S.G + p * I,
                                                        S.U + p * I, S.h32 + p * I)
        if L.bf16:
            L.kern.round_bf16(I, S.G + p * I, (<ktsft_bf16 *>S.dg_act) + p * I)
            L.kern.round_bf16(I, S.U + p * I, (<ktsft_bf16 *>S.du_act) + p * I)
    _lora(L, True, n, r, I, S.G + lo * I, I, NULL, L.b_gate + t.e * I * r, r,
             S.gbs_g + lo * r, r)
    _lora(L, True, n, r, I, S.U + lo * I, I, NULL, L.b_up + t.e * I * r, r,
             S.gbs_u + lo * r, r)
    _scale(S.gbs_g + lo * r, n * r, L.scaling)
    _scale(S.gbs_u + lo * r, n * r, L.scaling)


cdef void _b_input(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """dx per pair, columns [lo, hi) of H: W_gate^T dG + W_up^T dU + LoRA terms
    (with dropout: base products first, then m_g * A_gate^T gbs_g, then
    m_u * A_up^T gbs_u)."""
    cdef int64_t e = t.e, off = t.p0, n = t.p1 - t.p0
    cdef int64_t H = L.H, I = L.I, r = L.r, lo = t.lo, nb = t.hi - t.lo
    if S.drop:
        _nn(L, n, nb, I, _off(L, S.dg_act, off * I), I, NULL,
            _woff(L, _expert_w(L, L.w_gate, e, L.es_gate), lo), H,
            0, NULL, 0, NULL, 0, S.ybuf + off * H + lo, H, 0,
            _nn_scales(L, L.s_gate, e, I, L.ng_in_h, lo))
        _nn(L, n, nb, I, _off(L, S.du_act, off * I), I, NULL,
            _woff(L, _expert_w(L, L.w_up, e, L.es_up), lo), H,
            0, NULL, 0, NULL, 0, S.ybuf + off * H + lo, H, 1,
            _nn_scales(L, L.s_up, e, I, L.ng_in_h, lo))
        _lora_nn_masked(L, S, PROJ_GATE, off, n, lo, nb, S.gbs_g, L.a_gate + e * r * H + lo, H,
                        S.ybuf + lo, H, scr)
        _lora_nn_masked(L, S, PROJ_UP, off, n, lo, nb, S.gbs_u, L.a_up + e * r * H + lo, H,
                        S.ybuf + lo, H, scr)
        return
    _nn(L, n, nb, I, _off(L, S.dg_act, off * I), I, NULL,
        _woff(L, _expert_w(L, L.w_gate, e, L.es_gate), lo), H,
        r, S.gbs_g + off * r, r, L.a_gate + e * r * H + lo, H, S.ybuf + off * H + lo, H, 0,
        _nn_scales(L, L.s_gate, e, I, L.ng_in_h, lo))
    _nn(L, n, nb, I, _off(L, S.du_act, off * I), I, NULL,
        _woff(L, _expert_w(L, L.w_up, e, L.es_up), lo), H,
        r, S.gbs_u + off * r, r, L.a_up + e * r * H + lo, H, S.ybuf + off * H + lo, H, 1,
        _nn_scales(L, L.s_up, e, I, L.ng_in_h, lo))


cdef inline int64_t _drop_cols(int64_t n, int64_t nb) noexcept nogil:
    """Columns of one masked sub-block for an expert of n pairs (<= nb)."""
    cdef int64_t w = (DROP_GRAD_FLOATS // max(n, <int64_t>1)) & ~(<int64_t>15)
    return min(nb, max(w, <int64_t>16))


cdef void _b_lora_grads(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil:
    """One block of one expert's LoRA gradient (part selects the matrix).
    With dropout the A gradients read the masked inputs, regenerated into
    scr (the expert's pairs x a column sub-block: _drop_cols)."""
    cdef int64_t e = t.e, off = S.offs[t.e], n = S.offs[t.e + 1] - off
    cdef int64_t H = L.H, I = L.I, r = L.r, lo = t.lo, nb = t.hi - t.lo, q, c0, w
    if S.drop and (t.part == 0 or t.part == 1 or t.part == 4):
        # grad A_{gate,up}[:, c] = sum_p gbs[p] (x) m x_p[c];
        # grad A_down[:, c] = sum_p w_p bds[p] (x) m_d h_p[c]
        w = _drop_cols(n, nb)
        c0 = lo
        while c0 < lo + nb:
            w = min(w, lo + nb - c0)
            for q in range(n):
                if t.part == 4:
                    _drop(L, S, PROJ_DOWN, off + q, c0, w, S.h32 + (off + q) * I + c0,
                          scr + q * w, 0)
                else:
                    _drop(L, S, PROJ_GATE if t.part == 0 else PROJ_UP, off + q, c0, w,
                          S.x32 + S.pair_tok[off + q] * H + c0, scr + q * w, 0)
            if t.part == 4:
                L.kern.outer_f32(n, r, w, S.bds + off * r, r, NULL, S.pair_w + off, scr, w,
                                 NULL, S.g_ad + e * r * I + c0, I, S.accum)
            else:
                L.kern.outer_f32(n, r, w, (S.gbs_g if t.part == 0 else S.gbs_u) + off * r, r,
                                 NULL, NULL, scr, w, NULL,
                                 (S.g_ag if t.part == 0 else S.g_au) + e * r * H + c0, H,
                                 S.accum)
            c0 += w
    elif t.part == 0:      # grad A_gate[:, lo:hi] = sum_p gbs_g[p] (x) x_p
        L.kern.outer_f32(n, r, nb, S.gbs_g + off * r, r, NULL, NULL, S.x32 + lo, H,
                         S.pair_tok + off, S.g_ag + e * r * H + lo, H, S.accum)
    elif t.part == 1:    # grad A_up
        L.kern.outer_f32(n, r, nb, S.gbs_u + off * r, r, NULL, NULL, S.x32 + lo, H,
                         S.pair_tok + off, S.g_au + e * r * H + lo, H, S.accum)
    elif t.part == 2:    # grad B_gate[lo:hi] = sum_p dG_p (x) xs_g[p]
        L.kern.outer_f32(n, nb, r, S.G + off * I + lo, I, NULL, NULL, S.xs_g + off * r, r,
                         NULL, S.g_bg + e * I * r + lo * r, r, S.accum)
    elif t.part == 3:    # grad B_up
        L.kern.outer_f32(n, nb, r, S.U + off * I + lo, I, NULL, NULL, S.xs_u + off * r, r,
                         NULL, S.g_bu + e * I * r + lo * r, r, S.accum)
    elif t.part == 4:    # grad A_down[:, lo:hi] = sum_p w_p bds[p] (x) h_p
        L.kern.outer_f32(n, r, nb, S.bds + off * r, r, NULL, S.pair_w + off,
                         S.h32 + off * I + lo, I, NULL, S.g_ad + e * r * I + lo, I, S.accum)
    else:                # grad B_down[lo:hi] = sum_p w_p dO_t (x) hs[p]
        L.kern.outer_f32(n, nb, r, S.do32 + lo, H, S.pair_tok + off, S.pair_w + off,
                         S.hs + off * r, r, NULL, S.g_bd + e * H * r + lo * r, r, S.accum)


cdef void _zero_expert_grads(const Layer *L, const Step *S, int64_t e) noexcept nogil:
    cdef int64_t H = L.H, I = L.I, r = L.r
    memset(S.g_ag + e * r * H, 0, r * H * sizeof(float))
    memset(S.g_au + e * r * H, 0, r * H * sizeof(float))
    memset(S.g_bg + e * I * r, 0, I * r * sizeof(float))
    memset(S.g_bu + e * I * r, 0, I * r * sizeof(float))
    memset(S.g_ad + e * r * I, 0, r * I * sizeof(float))
    memset(S.g_bd + e * H * r, 0, H * r * sizeof(float))


# --------------------------------------------------------------------------
# The phase table: what each parallel phase of forward and backward runs
# --------------------------------------------------------------------------
ctypedef void (*TaskFn)(const Layer *L, const Step *S, const Task *t, float *scr) noexcept nogil

cdef enum:  # how a phase's work is cut into tasks
    SPLIT_PAIRS = 0  # blocks of PAIR_BLOCK of each expert's (token, slot) pairs
    SPLIT_NT = 1     # blocks of L.nt_rows output rows of a base NT product
    SPLIT_NN = 2     # blocks of L.nn_cols output columns of a base NN product
    SPLIT_GRAD = 3   # blocks of GRAD_BLOCK rows / columns of a LoRA gradient
cdef enum:  # the dimension a part's blocks cut
    DIM_NONE = 0
    DIM_H = 1
    DIM_I = 2

cdef struct Phase:
    TaskFn fn
    int nparts       # tasks of each block, one per part (gate/up, or the six gradients)
    int split        # SPLIT_*
    int dims[6]      # DIM_* of each part (SPLIT_NT / NN / GRAD)
    bint base_gemm   # a base product: hot experts' pairs in chunks (PAIR_SPLIT)
    bint masked      # with dropout its tasks regenerate masked inputs into scratch


cdef Phase _phase(TaskFn fn, int nparts, int split, int d0, int d1, int d2, int d3, int d4,
                  int d5, bint base_gemm, bint masked) noexcept:
    cdef Phase ph
    ph.fn, ph.nparts, ph.split = fn, nparts, split
    ph.dims[0], ph.dims[1], ph.dims[2], ph.dims[3], ph.dims[4], ph.dims[5] = d0, d1, d2, d3, d4, d5
    ph.base_gemm, ph.masked = base_gemm, masked
    return ph


# The parallel phases, in order (the serial ones, routing, bf16 rounding and
# the combine, run around them: see forward/backward); each phase's name in
# FORWARD_PHASES / BACKWARD_PHASES, between those of the serial ones.
#   function, parts, split, the parts' dimensions, base product, masked input
cdef enum:
    N_FWD = 4
    N_BWD = 5
    _ = DIM_NONE  # a part without a dimension (over pairs, or no such part)
cdef Phase _FWD[N_FWD]
cdef Phase _BWD[N_BWD]
_FWD[0] = _phase(_f_lora_a_in, 1, SPLIT_PAIRS, _, _, _, _, _, _, False, True)  # xs = s A x
_FWD[1] = _phase(_f_gate_up, 2, SPLIT_NT, DIM_I, DIM_I, _, _, _, _, True, False)  # G, U
_FWD[2] = _phase(_f_swiglu, 1, SPLIT_PAIRS, _, _, _, _, _, _, False, True)  # h, s A_d h
_FWD[3] = _phase(_f_down, 1, SPLIT_NT, DIM_H, _, _, _, _, _, True, False)  # y of each pair
_BWD[0] = _phase(_b_lora_b_down, 1, SPLIT_PAIRS, _, _, _, _, _, _, False, False)  # s B_d^T dO
_BWD[1] = _phase(_b_down, 1, SPLIT_NN, DIM_I, _, _, _, _, _, True, True)  # dh
_BWD[2] = _phase(_b_swiglu, 1, SPLIT_PAIRS, _, _, _, _, _, _, False, False)  # dG, dU, grad_w
_BWD[3] = _phase(_b_input, 1, SPLIT_NN, DIM_H, _, _, _, _, _, True, True)  # dx of each pair
_BWD[4] = _phase(_b_lora_grads, 6, SPLIT_GRAD, DIM_H, DIM_H, DIM_I, DIM_I, DIM_I, DIM_H,
                 False, True)  # the six LoRA gradients


cdef inline int64_t _dim(const Layer *L, int kind) noexcept nogil:
    return L.H if kind == DIM_H else (L.I if kind == DIM_I else 0)


cdef struct Plan:  # one phase's work, made before any phase runs
    Task *tasks
    int64_t ntasks
    int64_t per      # dropout scratch: floats per thread slot (0: none)
    int nslots       # threads the phase runs on
    # with pools: tasks grouped by pool, pool q's are [off[q], off[q + 1]);
    # off[npools + 1 + q]: pool q's cursor (the next of its tasks to take)
    int64_t *off
    int64_t stolen   # tasks run by a thread of another pool than theirs


cdef int _plan(const Phase *ph, const Layer *L, const Step *S, int64_t n_exp,
               const int32_t *order, int n_threads, Plan *p) noexcept nogil:
    """One phase's tasks (_blocks) and the scratch it needs.  -1: out of memory."""
    cdef int64_t i, e, blk
    cdef int part
    cdef int64_t dims[6]
    cdef int64_t blocks[6]
    blk = (PAIR_BLOCK if ph.split == SPLIT_PAIRS else L.nt_rows if ph.split == SPLIT_NT else
           L.nn_cols if ph.split == SPLIT_NN else GRAD_BLOCK)
    for part in range(6):
        dims[part] = _dim(L, ph.dims[part])
        blocks[part] = blk
    # experts of few pairs stream whole weight rows (memory-bound NN products)
    cdef int64_t whole_upto = L.nn_whole_upto if ph.split == SPLIT_NN else 0
    p.per, p.nslots = 0, n_threads
    p.tasks = _blocks(n_exp, order, S.offs, ph.nparts, dims, blocks,
                      ph.split == SPLIT_PAIRS, &p.ntasks, whole_upto,
                      PAIR_SPLIT if ph.base_gemm else 0)
    if p.ntasks < 0:
        return -1
    if L.npools > 1 and _group_by_pool(L, p) < 0:
        return -1
    if S.drop and ph.masked:
        # masked LoRA inputs are regenerated into per-thread scratch
        if ph.split == SPLIT_GRAD:   # an expert's pairs x one column sub-block
            for e in range(L.E):
                i = S.offs[e + 1] - S.offs[e]
                p.per = max(p.per, i * _drop_cols(i, GRAD_BLOCK))
        else:                        # PAIR_BLOCK pairs x a row or column block
            p.per = PAIR_BLOCK * max(L.H, L.I)
        p.nslots = <int>max(<int64_t>1, min(<int64_t>n_threads, p.ntasks))
    return 0


cdef int _group_by_pool(const Layer *L, Plan *p) noexcept nogil:
    """p.tasks reordered, stably, by the pool of their expert's slot; p.off
    filled (cursors zeroed).  -1: out of memory."""
    cdef int P = L.npools, q
    cdef int64_t i, n = p.ntasks
    p.off = <int64_t *>_alloc((2 * P + 1) * sizeof(int64_t))
    cdef Task *out = <Task *>_alloc(max(n, 1) * sizeof(Task))
    if p.off == NULL or out == NULL:
        free(out)
        return -1
    memset(p.off, 0, (2 * P + 1) * sizeof(int64_t))
    for i in range(n):
        p.off[L.slot_pool[L.slot[p.tasks[i].e]] + 1] += 1
    for q in range(P):
        p.off[q + 1] += p.off[q]
    for i in range(n):  # off[P + 1 + q] counts pool q's tasks placed so far
        q = L.slot_pool[L.slot[p.tasks[i].e]]
        out[p.off[q] + p.off[P + 1 + q]] = p.tasks[i]
        p.off[P + 1 + q] += 1
    for q in range(P):
        p.off[P + 1 + q] = 0
    free(p.tasks)
    p.tasks = out
    return 0


cdef inline int _home(int tid, int npools) noexcept nogil:
    """The pool of thread tid of the current region: tid * npools // n."""
    return <int>((<int64_t>tid * npools) // omp_get_num_threads())


cdef void _exec(const Phase *ph, const Layer *L, const Step *S, Plan *p,
                float *scratch) noexcept nogil:
    """One phase: its tasks over p.nslots threads with dynamic scheduling;
    each output element has one owner task, so who runs a task changes no
    bits.  With pools, thread t of n belongs to pool t * npools // n: pinned
    to the pool's CPUs, it takes its own pool's tasks first (their weights
    are on its node), then helps the other pools, nearest first."""
    cdef int64_t i, per = p.per
    cdef const Task *tasks = p.tasks
    cdef TaskFn fn = ph.fn
    cdef int P = L.npools, home, q, pp, tid
    cdef int64_t *cur
    cdef float *scr = NULL
    scratch = scratch if per else NULL
    if P <= 1:
        for i in prange(p.ntasks, schedule="dynamic", chunksize=1, num_threads=p.nslots):
            # scratch: one slot of `per` floats per thread (dropout only, else NULL)
            fn(L, S, &tasks[i],
               scratch + <int64_t>omp_get_thread_num() * per if scratch != NULL else NULL)
        return
    cur = p.off + P + 1
    home = q = pp = tid = 0  # private in the region (Cython copies them in)
    i = 0
    with parallel(num_threads=p.nslots):
        tid = omp_get_thread_num()
        home = _home(tid, P)
        scr = scratch + <int64_t>tid * per if scratch != NULL else NULL
        kt_pool_enter(L.pools, home)
        for q in range(P):
            pp = (home + q) % P
            i = kt_fetch_add(&cur[pp], 1)
            while i < p.off[pp + 1] - p.off[pp]:
                fn(L, S, &tasks[p.off[pp] + i], scr)
                if q:
                    kt_fetch_add(&p.stolen, 1)
                i = kt_fetch_add(&cur[pp], 1)
        kt_pool_leave()


cdef int _run(const Phase *phases, int n, const Layer *L, const Step *S, int64_t n_exp,
              const int32_t *order, int n_threads, double *tick, int64_t *stolen) noexcept nogil:
    """Every phase of a forward or backward, in order; tick[i]: the time
    phase i ended; stolen[0]: the tasks run outside their pool.  Everything
    is allocated before the first phase runs, so an allocation failure (-1) leaves the step's inputs and its cache entry
    as they were: a backward can be retried.  One dropout scratch serves
    every phase (they run one after another)."""
    cdef Plan plans[8]
    cdef int i, rc = 0
    cdef int64_t need = 0
    cdef float *scratch = NULL
    memset(plans, 0, sizeof(plans))
    for i in range(n):
        if _plan(&phases[i], L, S, n_exp, order, n_threads, &plans[i]) < 0:
            rc = -1
            break
        need = max(need, plans[i].nslots * plans[i].per)
    if rc == 0 and need > 0:
        scratch = <float *>_alloc(need * sizeof(float))
        if scratch == NULL:
            rc = -1
    stolen[0] = 0
    for i in range(n):
        if rc == 0:
            _exec(&phases[i], L, S, &plans[i], scratch)
            stolen[0] += plans[i].stolen
        tick[i] = _now()
    for i in range(n):
        free(plans[i].tasks)
        free(plans[i].off)
    free(scratch)
    return rc


# A test hook (ktsft's fault-injection tests): how many native allocations
# of the layer calls succeed before one fails, once (-1: none fails).
cdef int64_t _alloc_fail_after = -1


cdef void *_alloc(size_t n) noexcept nogil:
    global _alloc_fail_after
    if _alloc_fail_after >= 0:
        if _alloc_fail_after == 0:
            _alloc_fail_after = -1
            return NULL
        _alloc_fail_after -= 1
    return malloc(n)


def _fail_allocation(int64_t after):
    """Test hook: the native allocation `after` allocations from now (0:
    the next) of a forward or backward fails, once; -1 disarms it."""
    global _alloc_fail_after
    _alloc_fail_after = after


include "cache.pxi"


# --------------------------------------------------------------------------
# The layer object
# --------------------------------------------------------------------------
cdef inline const void *_ptr(object view) except? NULL:
    """Address of a C-contiguous numpy array (validated by the caller).
    Through the buffer protocol: ~0.1 us, where __array_interface__ builds a
    dict per call (~0.85 us, times ~50 arrays per forward + backward)."""
    cdef Py_buffer buf
    PyObject_GetBuffer(view, &buf, PyBUF_SIMPLE)
    cdef const void *p = buf.buf
    PyBuffer_Release(&buf)
    return p


# element kinds at the boundary: (buffer format, itemsize, name)
cdef enum:
    K_F32 = 0
    K_I32 = 1
    K_U16 = 2   # bf16 bits
    K_I8 = 3
    K_U8 = 4   # packed int4
_KINDS = ((b"f", 4, "float32"), (b"i", 4, "int32"), (b"H", 2, "uint16 (bf16 bits)"),
          (b"b", 1, "int8"), (b"B", 1, "uint8 (packed int4)"))


cdef void *_arg(object a, str name, int kind, int64_t n, bint writable=False,
                bint exact=False) except? NULL:
    """Address of `a`, a C-contiguous array of `kind` holding at least `n`
    elements (exactly n with exact=True), writable where the kernels write
    it; ValueError naming `name` otherwise.  One buffer request, as cheap as
    taking the bare address."""
    cdef Py_buffer buf
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (PyBUF_WRITABLE if writable else 0)
    fmt, size, what = _KINDS[kind]
    if a is None:
        raise ValueError(f"{name}: missing (expected {what} [{n}])")
    try:
        PyObject_GetBuffer(a, &buf, flags)
    except (BufferError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a C-contiguous{' writable' if writable else ''} "
                         f"{what} array ({e})") from None
    got = (buf.format if buf.format != NULL else b"B").lstrip(b"<=@")
    cdef Py_ssize_t itemsize = buf.itemsize, length = buf.len
    cdef void *p = buf.buf
    PyBuffer_Release(&buf)
    if <uintptr_t>p % <uintptr_t>size:
        raise ValueError(f"{name}: not aligned to its {size}-byte elements (the kernels load "
                         "whole elements)")
    if itemsize != size or got != fmt:
        raise ValueError(f"{name}: expected {what} elements, got format {got.decode()!r} of "
                         f"{itemsize} bytes")
    cdef int64_t count = length // itemsize
    if count < n or (exact and count != n):
        raise ValueError(f"{name}: {count} elements, the layer needs "
                         f"{'exactly' if exact else 'at least'} {n}")
    return p


cdef float *_grad(dict grads, str name, int64_t n) except? NULL:
    """The LoRA gradient `name` of `grads`: float32, exactly n elements, written."""
    return <float *>_arg(_item(grads, "grads", name), name, K_F32, n, True, True)


cdef object _item(dict d, str what, str key):
    try:
        return d[key]
    except KeyError:
        raise ValueError(f"{what} has no array {key!r}") from None


cdef const void *_weights(object a, str name, int kind, tuple shape, int64_t expert_stride) except? NULL:
    """Registration-time check of one base-weight array: `kind` elements,
    shape `shape` = (E, rows, cols), each expert's [rows, cols] plane
    C-contiguous and `expert_stride` elements from the next (views of a
    fused gate_up_proj are strided between experts)."""
    fmt, size, what = _KINDS[kind]
    if getattr(a, "itemsize", None) != size or getattr(a, "dtype", None) is None or \
            a.dtype.char != fmt.decode():
        raise ValueError(f"{name}: expected {what} weights, got {getattr(a, 'dtype', type(a))}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(a.shape)}, the layer needs {shape}")
    st = a.strides
    if shape[0] and shape[1] and shape[2] and (
            st[2] != size or (shape[1] > 1 and st[1] != shape[2] * size) or
            (shape[0] > 1 and st[0] != expert_stride * size)):
        raise ValueError(f"{name}: strides {st} are not C-contiguous planes {expert_stride} "
                         "elements apart")
    return _any_ptr(a)


cdef const void *_any_ptr(object a) except? NULL:
    """Address of the first element of a numpy array of any strides (the
    buffer protocol's PyBUF_SIMPLE refuses non-contiguous views).  Only for
    registration, never per call."""
    return <const void *><uintptr_t>a.__array_interface__["data"][0]


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


FORWARD_PHASES = ("route", "round_x", "lora_a_in", "gate_up", "swiglu", "down", "combine")
BACKWARD_PHASES = ("round_dO", "lora_b_down", "down_T", "swiglu_bwd", "input_T", "lora_grads",
                   "combine")


cdef int _bind_cache(const Layer *L, Step *S, CacheEntry cache, Workspace ws,
                     str op) except -1:
    """The memory a forward and its backward share: the cache entry's
    routing and activations, and the workspace they both use; both typed
    objects, checked to be of this layer's shape and for S.T tokens."""
    _check_entry_shape(cache, L, S.T, op)
    _check_workspace(ws, L, S.T, op)
    S.offs = &cache.offs[0]
    S.pair_tok = &cache.pair_tok[0] if S.P else NULL
    S.pair_tj = &cache.pair_tj[0] if S.P else NULL
    S.pair_w = &cache.pair_w[0] if S.P else NULL
    S.pos = &cache.pos[0] if S.P else NULL
    S.G = &cache.G[0, 0] if S.P and L.I else NULL
    S.U = &cache.U[0, 0] if S.P and L.I else NULL
    S.xs_g = &cache.xs_gate[0, 0] if S.P and L.r else NULL
    S.xs_u = &cache.xs_up[0, 0] if S.P and L.r else NULL
    S.hs = &cache.hs_down[0, 0] if S.P and L.r else NULL
    S.h32 = &ws.h32[0, 0] if S.P and L.I else NULL
    S.ybuf = &ws.ybuf[0, 0] if S.P and L.H else NULL
    return 0


cdef int64_t _tokens(object a, str name, int64_t H) except -1:
    """Rows of a [T, H] array (its shape checked here; its memory by _arg)."""
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != H:
        raise ValueError(f"{name}: expected [T, {H}], got shape {shape}")
    return shape[0]


cdef int _check_entry(const Layer *L, const Step *S, const int32_t *order,
                      int64_t n_exp) noexcept nogil:
    """0 when a cache entry's routing can be trusted by the backward's tasks
    (O(E + P), next to kernels of O(P H I)); else which part is not."""
    cdef int64_t i, e
    for i in range(n_exp):
        if order[i] < 0 or order[i] >= L.E:
            return 1
    if S.offs[0] != 0:
        return 2
    for e in range(L.E):
        if S.offs[e + 1] < S.offs[e]:
            return 2
    if S.offs[L.E] > S.P:
        return 2
    for i in range(S.offs[L.E]):
        if S.pair_tok[i] < 0 or S.pair_tok[i] >= S.T or S.pair_tj[i] < 0 or S.pair_tj[i] >= S.P:
            return 3
    return 0


cdef int _set_dropout(Step *S, double p, uint64_t seed) except -1:
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
    S.drop = p > 0.0
    S.drop_seed = seed
    S.drop_thr = dropout_threshold(p)
    S.drop_inv = <float>(1.0 / (1.0 - p))
    return 0


cpdef uint32_t dropout_threshold(double p) except? 0:
    """floor(p * 2^32): an element is dropped when its 32-bit hash is below."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
    return <uint32_t>(p * 4294967296.0)


def dropout_mask(uint64_t seed, int proj, tj, int64_t n, double p, str isa="scalar"):
    """The LoRA-dropout multipliers the kernels apply: float32 [len(tj), n],
    row i = mask of projection `proj` (0 gate, 1 up, 2 down) for the
    (token, slot) index tj[i] = t * k + j: 0 where dropped, float32(1/(1-p))
    where kept.  Any ISA build gives the same bits."""
    import numpy as np

    cdef const ktsft_kernels *kern = ktsft_kernels_by_name(isa.encode())
    if kern == NULL or isa not in runnable_isas():
        raise ValueError(f"ISA {isa!r} is not available here; runnable: {runnable_isas()}")
    if not 0 <= proj <= 2:
        raise ValueError(f"proj must be 0 (gate), 1 (up) or 2 (down), got {proj}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tjs = np.ascontiguousarray(tj, dtype=np.int64).reshape(-1)
    out = np.empty((tjs.shape[0], n), np.float32)
    ones = np.ones(max(n, 1), np.float32)
    cdef uint32_t thr = dropout_threshold(p)
    cdef float inv = <float>(1.0 / (1.0 - p))
    cdef const float *one_p = <const float *>_ptr(ones)
    cdef float *out_p = <float *>_ptr(out) if out.size else NULL
    cdef const int64_t *tj_p = <const int64_t *>_ptr(tjs) if tjs.size else NULL
    cdef int64_t i, m = tjs.shape[0]
    with nogil:
        for i in range(m):
            kern.dropout_f32(n, seed, proj, tj_p[i], 0, thr, inv, one_p, out_p + i * n, 0)
    return out


# layers alive per kernel table that keeps per-thread scratch (AMX): the
# last one to go frees that scratch (no call of that build can run then)
cdef dict _live = {}


def kept_scratch_bytes(str isa="amx"):
    """Bytes of per-thread scratch an ISA build keeps between calls (all
    threads; 0 where the build keeps none)."""
    cdef const ktsft_kernels *kern = ktsft_kernels_by_name(isa.encode())
    if kern == NULL or kern.scratch_bytes == NULL:
        return 0
    return kern.scratch_bytes()


cdef class MoEKernel:
    """Native state of one layer: shapes, the kernel table and borrowed
    pointers to base weights and LoRA.  The Python wrapper owns the arrays
    and keeps them alive for as long as they are registered here."""
    cdef Layer L
    cdef object _keep
    cdef readonly str isa
    cdef double _tf[8]
    cdef double _tb[8]
    cdef bint _counted
    cdef kt_pools *_pools
    cdef int32_t *_slot_pool  # a copy: Python cannot change it behind the tasks' back
    cdef int64_t _stolen[2]   # tasks run outside their pool: last forward, backward

    def __dealloc__(self):
        kt_pools_free(self._pools)
        free(self._slot_pool)
        if self._counted:
            n = _live[self.isa] - 1
            _live[self.isa] = n
            if n == 0 and self.L.kern.release_scratch != NULL:
                self.L.kern.release_scratch()

    def __init__(self, int64_t num_experts, int64_t top_k, int64_t hidden_size,
                 int64_t intermediate_size, int64_t lora_rank, float lora_scaling, bint bf16,
                 str isa, str weight_type="auto", int64_t group=0):
        """bf16: the base GEMMs read bf16 activations (and bf16 weights);
        weight_type "int8": fp32 activations, int8 weights with row scales;
        "int4": fp32 activations, int4 weights with a scale per `group`
        inputs (hidden_size and intermediate_size multiples of group)."""
        cdef const ktsft_kernels *kern = ktsft_kernels_by_name(isa.encode())
        if kern == NULL or isa not in runnable_isas():
            raise ValueError(f"ISA {isa!r} is not available here; runnable: {runnable_isas()}")
        memset(&self.L, 0, sizeof(Layer))
        memset(self._tf, 0, sizeof(self._tf))
        memset(self._tb, 0, sizeof(self._tb))
        self.L.kern = kern
        self.L.E = num_experts
        self.L.k = top_k
        self.L.H = hidden_size
        self.L.I = intermediate_size
        self.L.r = lora_rank
        self.L.scaling = lora_scaling
        self.L.bf16 = bf16
        self.L.q8 = weight_type == "int8"
        self.L.q4 = weight_type == "int4"
        if (self.L.q8 or self.L.q4) and bf16:
            raise ValueError("quantized weights run with fp32 activations")
        self.L.wbits = 8 if self.L.q8 else (4 if self.L.q4 else (16 if bf16 else 32))
        wkind = (KTSFT_W_Q8 if self.L.q8 else KTSFT_W_Q4 if self.L.q4 else
                 KTSFT_W_BF16 if bf16 else KTSFT_W_F32)
        self.L.nt, self.L.nn = kern.nt[wkind], kern.nn[wkind]
        self.L.group = group if self.L.q4 else 0
        if self.L.q4 and (group <= 0 or group % 32 or hidden_size % group or
                          intermediate_size % group):
            raise ValueError(f"int4 group={group}: must be a multiple of 32 dividing hidden_size "
                             f"and intermediate_size")
        self.L.ng_in_h = hidden_size // group if self.L.q4 else 1
        self.L.ng_in_i = intermediate_size // group if self.L.q4 else 1
        # tile-sized tasks only where the tiles run: bf16 base products
        amx = isa == "amx" and bf16
        self.L.nt_rows = AMX_ROW_BLOCK if amx else ROW_BLOCK
        self.L.nn_cols = AMX_COL_BLOCK if amx else COL_BLOCK
        # the vdpbf16ps NN kernel streams without a pack up to KT_NN_STREAM_MAX tokens
        self.L.nn_whole_upto = KT_NN_STREAM_MAX if (isa == "avx512bf16" and bf16) else KT_NN_STREAM_FEW
        self.isa = isa
        self._keep = {}
        if kern.release_scratch != NULL:
            _live[isa] = _live.get(isa, 0) + 1
            self._counted = True

    def set_base_weights(self, gate, up, down, slot, scales=None, expert_strides=None):
        """gate/up [E, I, H], down [E, H, I] (float32, uint16 holding bf16 in
        bf16 mode, or int8 with `scales` = (s_gate [E, I], s_up [E, I],
        s_down [E, H]) float32), slot: int32 [E] logical expert -> physical slot.
        expert_strides=(s_gate, s_up, s_down): elements between experts when
        the arrays are views whose [I, H] / [H, I] planes are C-contiguous but
        whose experts are further apart (e.g. the two halves of a fused
        gate_up_proj); the caller has validated the views."""
        if (self.L.q8 or self.L.q4) != (scales is not None):
            raise ValueError("quantized weights need their scales (and only they have them)")
        cdef int64_t IH = self.L.I * self.L.H
        if expert_strides is None:
            expert_strides = (IH, IH, IH)
        elif self.L.q8 or self.L.q4:
            raise ValueError("expert strides are for fp32/bf16 weights read in place")
        if any(int(s) < IH for s in expert_strides):
            raise ValueError(f"expert strides {tuple(expert_strides)} overlap experts (< I*H = {IH})")
        cdef int64_t E = self.L.E, I = self.L.I, H = self.L.H
        cdef int wk = K_I8 if self.L.q8 else (K_U8 if self.L.q4 else
                                              (K_U16 if self.L.bf16 else K_F32))
        cdef int64_t div = 2 if self.L.q4 else 1  # two int4 per byte along a row's inputs
        es = [int(v) // div for v in expert_strides] if self.L.q4 else [int(v) for v in
                                                                         expert_strides]
        # every pointer is taken (and checked) before any is stored
        cdef const void *w_gate
        cdef const void *w_up
        cdef const void *w_down
        cdef const int32_t *slot_p
        w_gate = _weights(gate, "gate", wk, (E, I, H // div), es[0])
        w_up = _weights(up, "up", wk, (E, I, H // div), es[1])
        w_down = _weights(down, "down", wk, (E, H, I // div), es[2])
        slot_p = <const int32_t *>_arg(slot, "slot", K_I32, E, False, True)
        cdef const float *s_gate = NULL
        cdef const float *s_up = NULL
        cdef const float *s_down = NULL
        if scales is not None:
            if len(scales) != 3:
                raise ValueError(f"scales: expected (s_gate, s_up, s_down), got {len(scales)}")
            s_gate = <const float *>_arg(scales[0], "scales[0] (gate)", K_F32,
                                         E * I * self.L.ng_in_h, False, True)
            s_up = <const float *>_arg(scales[1], "scales[1] (up)", K_F32, E * I * self.L.ng_in_h,
                                       False, True)
            s_down = <const float *>_arg(scales[2], "scales[2] (down)", K_F32,
                                         E * H * self.L.ng_in_i, False, True)
        self._keep["base"] = (gate, up, down, slot, scales)
        self.L.s_gate, self.L.s_up, self.L.s_down = s_gate, s_up, s_down
        self.L.w_gate = w_gate
        self.L.w_up = w_up
        self.L.w_down = w_down
        self.L.es_gate = int(expert_strides[0])
        self.L.es_up = int(expert_strides[1])
        self.L.es_down = int(expert_strides[2])
        self.L.slot = slot_p

    def set_pools(self, slot_pool, cpus, cpu_offs):
        """NUMA pools: slot_pool int32 [E], the pool of each physical slot
        (0..n-1); pool q's threads are pinned to cpus[cpu_offs[q]:
        cpu_offs[q + 1]] (int32, cpu_offs [n + 1]).  One pool (n = 1):
        the plain schedule, no pinning.  ktsft/_numa.py makes them."""
        cdef int64_t E = self.L.E, e
        cdef int64_t n = len(cpu_offs) - 1
        if n < 1 or n > E:
            raise ValueError(f"pools: {n} pools for {E} experts (1 to num_experts)")
        sp = <const int32_t *>_arg(slot_pool, "slot_pool", K_I32, E, False, True)
        offs = <const int32_t *>_arg(cpu_offs, "cpu_offs", K_I32, n + 1, False, True)
        cdef int64_t ncpu = offs[n]
        cp = <const int32_t *>_arg(cpus, "cpus", K_I32, ncpu, False, True) if ncpu else NULL
        for e in range(E):
            if not 0 <= sp[e] < n:
                raise ValueError(f"slot_pool[{e}] = {sp[e]}: not a pool (0 to {n - 1})")
        for e in range(n):
            if not 0 <= offs[e] <= offs[e + 1] <= ncpu:
                raise ValueError("cpu_offs: not the offsets of each pool's CPUs")
        cdef kt_pools *pools = NULL
        cdef int32_t *own = NULL
        if n > 1:
            pools = kt_pools_new(<int>n, cp, offs)
            own = <int32_t *>malloc(E * sizeof(int32_t))
            if pools == NULL or own == NULL:
                kt_pools_free(pools)
                free(own)
                raise MemoryError("ktsft: cannot allocate the pools' CPU sets")
            for e in range(E):
                own[e] = sp[e]
        kt_pools_free(self._pools)
        free(self._slot_pool)
        self._pools, self._slot_pool = pools, own
        self.L.slot_pool = own
        self.L.pools = pools
        self.L.npools = <int>n

    def pool_probe(self, int n_threads):
        """Test hook: one parallel region of n_threads, each thread in its
        pool as a phase puts it there; [(pool, CPU it ran on)] per thread."""
        cdef int P = max(self.L.npools, 1), tid = 0, home = 0
        cdef int32_t[:, ::1] got = np.full((n_threads, 2), -1, np.int32)
        with nogil, parallel(num_threads=n_threads):
            tid = omp_get_thread_num()
            home = _home(tid, P)
            kt_pool_enter(self.L.pools, home)
            got[tid, 0] = home
            got[tid, 1] = kt_current_cpu()
            kt_pool_leave()
        return [tuple(r) for r in np.asarray(got).tolist() if r[0] >= 0]

    def set_lora(self, a_gate, b_gate, a_up, b_up, a_down, b_down):
        """Six float32 C-contiguous arrays, read in place (never copied)."""
        cdef int64_t E = self.L.E, I = self.L.I, H = self.L.H, r = self.L.r
        cdef const float *ag
        cdef const float *bg
        cdef const float *au
        cdef const float *bu
        cdef const float *ad
        cdef const float *bd
        ag = <const float *>_arg(a_gate, "gate_lora_a", K_F32, E * r * H, False, True)
        bg = <const float *>_arg(b_gate, "gate_lora_b", K_F32, E * I * r, False, True)
        au = <const float *>_arg(a_up, "up_lora_a", K_F32, E * r * H, False, True)
        bu = <const float *>_arg(b_up, "up_lora_b", K_F32, E * I * r, False, True)
        ad = <const float *>_arg(a_down, "down_lora_a", K_F32, E * r * I, False, True)
        bd = <const float *>_arg(b_down, "down_lora_b", K_F32, E * H * r, False, True)
        self._keep["lora"] = (a_gate, b_gate, a_up, b_up, a_down, b_down)
        self.L.a_gate, self.L.b_gate, self.L.a_up, self.L.b_up = ag, bg, au, bu
        self.L.a_down, self.L.b_down = ad, bd

    def forward(self, x32, x_act, ids, rw, CacheEntry cache, Workspace ws, out, int n_threads,
                double lora_dropout=0.0, uint64_t dropout_seed=0, bint round_x=True):
        """out = MoE(x).  cache: the entry (written), resized to x's tokens;
        ws: the workspace of this shape (bf16 mode: x_act is uint16).
        round_x=False (bf16 mode): x_act already holds x in bf16 (the
        caller's bf16 input, read as it is) and is only read.
        lora_dropout > 0: LoRA inputs masked with the masks of dropout_seed
        (backward must get the same two values)."""
        cdef Step S
        cdef int64_t T = _tokens(x32, "x32", self.L.H), P = T * self.L.k, t, n_exp
        cdef int64_t TH = T * self.L.H
        cdef int act = K_U16 if self.L.bf16 else K_F32
        cdef int64_t i
        cdef int rc = 0
        memset(&S, 0, sizeof(Step))
        S.T = T
        S.P = P
        _bind_cache(&self.L, &S, cache, ws, "forward")
        cache.written = False  # until this forward has written all of it
        _set_dropout(&S, lora_dropout, dropout_seed)
        S.rw = <const float *>_arg(rw, "routing_weights", K_F32, P, False, True)
        S.x32 = <const float *>_arg(x32, "x32", K_F32, TH, False, True)
        # x_act may be x32 itself (fp32): then the kernels only read it
        S.x_act = _arg(x_act, "x_act", act, TH, self.L.bf16 and round_x)
        S.h_act = ((<void *>&ws.h_act[0, 0] if P and self.L.I else NULL) if self.L.bf16
                   else <void *>S.h32)
        S.out = <float *>_arg(out, "out", K_F32, TH, True, True)
        cdef const int32_t *ids_p = <const int32_t *>_arg(ids, "expert_ids", K_I32, P,
                                                          False, True)
        # the expert order (count, then the experts with pairs, most first):
        # computed here, kept in the entry for the backward
        cdef int32_t *order = &cache.order[0]
        cdef int32_t *cursor = <int32_t *>_alloc(max(self.L.E, 1) * sizeof(int32_t))
        if cursor == NULL:
            raise MemoryError("ktsft forward: cannot allocate the routing cursor")
        cdef const Layer *L = &self.L
        cdef const ktsft_kernels *kern = self.L.kern
        cdef int64_t H = self.L.H, k = self.L.k
        cdef double *tf = self._tf
        with nogil:
            tf[0] = _now()
            _route(T, k, L.E, ids_p, S.rw, <int32_t *>S.offs, <int32_t *>S.pair_tok,
                   <int32_t *>S.pair_tj, <float *>S.pair_w, <int32_t *>S.pos, cursor)
            n_exp = _expert_order(L.E, S.offs, order + 1)
            order[0] = <int32_t>n_exp
            if n_exp < 0:
                rc = -1
            tf[1] = _now()
            if rc == 0 and L.bf16 and round_x:
                for t in prange(T, schedule="static", num_threads=n_threads):
                    kern.round_bf16(H, S.x32 + t * H, (<ktsft_bf16 *>S.x_act) + t * H)
            tf[2] = _now()
            if rc == 0:
                rc = _run(_FWD, N_FWD, L, &S, n_exp, order + 1, n_threads, tf + 3, &self._stolen[0])
            else:
                for i in range(N_FWD):
                    tf[3 + i] = _now()
            if rc == 0:
                for t in prange(T, schedule="static", num_threads=n_threads):
                    kern.combine(k, H, S.ybuf, S.pos + t * k, S.rw + t * k, S.out + t * H)
            tf[7] = _now()
        free(cursor)
        if rc != 0:
            raise MemoryError("ktsft forward: cannot allocate a task list or dropout scratch")
        cache.written = True

    def backward(self, CacheEntry cache, do32, do_act, Workspace ws, grads, grad_w, dx,
                 int n_threads,
                 double lora_dropout=0.0, uint64_t dropout_seed=0, bint accumulate=False):
        """dx, grad_w and the six LoRA gradients from dO and a cache entry.
        Consumes the entry: G/U become dG/dU.  lora_dropout, dropout_seed:
        those of the entry's forward.  accumulate: add the LoRA gradients to
        `grads` instead of overwriting them (experts without tokens then
        leave theirs as they are)."""
        cdef Step S
        cdef int64_t T = _tokens(do32, "do32", self.L.H), P = T * self.L.k, t, n_exp, i
        cdef int64_t E = self.L.E, H = self.L.H, I = self.L.I, r = self.L.r, TH = T * H
        cdef int act = K_U16 if self.L.bf16 else K_F32
        cdef int rc = 0
        memset(&S, 0, sizeof(Step))
        S.T = T
        S.P = P
        # the entry holds exactly its forward's tokens: a dO of another T
        # would be indexed by pairs routed for that one (_bind_cache checks)
        if not cache.written:
            raise ValueError("cache: the entry holds no forward (a backward consumed it, or no "
                             "forward wrote it)")
        _bind_cache(&self.L, &S, cache, ws, "backward")
        _set_dropout(&S, lora_dropout, dropout_seed)
        S.x32 = &cache.x[0, 0] if TH else NULL
        S.do32 = <const float *>_arg(do32, "do32", K_F32, TH, False, True)
        S.do_act = _arg(do_act, "do_act", act, TH, self.L.bf16)
        if self.L.bf16:
            S.dg_act = <void *>&ws.dg_act[0, 0] if P and I else NULL
            S.du_act = <void *>&ws.du_act[0, 0] if P and I else NULL
        else:
            S.dg_act, S.du_act = <void *>S.G, <void *>S.U
        S.bds = &ws.bds[0, 0] if P and r else NULL
        S.gbs_g = &ws.gbs_gate[0, 0] if P and r else NULL
        S.gbs_u = &ws.gbs_up[0, 0] if P and r else NULL
        S.grad_w = <float *>_arg(grad_w, "grad_routing_weights", K_F32, P, True, True)
        S.accum = accumulate
        S.g_ag = _grad(grads, "grad_gate_lora_a", E * r * H)
        S.g_bg = _grad(grads, "grad_gate_lora_b", E * I * r)
        S.g_au = _grad(grads, "grad_up_lora_a", E * r * H)
        S.g_bu = _grad(grads, "grad_up_lora_b", E * I * r)
        S.g_ad = _grad(grads, "grad_down_lora_a", E * r * I)
        S.g_bd = _grad(grads, "grad_down_lora_b", E * H * r)
        cdef float *dx_p = <float *>_arg(dx, "grad_input", K_F32, TH, True, True)
        # the forward's expert order, kept in the entry
        cdef const int32_t *order = &cache.order[0]
        n_exp = order[0]
        if not 0 <= n_exp <= E:
            raise ValueError(f"cache['order']: {n_exp} experts, the layer has {E} (the entry "
                             "was not written by a forward)")
        cdef int bad = _check_entry(&self.L, &S, order + 1, n_exp)
        if bad:
            raise ValueError(("cache['order'] names an expert outside the layer",
                              "cache['offs'] is not the offsets of this entry's pairs",
                              "cache['pair_tok'] names a token outside the entry")[bad - 1] +
                             " (the entry was not written by a forward of this layer)")
        cdef const Layer *L = &self.L
        cdef const ktsft_kernels *kern = self.L.kern
        cdef int64_t k = self.L.k
        cdef double *tb = self._tb
        with nogil:
            tb[0] = _now()
            if L.bf16:
                for t in prange(T, schedule="static", num_threads=n_threads):
                    kern.round_bf16(H, S.do32 + t * H, (<ktsft_bf16 *>S.do_act) + t * H)
            tb[1] = _now()
            rc = _run(_BWD, N_BWD, L, &S, n_exp, order + 1, n_threads, tb + 2, &self._stolen[1])
            if rc == 0 and not S.accum:  # experts without pairs: zero gradients
                for i in prange(L.E, schedule="static", num_threads=n_threads):
                    if S.offs[i + 1] == S.offs[i]:
                        _zero_expert_grads(L, &S, i)
            tb[6] = _now()
            if rc == 0:
                for t in prange(T, schedule="static", num_threads=n_threads):
                    kern.combine(k, H, S.ybuf, S.pos + t * k, NULL, dx_p + t * H)
            tb[7] = _now()
        if rc == 0:  # before any Python code can run (a signal handler): consumed
            cache.written = False
        if rc != 0:
            raise MemoryError("ktsft backward: cannot allocate a task list or dropout scratch")

    def last_stolen_tasks(self):
        """Tasks of the last forward and backward that a thread of another
        pool than their expert's ran (0 with one pool)."""
        return {"forward": int(self._stolen[0]), "backward": int(self._stolen[1])}

    def last_phase_times(self):
        """Seconds spent in each phase of the last forward and backward."""
        fwd = {n: self._tf[i + 1] - self._tf[i] for i, n in enumerate(FORWARD_PHASES)}
        bwd = {n: self._tb[i + 1] - self._tb[i] for i, n in enumerate(BACKWARD_PHASES)}
        return {"forward": fwd, "backward": bwd}


include "adamw.pxi"
include "convert.pxi"
