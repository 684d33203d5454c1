"""The bad-input matrix: every argument of every public call given a wrong
type, dtype, shape or rank, non-contiguous or read-only memory, NaN/Inf, an
absurd size; and calls out of order.

Each row must raise a Python exception of the stated type whose message
contains the stated fragment (the argument's name, or for sizes the resource
that would not fit), must not allocate anything sized by the bad input
(tracemalloc peak), and must leave the wrapper as it was: base weights, LoRA
and the cached forward unchanged.  "Unchanged" is checked the strong way: a
forward without caching gives the bitwise same output as before, and the
forward cached before the bad call still yields bitwise the same backward as
an untouched twin wrapper.

docs/hardening.md lists this matrix; test_docs_list_the_matrix keeps the
two in step (regenerate the table with `python tests/test_bad_input_matrix.py`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import tracemalloc
import warnings
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

import ktsft
from conftest import Problem

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

T, H, I, E, K, R = 6, 24, 16, 5, 2, 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
GRADS = ("grad_gate_lora_a", "grad_gate_lora_b", "grad_up_lora_a", "grad_up_lora_b",
         "grad_down_lora_a", "grad_down_lora_b")
BASE = ("gate_proj", "up_proj", "down_proj")
TB = 1 << 40
PEAK_LIMIT = 8 << 20     # a refused call allocates nothing sized by its bad input


# ---------------------------------------------------------------------------
# the state a bad call must leave alone
# ---------------------------------------------------------------------------
class Ctx:
    """A ready wrapper (depth 2) with one forward cached, its inputs, and
    what an untouched twin gives."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.p = p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
        self.m = p.wrapper(dtype=dtype, threads=1, depth=2)
        self.m.forward_sft(p.x, p.ids, p.w)
        twin = p.wrapper(dtype=dtype, threads=1, depth=2)
        self.out_nosave = np.array(twin.forward_sft(p.x, p.ids, p.w, save_for_backward=False))
        twin.forward_sft(p.x, p.ids, p.w)
        self.expected = _backward(twin, p.dO)
        self.lora = [a.copy() for a in p.lora]
        self.base = [np.array(a, copy=True) for a in self.m.stored_weights()[:3]]
        self.user_base = [a.copy() for a in (p.gate_proj, p.up_proj, p.down_proj)]
        self.inputs = [a.copy() for a in (p.x, p.ids, p.w, p.dO)]

    def weights(self, **override):
        kw = dict(gate_proj=self.p.gate_proj, up_proj=self.p.up_proj, down_proj=self.p.down_proj)
        kw.update(override)
        return kw

    def lora_args(self, i, bad):
        args = list(self.p.lora)
        args[i] = bad
        return args

    def grads_out(self, **override):
        g = {n: np.zeros(s, np.float32) for n, s in zip(GRADS, _lora_shapes())}
        g.update(override)
        return g

    def assert_unchanged(self):
        p, m = self.p, self.m
        assert m.cache_depth == 1, "the cached forward was lost or a new one pushed"
        for a, b, n in zip(p.lora, self.lora, LORA):
            assert np.array_equal(a, b), f"LoRA {n} changed"
        for a, b, n in zip(m.stored_weights()[:3], self.base, BASE):
            assert np.array_equal(np.asarray(a), b), f"base weight {n} changed"
        for a, b, n in zip((p.gate_proj, p.up_proj, p.down_proj), self.user_base, BASE):
            assert np.array_equal(a, b), f"caller's {n} changed"
        for a, b in zip((p.x, p.ids, p.w, p.dO), self.inputs):
            assert np.array_equal(a, b), "caller's inputs changed"
        out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
        assert np.array_equal(out, self.out_nosave), "forward result changed"
        got = _backward(m, p.dO)
        for n, want in self.expected.items():
            assert np.array_equal(got[n], want), f"backward of the cached forward changed: {n}"
        assert m.cache_depth == 0


def _lora_shapes():
    return [(E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R)]


def _backward(m, dO, **kw):
    dx, grads = m.backward(dO, **kw)
    res = {n: np.array(v, copy=True) for n, v in grads.items()}
    res["grad_input"] = np.array(dx, copy=True)
    return res


# ---------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    call: str
    arg: str
    bad: str
    action: Callable          # ctx -> None, performs the bad call
    exc: type | tuple
    match: str
    dtypes: tuple = ("fp32", "bf16")
    stateful: bool = True     # False: a constructor row (no wrapper to check)
    xfail: str | None = None  # a known ktsft bug (reported), strict

    @property
    def id(self):
        return re.sub(r"[^A-Za-z0-9_.\[\]-]+", "_", f"{self.call}-{self.arg}-{self.bad}")

    @property
    def exc_name(self):
        return " or ".join(e.__name__ for e in (self.exc if isinstance(self.exc, tuple) else (self.exc,)))


def _nan_at(a, idx=(0, 0)):
    b = np.array(a, copy=True)
    b[idx] = np.nan
    return b


def _inf_at(a, idx=(0, 0), sign=1.0):
    b = np.array(a, copy=True)
    b[idx] = sign * np.inf
    return b


def _readonly(a):
    b = np.array(a, copy=True)
    b.setflags(write=False)
    return b


def _strided(a):
    """Same shape and values, not C-contiguous (every other element of a
    twice-as-wide buffer)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    v = wide[..., ::2]
    assert v.shape == a.shape and not v.flags.c_contiguous
    return v


def _huge(shape, dtype=np.float32):
    """A zero-stride view with an absurd shape: no memory behind it."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)


def ctor_rows():
    base = dict(layer_idx=0, num_experts=8, num_experts_per_tok=2, hidden_size=16,
                moe_intermediate_size=8)

    def make(**kw):
        def action(ctx):
            ktsft.SFTMoEWrapper(**{**base, **kw})
        return action

    def row(arg, bad, kw, exc, match, xfail=None):
        return Row("SFTMoEWrapper", arg, bad, make(**kw), exc, match, stateful=False, xfail=xfail,
                   dtypes=("fp32",))

    return [
        row("layer_idx", "str", dict(layer_idx="0"), TypeError, "layer_idx"),
        row("layer_idx", "negative", dict(layer_idx=-1), ValueError, "layer_idx"),
        row("layer_idx", "bool", dict(layer_idx=True), TypeError, "layer_idx"),
        row("num_experts", "zero", dict(num_experts=0), ValueError, "num_experts"),
        row("num_experts", "float", dict(num_experts=8.0), TypeError, "num_experts"),
        row("num_experts", "None", dict(num_experts=None), TypeError, "num_experts"),
        row("num_experts", "2^40 (beyond int32 ids)", dict(num_experts=TB, hidden_size=64,
                                                            moe_intermediate_size=64),
            ValueError, "num_experts"),
        row("num_experts_per_tok", "zero", dict(num_experts_per_tok=0), ValueError,
            "num_experts_per_tok"),
        row("num_experts_per_tok", "> num_experts", dict(num_experts_per_tok=9), ValueError,
            "num_experts_per_tok"),
        row("num_experts_per_tok", "str", dict(num_experts_per_tok="2"), TypeError,
            "num_experts_per_tok"),
        row("hidden_size", "zero", dict(hidden_size=0), ValueError, "hidden_size"),
        row("hidden_size", "float", dict(hidden_size=2.5), TypeError, "hidden_size"),
        row("hidden_size", "numpy float", dict(hidden_size=np.float32(16)), TypeError,
            "hidden_size"),
        row("hidden_size", "2^62 (overflows int64 products)", dict(hidden_size=1 << 62),
            MemoryError, "H=4611686018427387904"),
        row("moe_intermediate_size", "negative", dict(moe_intermediate_size=-8), ValueError,
            "moe_intermediate_size"),
        row("moe_intermediate_size", "2^40 (TB of weights)", dict(moe_intermediate_size=TB),
            MemoryError, "GiB"),
        row("num_gpu_experts", "nonzero", dict(num_gpu_experts=2), NotImplementedError,
            "num_gpu_experts"),
        row("num_gpu_experts", "negative", dict(num_gpu_experts=-1), ValueError,
            "num_gpu_experts"),
        row("cpuinfer_threads", "zero", dict(cpuinfer_threads=0), ValueError, "cpuinfer_threads"),
        row("cpuinfer_threads", "float", dict(cpuinfer_threads=2.0), TypeError,
            "cpuinfer_threads"),
        row("cpuinfer_threads", "100000 (libgomp segfaults)", dict(cpuinfer_threads=100_000),
            ValueError, "cpuinfer_threads"),
        row("cpuinfer_threads", "2^31 (C int overflow)", dict(cpuinfer_threads=1 << 31),
            ValueError, "cpuinfer_threads"),
        row("threadpool_count", "zero", dict(threadpool_count=0), ValueError, "threadpool_count"),
        row("threadpool_count", "float", dict(threadpool_count=2.0), TypeError, "threadpool_count"),
        row("threadpool_count", "9 (more pools than the 8 experts)", dict(threadpool_count=9),
            ValueError, "threadpool_count=9: more pools than num_experts"),
        row("weight_path", "int", dict(weight_path=3), TypeError, "weight_path"),
        row("chunked_prefill_size", "zero", dict(chunked_prefill_size=0), ValueError,
            "chunked_prefill_size"),
        row("chunked_prefill_size", "2^50 (beyond int32 pairs)", dict(chunked_prefill_size=1 << 50),
            ValueError, "chunked_prefill_size"),
        row("lora_rank", "zero", dict(lora_rank=0), ValueError, "lora_rank"),
        row("lora_rank", "2^40 (TB of cache)", dict(lora_rank=TB), MemoryError, "cache entries"),
        row("lora_alpha", "zero", dict(lora_alpha=0.0), ValueError, "lora_alpha"),
        row("lora_alpha", "negative", dict(lora_alpha=-1.0), ValueError, "lora_alpha"),
        row("lora_alpha", "NaN", dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
        row("lora_alpha", "Inf", dict(lora_alpha=float("inf")), ValueError, "lora_alpha"),
        row("lora_alpha", "str", dict(lora_alpha="32"), TypeError, "lora_alpha"),
        row("lora_alpha", "1e300 (scaling overflows fp32)", dict(lora_alpha=1e300), ValueError,
            "lora_alpha"),
        row("lora_alpha", "1e-320 (scaling underflows fp32)", dict(lora_alpha=1e-320),
            ValueError, "lora_alpha"),
        row("max_cache_depth", "zero", dict(max_cache_depth=0), ValueError, "max_cache_depth"),
        row("max_cache_depth", "2^40 (TB of cache)", dict(max_cache_depth=TB), MemoryError,
            "max_cache_depth"),
        row("dtype", "fp16", dict(dtype="fp16"), ValueError, "dtype"),
        row("dtype", "None", dict(dtype=None), ValueError, "dtype"),
        row("dtype", "numpy dtype", dict(dtype=np.float32), ValueError, "dtype"),
        row("isa", "unknown name", dict(isa="avx1024"), ValueError, "isa"),
        row("isa", "int", dict(isa=3), ValueError, "isa"),
    ]


def load_weights_rows():
    rows = []

    def row(arg, bad, action, exc, match, **kw):
        rows.append(Row("load_weights", arg, bad, action, exc, match, **kw))

    perm = lambda ctx: np.arange(E)  # noqa: E731
    row("physical_to_logical_map_cpu", "not a permutation",
        lambda c: c.m.load_weights(np.zeros(E, np.int64), **c.weights()), ValueError,
        "physical_to_logical_map_cpu")
    row("physical_to_logical_map_cpu", "out of range",
        lambda c: c.m.load_weights(perm(c) + 1, **c.weights()), ValueError,
        "physical_to_logical_map_cpu")
    row("physical_to_logical_map_cpu", "list",
        lambda c: c.m.load_weights(list(range(E)), **c.weights()), TypeError,
        "physical_to_logical_map_cpu")
    row("physical_to_logical_map_cpu", "float dtype",
        lambda c: c.m.load_weights(perm(c).astype(np.float32), **c.weights()), TypeError,
        "physical_to_logical_map_cpu")
    row("physical_to_logical_map_cpu", "wrong length",
        lambda c: c.m.load_weights(np.arange(E - 1), **c.weights()), ValueError,
        "physical_to_logical_map_cpu")
    row("physical_to_logical_map_cpu", "rank 2",
        lambda c: c.m.load_weights(perm(c)[None], **c.weights()), ValueError,
        "physical_to_logical_map_cpu")
    row("gate_proj", "missing (only up/down given)",
        lambda c: c.m.load_weights(up_proj=c.p.up_proj, down_proj=c.p.down_proj), ValueError,
        "gate_proj")
    row("weight_path", "no arrays and no weight_path", lambda c: c.m.load_weights(), ValueError,
        "weight_path")
    for i, name in enumerate(BASE):
        def bad(f, name=name):
            return lambda c: c.m.load_weights(**c.weights(**{name: f(getattr(c.p, name))}))
        row(name, "list", bad(lambda a: a.tolist()), TypeError, name)
        row(name, "int32", bad(lambda a: a.astype(np.int32)), TypeError, name)
        row(name, "bool", bad(lambda a: a > 0), TypeError, name)
        row(name, "complex64", bad(lambda a: a.astype(np.complex64)), TypeError, name)
        row(name, "last dim short", bad(lambda a: a[..., :-1]), ValueError, name)
        row(name, "wrong expert count", bad(lambda a: a[:-1]), ValueError, name)
        row(name, "rank 2", bad(lambda a: a[0]), ValueError, name)
        row(name, "transposed [E, in, out]", bad(lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))),
            ValueError, name)
        row(name, "NaN", bad(lambda a: _nan_at(a, (E - 1, 1, 2))), ValueError, name)
        row(name, "-Inf", bad(lambda a: _inf_at(a, (0, 0, 0), -1.0)), ValueError, name)
        row(name, "bf16 NaN", bad(lambda a: _nan_at(a, (1, 0, 0)).astype(ml_dtypes.bfloat16)),
            ValueError, name)
        row(name, "absurd shape (zero-stride view)", bad(lambda a: _huge((E, 1 << 20, 1 << 20))),
            ValueError, name)
    return rows


def init_lora_rows():
    rows = []
    for i, name in enumerate(LORA):
        def bad(f, i=i):
            return lambda c: c.m.init_lora_weights(*c.lora_args(i, f(c.p.lora[i])))

        def row(what, f, exc, match=name, **kw):
            rows.append(Row("init_lora_weights", name, what, bad(f), exc, match, **kw))

        row("list", lambda a: a.tolist(), TypeError)
        row("float64", lambda a: a.astype(np.float64), TypeError)
        row("float16", lambda a: a.astype(np.float16), TypeError)
        row("int32", lambda a: a.astype(np.int32), TypeError)
        row("bfloat16 in fp32 mode", lambda a: a.astype(ml_dtypes.bfloat16), TypeError,
            dtypes=("fp32",))
        row("last dim short", lambda a: a[..., :-1], ValueError)
        row("wrong expert count (E-1)", lambda a: a[:-1], ValueError)
        row("wrong expert count (E+1)", lambda a: np.concatenate([a, a[:1]]), ValueError)
        row("rank 2", lambda a: a[0], ValueError)
        row("non-contiguous", _strided, ValueError, match=f"{name}: must be C-contiguous")
        row("NaN", lambda a: _nan_at(a, (E - 1, 0, 0)), ValueError)
        row("Inf", lambda a: _inf_at(a, (0, 0, 0)), ValueError)
        if torch is not None:
            row("torch non-contiguous", lambda a: torch.from_numpy(_strided(a)), ValueError)
            row("torch float64", lambda a: torch.from_numpy(a.astype(np.float64)), TypeError)
    return rows


def forward_rows():
    rows = []

    def row(arg, what, f, exc, match=None, **kw):
        def action(c):
            args = {"hidden_states": c.p.x, "expert_ids": c.p.ids, "weights": c.p.w}
            args.update(f(c))
            c.m.forward_sft(args["hidden_states"], args["expert_ids"], args["weights"],
                            **args.get("kw", {}))
        rows.append(Row("forward_sft", arg, what, action, exc, match or arg, **kw))

    x = lambda f: lambda c: {"hidden_states": f(c.p.x)}  # noqa: E731
    row("hidden_states", "list", x(lambda a: a.tolist()), TypeError)
    row("hidden_states", "python float", x(lambda a: 1.0), TypeError)
    row("hidden_states", "float64", x(lambda a: a.astype(np.float64)), TypeError)
    row("hidden_states", "float16", x(lambda a: a.astype(np.float16)), TypeError)
    row("hidden_states", "int32", x(lambda a: a.astype(np.int32)), TypeError)
    row("hidden_states", "rank 1", x(lambda a: a[0]), ValueError)
    row("hidden_states", "rank 3", x(lambda a: a[None]), ValueError)
    row("hidden_states", "wrong hidden size", x(lambda a: a[:, :-1]), ValueError)
    row("hidden_states", "fewer tokens than expert_ids", x(lambda a: a[:-1]), ValueError,
        "expert_ids")
    row("hidden_states", "NaN", x(lambda a: _nan_at(a, (T - 1, H - 1))), ValueError)
    row("hidden_states", "+Inf", x(lambda a: _inf_at(a)), ValueError)
    row("hidden_states", "-Inf", x(lambda a: _inf_at(a, (2, 3), -1.0)), ValueError)
    row("hidden_states", "bf16 NaN", x(lambda a: _nan_at(a).astype(ml_dtypes.bfloat16)),
        ValueError)
    row("hidden_states", "10^12 tokens (zero-stride view)",
        lambda c: {"hidden_states": _huge((10**12, H)), "expert_ids": _huge((10**12, K), np.int64),
                   "weights": _huge((10**12, K))}, ValueError, "chunked_prefill_size")
    if torch is not None:
        row("hidden_states", "torch float64", x(lambda a: torch.from_numpy(a.astype(np.float64))),
            TypeError)
        row("hidden_states", "torch int64", x(lambda a: torch.from_numpy(a.astype(np.int64))),
            TypeError)
    ids = lambda f: lambda c: {"expert_ids": f(c.p.ids)}  # noqa: E731
    row("expert_ids", "list", ids(lambda a: a.tolist()), TypeError)
    row("expert_ids", "float32", ids(lambda a: a.astype(np.float32)), TypeError)
    row("expert_ids", "uint8", ids(lambda a: a.astype(np.uint8)), TypeError)
    row("expert_ids", "bool", ids(lambda a: a > 0), TypeError)
    row("expert_ids", "fewer tokens", ids(lambda a: a[:-1]), ValueError)
    row("expert_ids", "fewer slots", ids(lambda a: a[:, :-1]), ValueError)
    row("expert_ids", "rank 1", ids(lambda a: a[:, 0]), ValueError)
    row("expert_ids", "id == num_experts", ids(lambda a: np.where(a == a[0, 0], E, a)), ValueError)
    row("expert_ids", "id -1", ids(lambda a: np.where(a == a[0, 0], -1, a)), ValueError)
    row("expert_ids", "id 2^32 (wraps to 0 in int32)", ids(lambda a: np.where(a == a[0, 0], 1 << 32, a)),
        ValueError)
    row("expert_ids", "id 2^31", ids(lambda a: np.where(a == a[0, 0], 1 << 31, a)), ValueError)
    if torch is not None:
        row("expert_ids", "torch float", ids(lambda a: torch.from_numpy(a.astype(np.float32))),
            TypeError)
    w = lambda f: lambda c: {"weights": f(c.p.w)}  # noqa: E731
    row("weights", "list", w(lambda a: a.tolist()), TypeError)
    row("weights", "int64", w(lambda a: a.astype(np.int64)), TypeError)
    row("weights", "bool", w(lambda a: a > 0), TypeError)
    row("weights", "complex64", w(lambda a: a.astype(np.complex64)), TypeError)
    row("weights", "fewer slots", w(lambda a: a[:, :1]), ValueError)
    row("weights", "rank 1", w(lambda a: a[:, 0]), ValueError)
    row("weights", "NaN", w(lambda a: _nan_at(a, (T - 1, K - 1))), ValueError)
    row("weights", "Inf", w(lambda a: _inf_at(a)), ValueError)
    row("weights", "float64 1e300 (Inf in fp32)", w(lambda a: np.full(a.shape, 1e300)),
        ValueError)
    for bad in (1, None, "yes"):
        row("save_for_backward", f"{type(bad).__name__} {bad!r}",
            lambda c, bad=bad: {"kw": {"save_for_backward": bad}}, TypeError)
    return rows


def backward_rows():
    rows = []

    def row(arg, what, action, exc, match=None, **kw):
        rows.append(Row("backward", arg, what, action, exc, match or arg, **kw))

    g = lambda f: lambda c: c.m.backward(f(c.p.dO))  # noqa: E731
    row("grad_output", "list", g(lambda a: a.tolist()), TypeError)
    row("grad_output", "str", g(lambda a: "x"), TypeError)
    row("grad_output", "float64", g(lambda a: a.astype(np.float64)), TypeError)
    row("grad_output", "int32", g(lambda a: a.astype(np.int32)), TypeError)
    row("grad_output", "fewer tokens than the cached forward", g(lambda a: a[:-1]), ValueError)
    row("grad_output", "more tokens than the cached forward", g(lambda a: np.vstack([a, a])),
        ValueError)
    row("grad_output", "wrong hidden size", g(lambda a: a[:, :-1]), ValueError)
    row("grad_output", "rank 1", g(lambda a: a.reshape(-1)), ValueError)
    row("grad_output", "NaN", g(lambda a: _nan_at(a, (T - 1, 0))), ValueError)
    row("grad_output", "Inf", g(lambda a: _inf_at(a)), ValueError)
    row("grad_output", "absurd shape (zero-stride view)", g(lambda a: _huge((10**12, H))),
        ValueError)
    row("handle", "never issued", lambda c: c.m.backward(c.p.dO, handle=12345), RuntimeError,
        "handle")
    row("handle", "str", lambda c: c.m.backward(c.p.dO, handle="0"), RuntimeError, "handle")
    row("grads_out", "list", lambda c: c.m.backward(c.p.dO, grads_out=[]), ValueError)
    row("grads_out", "missing key",
        lambda c: c.m.backward(c.p.dO, grads_out={n: v for n, v in c.grads_out().items()
                                                  if n != GRADS[3]}), ValueError)
    row("grads_out", "extra key",
        lambda c: c.m.backward(c.p.dO, grads_out=c.grads_out(extra=np.zeros(3, np.float32))),
        ValueError)
    for n in GRADS:
        def go(f, n=n):
            return lambda c: c.m.backward(c.p.dO, grads_out=c.grads_out(
                **{n: f(c.grads_out()[n])}))
        key = f"grads_out['{n}']"
        row(key, "read-only", go(_readonly), ValueError, re.escape(key) + ": must be writable")
        row(key, "non-contiguous", go(_strided), ValueError, re.escape(key))
        row(key, "float64", go(lambda a: a.astype(np.float64)), TypeError, re.escape(key))
        row(key, "wrong shape", go(lambda a: a[:-1]), ValueError, re.escape(key))
        row(key, "list", go(lambda a: a.tolist()), TypeError, re.escape(key))
    return rows


def update_rows():
    rows = []
    if torch is None:
        return rows

    def replaced(f, i):
        def action(c):
            params = [torch.nn.Parameter(torch.from_numpy(a)) for a in c.p.lora]
            c.m.init_lora_weights(*params)      # the same memory as before: nothing changes
            with torch.no_grad():
                params[i].data = f(params[i].data)
            c.m.update_lora_weights()
        return action

    for i, name in enumerate(LORA):
        rows.append(Row("update_lora_weights", name, "storage replaced by a wrong shape",
                        replaced(lambda t: t[:-1].clone(), i), ValueError, name))
        rows.append(Row("update_lora_weights", name, "storage replaced by float64",
                        replaced(lambda t: t.double(), i), TypeError, name))
    return rows


MATRIX = ctor_rows() + load_weights_rows() + init_lora_rows() + forward_rows() + backward_rows() \
    + update_rows()


def _params():
    out = []
    for row in MATRIX:
        for dtype in row.dtypes:
            marks = [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
            out.append(pytest.param(row, dtype, id=f"{row.id}-{dtype}", marks=marks))
    return out


@pytest.mark.parametrize("row,dtype", _params())
def test_bad_input(row, dtype):
    ctx = Ctx(dtype) if row.stateful else None
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # numpy's overflow-in-cast notice
            with pytest.raises(row.exc, match=row.match):
                row.action(ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"the refused call allocated {peak / 2**20:.1f} MiB"
    if ctx is not None:
        ctx.assert_unchanged()


# ---------------------------------------------------------------------------
# inputs that look odd but are valid: same result as the plain call
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_non_contiguous_and_read_only_inputs_are_accepted(dtype):
    """Inputs that are only read may be strided or read-only; the result is
    bitwise that of the contiguous call."""
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    want = p.run(p.wrapper(dtype=dtype, threads=1))
    m = ktsft.SFTMoEWrapper(0, E, K, H, I, cpuinfer_threads=1, lora_rank=R, lora_alpha=p.alpha,
                            dtype=dtype)
    m.load_weights(gate_proj=_strided(p.gate_proj), up_proj=_readonly(p.up_proj),
                   down_proj=np.asfortranarray(p.down_proj))
    m.init_lora_weights(*[_readonly(a) for a in p.lora])
    out = m.forward_sft(_strided(p.x), _readonly(_strided(p.ids)),
                        np.asfortranarray(p.w))
    dx, grads = m.backward(_readonly(p.dO))
    got = {"out": out, "grad_input": dx, **grads}
    for n, v in want.items():
        assert np.array_equal(got[n], v), n


# ---------------------------------------------------------------------------
# calls out of order
# ---------------------------------------------------------------------------
def _ready(depth=1, dtype="fp32"):
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    return p, p.wrapper(dtype=dtype, threads=1, depth=depth)


def test_forward_before_load_weights():
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    m = ktsft.SFTMoEWrapper(0, E, K, H, I, lora_rank=R, lora_alpha=p.alpha, dtype="fp32",
                            cpuinfer_threads=1)
    with pytest.raises(RuntimeError, match="load_weights"):
        m.forward_sft(p.x, p.ids, p.w)
    with pytest.raises(RuntimeError, match="load_weights"):
        m.backward(p.dO)
    m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    with pytest.raises(RuntimeError, match="init_lora_weights"):
        m.forward_sft(p.x, p.ids, p.w)
    with pytest.raises(RuntimeError, match="init_lora_weights"):
        m.update_lora_weights()
    assert m.cache_depth == 0
    m.init_lora_weights(*p.lora)
    got = p.run(m)
    want = p.run(p.wrapper(threads=1))
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_backward_first_and_twice():
    p, m = _ready()
    with pytest.raises(RuntimeError, match="no cached forward"):
        m.backward(p.dO)
    first = p.run(m)
    with pytest.raises(RuntimeError, match="no cached forward"):
        m.backward(p.dO)
    m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    with pytest.raises(RuntimeError, match="no cached forward"):
        m.backward(p.dO)
    again = p.run(m)
    for n in first:
        assert np.array_equal(first[n], again[n]), n


def test_backward_with_used_handle():
    p, m = _ready(depth=2)
    _, h = m.forward_sft(p.x, p.ids, p.w, return_handle=True)
    m.backward(p.dO, handle=h)
    m.forward_sft(p.x, p.ids, p.w)
    with pytest.raises(RuntimeError, match="handle"):
        m.backward(p.dO, handle=h)
    assert m.cache_depth == 1
    m.clear_cache()
    with pytest.raises(RuntimeError, match="no cached forward"):
        m.backward(p.dO)


def test_forward_past_cache_depth_keeps_entries():
    p, m = _ready(depth=2)
    want = p.run(p.wrapper(threads=1))
    m.forward_sft(p.x, p.ids, p.w)
    m.forward_sft(p.x, p.ids, p.w)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="max_cache_depth"):
            m.forward_sft(p.x * 2, p.ids, p.w)
    assert m.cache_depth == 2
    for _ in range(2):
        got = _backward(m, p.dO)
        for n in got:
            assert np.array_equal(got[n], want[n]), n
    assert m.cache_depth == 0


@pytest.mark.parametrize("experts", [E - 1, E + 1])
def test_init_lora_with_wrong_expert_count(experts):
    p, m = _ready()
    m.forward_sft(p.x, p.ids, p.w)
    before = [a.copy() for a in p.lora]
    wrong = [np.zeros((experts,) + a.shape[1:], np.float32) for a in p.lora]
    with pytest.raises(ValueError, match="gate_lora_a"):
        m.init_lora_weights(*wrong)
    with pytest.raises(ValueError, match="down_lora_b"):
        m.init_lora_weights(*p.lora[:5], wrong[5])
    assert m.cache_depth == 1
    got = _backward(m, p.dO)
    want = p.run(p.wrapper(threads=1))
    for n in got:
        assert np.array_equal(got[n], want[n]), n
    assert all(np.array_equal(a, b) for a, b in zip(p.lora, before))


def test_weight_path_errors(tmp_path):
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    m = ktsft.SFTMoEWrapper(0, E, K, H, I, lora_rank=R, dtype="fp32", cpuinfer_threads=1,
                            weight_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="weight_path"):
        m.load_weights()
    np.save(tmp_path / "gate_proj.npy", p.gate_proj)
    m = ktsft.SFTMoEWrapper(0, E, K, H, I, lora_rank=R, dtype="fp32", cpuinfer_threads=1,
                            weight_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="up_proj.npy"):
        m.load_weights()
    np.save(tmp_path / "up_proj.npy", p.up_proj)
    np.save(tmp_path / "down_proj.npy", p.down_proj[:, :-1])     # wrong shape on disk
    with pytest.raises(ValueError, match="down_proj"):
        m.load_weights()
    assert m.stored_weights() is None


# ---------------------------------------------------------------------------
# 32-bit limits of the native code, on a host with 1 TiB of RAM
# ---------------------------------------------------------------------------
@pytest.fixture
def terabyte_host(monkeypatch):
    """check_memory compares with physical RAM: pretend there is 1 TiB, as on
    a large training server, so that only the 32-bit limits can refuse."""
    real = os.sysconf

    def sysconf(name):
        if name == "SC_PHYS_PAGES":
            return (1 << 40) // real("SC_PAGE_SIZE")
        return real(name)

    monkeypatch.setattr(os, "sysconf", sysconf)


def test_pairs_beyond_int32_refused(terabyte_host):
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        ktsft.SFTMoEWrapper(0, 8, 8, 1, 1, lora_rank=1, chunked_prefill_size=1 << 28)


def test_experts_beyond_int32_refused(terabyte_host):
    with pytest.raises(ValueError, match="num_experts"):
        ktsft.SFTMoEWrapper(0, 1 << 31, 1, 1, 1, dtype="bf16", chunked_prefill_size=1)


# ---------------------------------------------------------------------------
# the docs list the matrix
# ---------------------------------------------------------------------------
def markdown_rows():
    lines = ["| call | argument | bad input | exception | message contains |",
             "|---|---|---|---|---|"]
    for r in MATRIX:
        exc = r.exc_name + (" (**xfail: bug**)" if r.xfail else "")
        frag = r.match.replace("\\", "").replace("|", "\\|")
        lines.append(f"| {r.call} | `{r.arg}` | {r.bad} | {exc} | `{frag}` |")
    return lines


def test_docs_list_the_matrix():
    with open(os.path.join(ROOT, "docs", "hardening.md")) as f:
        doc = f.read()
    missing = [line for line in markdown_rows() if line not in doc]
    assert not missing, ("docs/hardening.md is out of date; regenerate the table with "
                         "`python tests/test_bad_input_matrix.py`. Missing:\n" + "\n".join(missing[:10]))


if __name__ == "__main__":
    sys.stdout.write("\n".join(markdown_rows()) + "\n")
