"""Long runs: resident memory stays flat over 2,000 training steps, the cache
is freed with its wrapper, and a 500-step LoRA training follows the float64
reference trajectory."""
import ctypes
import gc
import os
import weakref

import ml_dtypes
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import ktsft
from ktsft import reference
from ktsft.schema import lora_shapes
from conftest import Problem

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def rss() -> int:
    """Resident bytes, after handing free heap memory back to the OS: glibc
    raises its mmap threshold after large frees, so freed arrays may sit in
    the heap until trimmed; that is the allocator's choice, not a leak."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim
except (OSError, AttributeError):  # not glibc
    _LIBC = None


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
def test_2000_steps_resident_memory_flat():
    """2,000 forward/backward steps of a mid-size layer (bf16, 1 or 2 threads),
    varying the batch, mixing handle-paired and LIFO backwards, forwards
    without caching and LoRA refreshes from bf16 sources: after a warm-up
    that reaches the largest batch, resident memory may not grow by more
    than 6 MiB (a leak of one 64-token output per step would be 120 MiB),
    and the wrapper's bookkeeping stays bounded."""
    E, K, H, I, R, TMAX = 8, 2, 256, 128, 8, 64
    p = Problem(T=TMAX, H=H, I=I, E=E, k=K, r=R, seed=3)
    m = p.wrapper(dtype="bf16", threads=2, depth=2)
    lora16 = [a.astype(ml_dtypes.bfloat16) for a in p.lora]
    m.init_lora_weights(*lora16)          # bf16 sources: update_lora_weights copies
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, TMAX + 1, 2000)
    sizes[:4] = TMAX
    grads_out = {n: np.zeros(s, np.float32) for n, s in lora_shapes(
        m.num_experts, m.hidden_size, m.moe_intermediate_size, m.lora_rank).items()}
    samples = []
    baseline = None
    for step, T in enumerate(sizes):
        # every 10th step on 2 threads: the parallel path is in the measured
        # window, and a loaded 2-core machine (where every parallel region
        # waits for a time slice) does not stretch the test
        m.cpuinfer_threads = 2 if step % 10 == 9 else 1
        x, ids, w, dO = p.x[:T], p.ids[:T], p.w[:T], p.dO[:T]
        if step % 4 == 0:
            m.forward_sft(x, ids, w)
            m.backward(dO)
        elif step % 4 == 1:                # two in flight, paired by handle
            _, h1 = m.forward_sft(x, ids, w, return_handle=True)
            _, h2 = m.forward_sft(x[::-1].copy(), ids, w, return_handle=True)
            m.backward(dO, handle=h1, grads_out=grads_out)
            m.backward(dO, handle=h2)
        elif step % 4 == 2:
            m.forward_sft(x, ids, w, save_for_backward=False)
            m.forward_sft(x, ids, w)
            m.backward(dO)
        else:
            _, h = m.forward_sft(x, ids, w, return_handle=True)
            m.release(h)
            m.update_lora_weights()
        if step == 199:
            gc.collect()
            baseline = rss()
        elif step > 199 and step % 200 == 199:
            gc.collect()
            samples.append(rss() - baseline)
    assert m.cache_depth == 0
    assert len(m.cache_entries()["spare"]) <= m.max_cache_depth + 1, len(m.cache_entries()["spare"])
    growth = max(samples)
    assert growth < 6 * MiB, f"RSS grew by {growth / MiB:.1f} MiB after warm-up: {samples}"


def _cache_arrays(m):
    return [a for e in m.cache_entries()["cached"] + m.cache_entries()["spare"] for a in e.storage.values()]


def test_cache_freed_with_wrapper():
    """A wrapper holding ~48 MiB of cached forwards: deleting it frees the
    entries (weak references die, by reference counting alone, without the
    cycle collector) and returns the memory to the OS."""
    T, H, I, E, K, R = 1024, 1024, 1024, 4, 2, 8
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=1)
    m = p.wrapper(dtype="bf16", threads=2, depth=2)
    m.forward_sft(p.x, p.ids, p.w)
    m.forward_sft(p.x, p.ids, p.w)
    assert m.cache_depth == 2
    held = sum(a.nbytes for a in _cache_arrays(m))
    assert held >= 2 * T * (H + 2 * K * I) * 4
    refs = [weakref.ref(m)] + [weakref.ref(a) for a in _cache_arrays(m)]
    refs += [weakref.ref(a) for a in m.workspace.arrays.values()]
    gc.collect()
    before = rss()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del m
        alive = [r for r in refs if r() is not None]
    finally:
        if was_enabled:
            gc.enable()
    assert not alive, f"{len(alive)} objects outlive the wrapper without the cycle collector"
    freed = before - rss()
    assert freed > 0.8 * held, f"freed {freed / MiB:.1f} MiB of {held / MiB:.1f} MiB cached"


def test_clear_cache_frees_memory():
    T, H, I, E, K, R = 1024, 1024, 1024, 4, 2, 8
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=1)
    m = p.wrapper(dtype="bf16", threads=2, depth=2)
    m.forward_sft(p.x, p.ids, p.w)
    m.forward_sft(p.x, p.ids, p.w)
    held = sum(a.nbytes for a in _cache_arrays(m))
    gc.collect()
    before = rss()
    m.clear_cache()
    assert m.cache_depth == 0 and not m.cache_entries()["spare"]
    assert before - rss() > 0.8 * held
    # still usable afterwards
    m.forward_sft(p.x[:8], p.ids[:8], p.w[:8])
    m.backward(p.dO[:8])


# ---------------------------------------------------------------------------
# long-run numerics
# ---------------------------------------------------------------------------
class Trainer:
    """LoRA of a student layer trained by SGD with momentum toward a teacher
    (the same base weights with a different LoRA); loss = mean squared error
    over the batch.  One implementation per backend, the same arithmetic for
    the optimizer (float64)."""

    E, K, H, I, R, T, ALPHA = 4, 2, 32, 24, 4, 48, 8.0

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        E, K, H, I, R, T = self.E, self.K, self.H, self.I, self.R, self.T
        f = np.float32
        self.base = [(rng.standard_normal(s) / np.sqrt(s[-1])).astype(f)
                     for s in ((E, I, H), (E, I, H), (E, H, I))]
        shapes = [(E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R)]
        teacher = [(0.5 * rng.standard_normal(s) / np.sqrt(s[-1])).astype(f) for s in shapes]
        # student: A random, B zero (PEFT init)
        self.lora0 = [(0.5 * rng.standard_normal(s) / np.sqrt(s[-1])).astype(f) if i % 2 == 0
                      else np.zeros(s, f) for i, s in enumerate(shapes)]
        self.batches = []
        for _ in range(4):
            x = rng.standard_normal((T, H)).astype(f)
            ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
            w = rng.dirichlet(np.ones(K), T).astype(f)
            y, _ = reference.forward(x, ids, w, *self.base, *teacher, self.ALPHA / R)
            self.batches.append((x, ids, w, y.astype(f)))

    def losses(self, backend, steps=500, lr=0.01, momentum=0.9, isa=None):
        lora = [a.copy() for a in self.lora0]
        vel = [np.zeros(a.shape) for a in lora]
        if backend != "reference":
            m = ktsft.SFTMoEWrapper(0, self.E, self.K, self.H, self.I, cpuinfer_threads=1,
                                    lora_rank=self.R, lora_alpha=self.ALPHA, dtype=backend,
                                    isa=isa)
            m.load_weights(gate_proj=self.base[0], up_proj=self.base[1], down_proj=self.base[2])
            m.init_lora_weights(*lora)            # zero-copy: the in-place updates below are seen
        names = ("grad_gate_lora_a", "grad_gate_lora_b", "grad_up_lora_a", "grad_up_lora_b",
                 "grad_down_lora_a", "grad_down_lora_b")
        out = []
        for step in range(steps):
            x, ids, w, y = self.batches[step % len(self.batches)]
            if backend == "reference":
                pred, ctx = reference.forward(x, ids, w, *self.base, *lora, self.ALPHA / self.R)
            else:
                pred = m.forward_sft(x, ids, w).astype(np.float64)
            diff = pred - y
            out.append(0.5 * float(np.mean(np.sum(diff * diff, axis=1))))
            dO = (diff / self.T).astype(np.float32)
            if backend == "reference":
                _, grads = reference.backward(dO, ctx)
            else:
                _, grads = m.backward(dO)
            for a, v, n in zip(lora, vel, names):
                v *= momentum
                v += np.asarray(grads[n], np.float64)
                a -= (lr * v).astype(np.float32)      # in place: the wrapper reads this memory
        return np.array(out)


def test_500_step_training_follows_reference():
    """500 SGD-momentum steps toward a teacher: the loss falls by > 10x, the
    fp32 loss curve stays within 1e-5 (relative) of the float64 reference
    at every step and the bf16 curve within 5% (bf16 rounds activations and
    weights, so its trajectory drifts, but must not diverge).  Seen on this
    machine over 5 seeds and every ISA: fp32 <= 4e-7, bf16 <= 1.3e-2; the
    learning rate keeps the optimizer well inside its stable range (at 5x it
    diverges, and near the edge trajectories separate chaotically)."""
    tr = Trainer()
    with threadpool_limits(1):    # tiny float64 products: BLAS threads only contend
        ref = tr.losses("reference")
    assert ref[-1] < ref[0] / 10, (ref[0], ref[-1])
    fp32 = tr.losses("fp32")
    rel32 = np.max(np.abs(fp32 - ref) / ref)
    assert rel32 < 1e-5, f"fp32 loss curve departs from the reference by {rel32:.2e}"
    bf16 = tr.losses("bf16")
    rel16 = np.max(np.abs(bf16 - ref) / ref)
    assert rel16 < 5e-2, f"bf16 loss curve departs from the reference by {rel16:.2e}"
    assert np.all(np.isfinite(bf16)) and bf16[-1] < bf16[0] / 10
