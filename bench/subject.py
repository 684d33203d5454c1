"""Measuring ktsft itself: one layer's forward_sft + backward times, the
resident memory they add, and the fixed per-call cost on a tiny layer."""
from __future__ import annotations

import statistics
import time

import numpy as np

import ktsft

from . import memory
from .contention import Gauge
from .data import activations, base_weights, lora_weights, routing
from .presets import Shape

LORA_ALPHA = 32.0


def build(shape, dtype: str, isa, rank: int, threads: int, base: dict, lora: tuple):
    """A ready SFTMoEWrapper over the given weights (used in place)."""
    m = ktsft.SFTMoEWrapper(layer_idx=0, num_experts=shape.E, num_experts_per_tok=shape.k,
                            hidden_size=shape.H, moe_intermediate_size=shape.I,
                            cpuinfer_threads=threads, lora_rank=rank, lora_alpha=LORA_ALPHA,
                            max_cache_depth=1, dtype=dtype, isa=isa)  # int4: group picked
    m.load_weights(**base)
    m.init_lora_weights(*lora)
    return m


def measure(m, x, ids, w, gout, repeats: int) -> dict:
    """Median forward / backward seconds over `repeats` steps after a warm-up
    step, and the peak RSS these steps add beyond what was resident before
    (weights, LoRA, inputs) and beyond the activation cache.

    A fresh wrapper should be passed: its first step allocates the
    workspace and touches the LoRA-gradient buffers, which belong in the
    memory figure."""
    T = x.shape[0]
    rss0 = memory.reset_peak()
    fwd_t, bwd_t = [], []
    gauge = Gauge().start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(repeats + 1):  # step 0 is the warm-up
        t0 = time.perf_counter()
        out = m.forward_sft(x, ids, w)
        t1 = time.perf_counter()
        grad_x, grads = m.backward(gout)
        t2 = time.perf_counter()
        if i:
            fwd_t.append(t1 - t0)
            bwd_t.append(t2 - t1)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    other = gauge.stop()
    cache = m.bytes_per_token() * T
    sw = m.stored_weights()
    arrays, scales = sw[:3], sw.scales
    res = {
        # what ktsft holds of the frozen weights: one copy, in its storage dtype
        "weight_bytes": sum(a.nbytes for a in arrays) + sum(s.nbytes for s in scales or ()),
        "fwd_s": statistics.median(fwd_t), "bwd_s": statistics.median(bwd_t),
        "cache_bytes": cache,
        "extra_bytes": memory.peak_rss() - rss0 - cache,
        "lora_grad_bytes": sum(g.nbytes for n, g in grads.items() if n.endswith(("_a", "_b"))),
        # CPU seconds per wall second per thread: well below 1 means the
        # cores were shared with something else during the measurement
        "cpu_share": cpu / wall / m.cpuinfer_threads,
        "other_load": other,  # cores used by other processes meanwhile
        "out": out, "grad_x": grad_x,
    }
    res.update({n: np.asarray(g) for n, g in grads.items()})
    return res


def call_overhead_us(dtype: str, isa, threads: int, calls: int = 400) -> dict:
    """Median µs of one forward_sft and one backward call on a tiny layer
    (E=4, H=I=32, k=2, T=1): argument checking, cache bookkeeping and the
    OpenMP fork/join, with almost no arithmetic."""
    tiny = Shape("overhead", 32, 32, 4, 2)  # int4 needs sizes that are groups
    wdtype = "fp32" if dtype in ("int8", "int4") else dtype
    m = build(tiny, dtype, isa, 4, threads, base_weights(tiny, wdtype), lora_weights(tiny, 4))
    ids, w = routing(1, tiny, "uniform")
    x, g = activations(1, tiny.H)
    fwd_t, bwd_t = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        m.forward_sft(x, ids, w)
        t1 = time.perf_counter()
        m.backward(g)
        t2 = time.perf_counter()
        fwd_t.append(t1 - t0)
        bwd_t.append(t2 - t1)
    skip = calls // 10  # the first calls warm caches and allocate
    return {"fwd_us": 1e6 * statistics.median(fwd_t[skip:]),
            "bwd_us": 1e6 * statistics.median(bwd_t[skip:])}
