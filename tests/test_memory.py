"""Memory: the base weights are held once, in the storage dtype; no
transposed or duplicated copy is made, and steady-state steps allocate
nothing new."""
import gc
import os
import tracemalloc

import ml_dtypes
import numpy as np

import ktsft
from conftest import Problem

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _weights(E, H, I, dtype):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s, dtype=np.float32).astype(dtype)
            for n, s in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I)))}


def _held_after_load(m, w):
    """Bytes still allocated (numpy traces into tracemalloc) after load_weights."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m.load_weights(**w)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_bf16_weights_are_used_in_place():
    E, H, I = 16, 512, 256
    w = _weights(E, H, I, ml_dtypes.bfloat16)
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="bf16")
    assert _held_after_load(m, w) < 1 << 16  # no copy at all
    for name, a in w.items():        # the wrapper reads the caller's memory
        assert np.shares_memory(m._base[0][("gate_proj", "up_proj", "down_proj").index(name)], a)


def test_fp32_weights_in_bf16_mode_cost_one_bf16_copy():
    E, H, I = 16, 512, 256
    w = _weights(E, H, I, np.float32)
    bf16_bytes = sum(a.nbytes for a in w.values()) // 2
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="bf16")
    held = _held_after_load(m, w)
    assert bf16_bytes <= held < bf16_bytes + (1 << 16), (held, bf16_bytes)
    assert sum(a.nbytes for a in m._base[0]) == bf16_bytes


def test_fp32_weights_in_fp32_mode_are_used_in_place():
    E, H, I = 8, 256, 128
    w = _weights(E, H, I, np.float32)
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="fp32")
    m.load_weights(**w)
    assert all(np.shares_memory(a, b) for a, b in zip(m._base[0], w.values()))


def test_steps_do_not_grow_memory():
    p = Problem(T=64, H=256, I=128, E=8, k=2, r=8, seed=3)
    m = p.wrapper(dtype="bf16")
    for _ in range(3):
        p.run(m)
    gc.collect()
    before = rss()
    for _ in range(30):
        p.run(m)
    gc.collect()
    assert rss() - before < 2 << 20
