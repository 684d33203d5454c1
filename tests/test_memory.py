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
    # A first load in the process imports and caches what loading needs (about
    # 1 MB, run alone this test saw it); a tiny layer of the same dtype pays
    # for that first, so only the load under test is measured.
    warm = ktsft.SFTMoEWrapper(0, 2, 1, 32, 16, dtype=m.dtype)
    warm.load_weights(**_weights(2, 32, 16, next(iter(w.values())).dtype))
    del warm
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
        assert np.shares_memory(m.stored_weights()[:3][("gate_proj", "up_proj", "down_proj").index(name)], a)


def test_fp32_weights_in_bf16_mode_cost_one_bf16_copy():
    E, H, I = 16, 512, 256
    w = _weights(E, H, I, np.float32)
    bf16_bytes = sum(a.nbytes for a in w.values()) // 2
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="bf16")
    held = _held_after_load(m, w)
    assert bf16_bytes <= held < bf16_bytes + (1 << 16), (held, bf16_bytes)
    assert sum(a.nbytes for a in m.stored_weights()[:3]) == bf16_bytes


def test_fp32_weights_in_fp32_mode_are_used_in_place():
    E, H, I = 8, 256, 128
    w = _weights(E, H, I, np.float32)
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="fp32")
    m.load_weights(**w)
    assert all(np.shares_memory(a, b) for a, b in zip(m.stored_weights()[:3], w.values()))


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


def test_layers_of_one_shape_share_one_workspace():
    """The per-call scratch (~137 KiB per token at the Qwen3-30B-A3B shape in
    bf16) is one per shape, not one per layer; freed with the last layer."""
    import gc
    import threading
    import weakref

    from conftest import Problem

    p = Problem(T=9, H=40, I=24, E=6, k=2, r=3, seed=4)
    q = Problem(T=9, H=40, I=24, E=6, k=2, r=3, seed=5)
    a, b = p.wrapper(dtype="bf16"), q.wrapper(dtype="bf16")
    ws = a.memory_info()["workspace_id"]
    assert b.memory_info()["workspace_id"] == ws
    assert p.wrapper(dtype="fp32").memory_info()["workspace_id"] != ws
    want = []
    for m, pr in ((a, p), (b, q)):
        out = m.forward_sft(pr.x, pr.ids, pr.w)
        dx, g = m.backward(pr.dO)
        want.append((out.copy(), dx.copy(), {n: v.copy() for n, v in g.items()}))
    errors = []

    def work(m, pr, w):  # two layers of one shape at once: the lock serialises them
        try:
            for _ in range(30):
                out = m.forward_sft(pr.x, pr.ids, pr.w)
                dx, g = m.backward(pr.dO)
                assert np.array_equal(out, w[0]) and np.array_equal(dx, w[1])
                assert all(np.array_equal(g[n], w[2][n]) for n in w[2])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(m, pr, w))
          for m, pr, w in ((a, p, want[0]), (b, q, want[1]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    ref = weakref.ref(a.workspace)
    del a, b, m, ts
    gc.collect()
    assert ref() is None
