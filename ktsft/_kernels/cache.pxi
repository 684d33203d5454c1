# The cache entry and the workspace: typed memory sized from the layer
# (declared in moe_sft.pxd, included into moe_sft.pyx).  The kernels take
# these objects, never loose arrays: a layout change in Python cannot reach
# nogil code as a wrong size.
import threading
import weakref

import numpy as np


cdef class CacheEntry:
    """What one forward keeps for its backward (docs/cache.md).

    Per token (fp32 unless noted), with k slots, rank r, hidden H, inner I:
      x         H          input (LoRA-A gradients need it; the base GEMMs
                           do not, so y is never kept)
      G, U      2 k I      gate and up pre-activations (h is rebuilt from them)
      xs_gate, xs_up, hs_down   3 k r   scaled LoRA-A projections
      pair_tok, pair_tj, pair_w, pos   4 k   routing (int32/float32)
    plus (E + 1) int32 expert offsets and the (E + 1) int32 expert order
    (count, then the experts with pairs, most first), and ``dropout`` = (p,
    seed) of the forward.  Allocated for `capacity` tokens so a wrapper can
    reuse entries across steps (``resize``).  ``written``: a forward wrote
    it and no backward has consumed it yet (the kernels set it; a backward
    of an entry without it is refused, since G/U would already be dG/dU)."""

    def __init__(self, int64_t capacity, int64_t E, int64_t H, int64_t I, int64_t k, int64_t r):
        if min(capacity, E, H, I, k, r) < 0 or E == 0:
            raise ValueError(f"CacheEntry({capacity}, {E}, {H}, {I}, {k}, {r}): sizes must be "
                             "positive")
        cdef int64_t P = capacity * k
        self.capacity, self.E, self.H, self.I, self.k, self.r = capacity, E, H, I, k, r
        self.dropout = (0.0, 0)
        self.storage = {
            "x": np.empty((capacity, H), np.float32),
            "G": np.empty((P, I), np.float32), "U": np.empty((P, I), np.float32),
            "xs_gate": np.empty((P, r), np.float32), "xs_up": np.empty((P, r), np.float32),
            "hs_down": np.empty((P, r), np.float32),
            "offs": np.empty(E + 1, np.int32), "order": np.zeros(E + 1, np.int32),
            "pair_tok": np.empty(P, np.int32), "pair_tj": np.empty(P, np.int32),
            "pair_w": np.empty(P, np.float32), "pos": np.empty(P, np.int32),
        }
        st = self.storage
        self.x, self.G, self.U = st["x"], st["G"], st["U"]
        self.xs_gate, self.xs_up, self.hs_down = st["xs_gate"], st["xs_up"], st["hs_down"]
        self.offs, self.order, self.pair_tok = st["offs"], st["order"], st["pair_tok"]
        self.pair_tj, self.pos, self.pair_w = st["pair_tj"], st["pos"], st["pair_w"]
        self.resize(capacity)

    def resize(self, int64_t T):
        """Hold T tokens (T <= capacity); returns the entry."""
        if not 0 <= T <= self.capacity:
            raise ValueError(f"resize({T}): this entry holds {self.capacity} tokens")
        self.T = T
        self.written = False
        k = self.k
        self.arrays = {n: (a if n in ("offs", "order") else a[:T] if n == "x" else a[:T * k])
                       for n, a in self.storage.items()}
        return self

    @staticmethod
    def bytes_per_token(H, I, k, r) -> int:
        return 4 * (H + 2 * k * I + 3 * k * r + 4 * k)

    @staticmethod
    def bytes_per_entry(E) -> int:
        """What an entry holds whatever its tokens: offsets and order."""
        return 2 * 4 * (E + 1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.storage.values())

    def __getitem__(self, name):
        return self.arrays[name]


_WS_LOCK = [threading.Lock()]  # guards Workspace.shared (a list: replaced after fork)


def _locks_after_fork():
    """In a forked child: a parent thread may have held these locks at the
    fork, and it does not exist here; make them anew."""
    _WS_LOCK[0] = threading.Lock()
    for ws in list(Workspace._shared.values()):
        ws.lock = threading.Lock()


import os as _os
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_locks_after_fork)


cdef class Workspace:
    """Scratch of one forward_sft or backward call, reused across calls and
    grown on demand; nothing in it is kept between a forward and its
    backward.  So every layer of one shape can share one (``shared``): a
    model's layers run one after another, and 48 per-layer workspaces of
    ~137 KiB per token (Qwen3-30B-A3B, bf16) held 6.7 GB of host memory at
    1024 tokens where one holds 140 MB.  ``lock`` serialises the calls that
    use it (wrappers take it inside their own lock, never the other way)."""

    _shared = weakref.WeakValueDictionary()

    def __init__(self, int64_t H, int64_t I, int64_t k, int64_t r, bint bf16):
        self.H, self.I, self.k, self.r, self.bf16 = H, I, k, r, bf16
        self.T = -1
        self.arrays = {}
        self.lock = threading.Lock()

    @classmethod
    def shared(cls, H, I, k, r, bf16):
        """The process's workspace for this shape, held weakly: it is freed
        with the last wrapper that uses it."""
        key = (int(H), int(I), int(k), int(r), bool(bf16))
        with _WS_LOCK[0]:
            ws = cls._shared.get(key)
            if ws is None:
                ws = cls(*key)
                cls._shared[key] = ws
            return ws

    def ensure(self, int64_t T):
        """Sized for at least T tokens; returns the arrays."""
        if T <= self.T:
            return self.arrays
        cdef int64_t H = self.H, I = self.I, k = self.k, r = self.r, P = T * k
        a = {
            "h32": np.empty((P, I), np.float32), "ybuf": np.empty((P, H), np.float32),
            "bds": np.empty((P, r), np.float32), "gbs_gate": np.empty((P, r), np.float32),
            "gbs_up": np.empty((P, r), np.float32),
            # the caller's bf16 tensors pass through these in fp32: the
            # forward's output (and backward's grad_input), backward's dO
            "y32": np.empty((T, H), np.float32), "do32": np.empty((T, H), np.float32),
        }
        if self.bf16:
            a.update({"x_act": np.empty((T, H), np.uint16), "h_act": np.empty((P, I), np.uint16),
                      "do_act": np.empty((T, H), np.uint16), "dg_act": np.empty((P, I), np.uint16),
                      "du_act": np.empty((P, I), np.uint16)})
        else:
            a["h_act"] = a["h32"]
        self.h32, self.ybuf, self.bds = a["h32"], a["ybuf"], a["bds"]
        self.gbs_gate, self.gbs_up, self.y32, self.do32 = a["gbs_gate"], a["gbs_up"], a["y32"], a["do32"]
        if self.bf16:
            self.x_act, self.h_act, self.do_act = a["x_act"], a["h_act"], a["do_act"]
            self.dg_act, self.du_act = a["dg_act"], a["du_act"]
        self.arrays = a
        self.T = T
        return a

    def view(self, int64_t T):
        """Arrays trimmed to T tokens (views: rows stay contiguous)."""
        k = self.k
        out = {}
        for name, arr in self.ensure(T).items():
            rows = T if name in ("x_act", "do_act", "y32", "do32") else T * k
            out[name] = arr[:rows]
        return out

    @staticmethod
    def bytes_per_token(H, I, k, r, bf16) -> int:
        n = 4 * (k * I + k * H + 3 * k * r + 2 * H)
        if bf16:
            n += 2 * (2 * H + 3 * k * I)
        return n


cdef int _check_entry_shape(CacheEntry e, const Layer *L, int64_t T, str op) except -1:
    if (e.E, e.H, e.I, e.k, e.r) != (L.E, L.H, L.I, L.k, L.r):
        raise ValueError(f"{op}: a cache entry of (E, H, I, k, r) = {(e.E, e.H, e.I, e.k, e.r)} "
                         f"for a layer of {(L.E, L.H, L.I, L.k, L.r)}")
    if T != e.T:
        raise ValueError(f"{op}: {T} tokens, the cache entry holds {e.T} (its forward's)")
    return 0


cdef int _check_workspace(Workspace w, const Layer *L, int64_t T, str op) except -1:
    if (w.H, w.I, w.k, w.r, w.bf16) != (L.H, L.I, L.k, L.r, L.bf16):
        raise ValueError(f"{op}: a workspace of (H, I, k, r, bf16) = "
                         f"{(w.H, w.I, w.k, w.r, bool(w.bf16))} for a layer of "
                         f"{(L.H, L.I, L.k, L.r, bool(L.bf16))}")
    w.ensure(T)
    return 0
