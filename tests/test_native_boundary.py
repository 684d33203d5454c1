"""The kernel module's boundary: the cache entry and the workspace are its
own typed objects (moe_sft.pxd), checked to be of the layer's shape; every
other array is checked where it is bound (moe_sft._arg: element kind,
C-contiguity, writability, the size the layer needs).  A layout slip on the
Python side raises an exception naming what is wrong, instead of an
out-of-bounds access in nogil code; a refused registration leaves the
registered arrays in place; a corrupted entry's routing is refused before
the backward indexes with it."""
import numpy as np
import pytest

from ktsft._kernels.moe_sft import MoEKernel, adamw_step, cast_checked
from ktsft.buffers import CacheEntry, Workspace, lora_shapes

E, K, H, I, R, T = 5, 2, 16, 8, 2, 7


def _layer(seed=0):
    g = np.random.default_rng(seed)
    kern = MoEKernel(E, K, H, I, R, 2.0, False, "scalar")
    w = [np.ascontiguousarray(g.standard_normal(s, dtype=np.float32) * 0.1)
         for s in ((E, I, H), (E, I, H), (E, H, I))]
    kern.set_base_weights(*w, np.arange(E, dtype=np.int32))
    shapes = lora_shapes(E, H, I, R)
    lora = [g.standard_normal(shapes[f"grad_{n}"], dtype=np.float32) * 0.1
            for n in ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a",
                      "down_lora_b")]
    kern.set_lora(*lora)
    return kern, w, lora


def _inputs(seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((T, H), dtype=np.float32)
    ids = np.stack([g.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    rw = g.random((T, K), dtype=np.float32)
    return x, ids, rw


def _forward(kern, cache=None, ws=None, out=None, x=None, ids=None, rw=None):
    x0, ids0, rw0 = _inputs()
    x = x0 if x is None else x
    entry = CacheEntry(T, E, H, I, K, R) if cache is None else cache
    ws = Workspace(H, I, K, R, False) if ws is None else ws
    out = np.empty((T, H), np.float32) if out is None else out
    kern.forward(x, x, ids0 if ids is None else ids, rw0 if rw is None else rw, entry, ws, out, 1)
    return out, entry, ws


def test_valid_arrays_run():
    kern, _, _ = _layer()
    out, _, _ = _forward(kern)
    assert np.isfinite(out).all() and np.abs(out).sum() > 0


def test_entry_and_workspace_are_typed_and_of_the_layers_shape():
    kern, _, _ = _layer()
    entry = CacheEntry(T, E, H, I, K, R)
    with pytest.raises(TypeError):  # loose arrays cannot stand in for an entry
        _forward(kern, cache=dict(entry.arrays))
    with pytest.raises(TypeError):
        _forward(kern, ws=dict(Workspace(H, I, K, R, False).view(T)))
    for other in (CacheEntry(T, E + 1, H, I, K, R), CacheEntry(T, E, H, I + 1, K, R),
                  CacheEntry(T, E, H, I, K, R + 1)):
        with pytest.raises(ValueError, match=r"a cache entry of \(E, H, I, k, r\)"):
            _forward(kern, cache=other)
    with pytest.raises(ValueError, match="tokens, the cache entry holds"):
        _forward(kern, cache=CacheEntry(T + 3, E, H, I, K, R).resize(T - 1))
    with pytest.raises(ValueError, match=r"a workspace of \(H, I, k, r, bf16\)"):
        _forward(kern, ws=Workspace(H, I, K, R, True))
    with pytest.raises(ValueError, match="resize"):
        entry.resize(T + 1)  # more than it holds


def test_kind_contiguity_and_writability():
    kern, _, _ = _layer()
    x, ids, rw = _inputs()
    with pytest.raises(ValueError, match="expert_ids: expected int32"):
        _forward(kern, ids=ids.astype(np.int64))
    with pytest.raises(ValueError, match="routing_weights"):
        _forward(kern, rw=rw[:, :1].copy())
    with pytest.raises(ValueError, match="out: expected a C-contiguous writable"):
        _forward(kern, out=np.empty((H, T), np.float32).T)
    ro = np.empty((T, H), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a C-contiguous writable"):
        _forward(kern, out=ro)
    with pytest.raises(ValueError, match=r"x32: expected \[T, 16\]"):
        _forward(kern, x=np.zeros((T, H + 1), np.float32))


def test_backward_needs_the_forwards_tokens():
    kern, _, _ = _layer()
    _, entry, ws = _forward(kern)
    shapes = lora_shapes(E, H, I, R)
    grads = {n: np.empty(s, np.float32) for n, s in shapes.items()}
    do = np.ones((T - 1, H), np.float32)  # a dO of another T
    with pytest.raises(ValueError, match="tokens, the cache entry holds 7 .its forward's."):
        kern.backward(entry, do, do, ws, grads, np.empty((T - 1, K), np.float32),
                      np.empty((T - 1, H), np.float32), 1)
    do = np.ones((T, H), np.float32)
    short = dict(grads)
    short["grad_down_lora_b"] = short["grad_down_lora_b"][:-1]
    with pytest.raises(ValueError, match="grad_down_lora_b: .* exactly"):
        kern.backward(entry, do, do, ws, short, np.empty((T, K), np.float32),
                      np.empty((T, H), np.float32), 1)
    # and the valid call still runs
    kern.backward(entry, do, do, ws, grads, np.empty((T, K), np.float32),
                  np.empty((T, H), np.float32), 1)


def test_refused_registration_keeps_the_registered_arrays():
    kern, w, lora = _layer()
    ref, _, _ = _forward(kern)
    with pytest.raises(ValueError, match="down_lora_b: .* exactly"):
        kern.set_lora(*lora[:5], lora[5][:, :-1].copy())
    with pytest.raises(ValueError, match=r"down: shape \(5, 8, 16\), the layer needs \(5, 16, 8\)"):
        kern.set_base_weights(w[0], w[1], np.ascontiguousarray(w[2].transpose(0, 2, 1)),
                              np.arange(E, dtype=np.int32))
    with pytest.raises(ValueError, match="gate: expected float32 weights"):
        kern.set_base_weights(w[0].astype(np.float64), w[1], w[2], np.arange(E, dtype=np.int32))
    with pytest.raises(ValueError, match="slot: .* exactly 5"):
        kern.set_base_weights(*w, np.arange(E + 1, dtype=np.int32))
    got, _, _ = _forward(kern)
    assert np.array_equal(got, ref)


def test_adamw_and_cast_sizes():
    p = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="adamw_step"):
        adamw_step(p, np.zeros(9, np.float32), np.zeros(10, np.float32), np.zeros(10, np.float32),
                   None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, False, 1, "scalar")
    with pytest.raises(ValueError, match="cast target: 9 elements"):
        cast_checked(np.zeros(10, np.float32), np.zeros(9, np.float32), 1, "scalar")


@pytest.mark.parametrize("field, value, match", [
    ("order", (0, 99), "names an expert outside the layer"),
    ("order", (0, -1), "names an expert outside the layer"),
    ("offs", (1, 10**6), "not the offsets"),
    ("pair_tok", (0, T + 5), "names a token outside"),
])
def test_backward_refuses_a_corrupted_entry(field, value, match):
    """The routing a forward wrote is checked before the backward's tasks
    index with it (a cache entry written by anything but this layer's
    forward raises instead of reading out of bounds)."""
    kern, _, _ = _layer()
    _, entry, ws = _forward(kern)
    shapes = lora_shapes(E, H, I, R)
    grads = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    do = np.ones((T, H), np.float32)
    a = entry.storage[field]  # the entry's own memory, corrupted in place
    i, v = value
    if field == "order":
        i = 1  # the first expert (order[0] is the count)
    a[i] = v
    with pytest.raises(ValueError, match=match):
        kern.backward(entry, do, do, ws, grads, np.empty((T, K), np.float32),
                      np.empty((T, H), np.float32), 1)
    _, entry, ws = _forward(kern)
    entry.storage["order"][0] = E + 1
    with pytest.raises(ValueError, match="experts, the layer has"):
        kern.backward(entry, do, do, ws, grads, np.empty((T, K), np.float32),
                      np.empty((T, H), np.float32), 1)


def test_misaligned_arrays_are_refused_at_the_boundary():
    kern, _, _ = _layer()
    x, ids, rw = _inputs()
    buf = np.zeros(rw.nbytes + 1, np.uint8)
    bad = np.frombuffer(buf.data, np.float32, rw.size, 1).reshape(rw.shape)
    bad[...] = rw
    with pytest.raises(ValueError, match="routing_weights: not aligned"):
        _forward(kern, rw=bad)
