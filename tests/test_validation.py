"""Bad input: a clear Python exception naming the argument, raised before
native code runs, with weights, LoRA and cache unchanged."""
import ml_dtypes
import numpy as np
import pytest

import ktsft
from conftest import Problem

T, H, I, E, K, R = 6, 24, 16, 5, 2, 3


@pytest.fixture
def setup():
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    m = p.wrapper(depth=2)
    m.forward_sft(p.x, p.ids, p.w)  # one entry cached
    snap = {
        "lora": [a.copy() for a in p.lora],
        "base": [a.copy() for a in m.stored_weights()[:3]],
        "depth": m.cache_depth,
        "out": np.array(m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)),
    }
    return p, m, snap


def assert_unchanged(p, m, snap):
    assert m.cache_depth == snap["depth"]
    for a, b in zip(p.lora, snap["lora"]):
        assert np.array_equal(a, b)
    for a, b in zip(m.stored_weights()[:3], snap["base"]):
        assert np.array_equal(a, b)
    out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert np.array_equal(out, snap["out"])


def bad_forward_inputs(p):
    x, ids, w = p.x, p.ids, p.w
    yield "hidden_states", ValueError, (x[:, :-1], ids, w)
    yield "hidden_states", ValueError, (x[None], ids, w)
    yield "hidden_states", TypeError, (x.astype(np.float64), ids, w)
    yield "hidden_states", TypeError, (x.astype(np.int32), ids, w)
    yield "hidden_states", TypeError, ([[1.0] * H] * T, ids, w)
    yield "hidden_states", ValueError, (np.where(np.eye(T, H, dtype=bool), np.nan, x).astype(np.float32), ids, w)
    yield "hidden_states", ValueError, (np.full((T, H), np.inf, np.float32), ids, w)
    yield "expert_ids", ValueError, (x, ids[:-1], w)
    yield "expert_ids", ValueError, (x, ids[:, :1], w)
    yield "expert_ids", TypeError, (x, ids.astype(np.float32), w)
    yield "expert_ids", ValueError, (x, np.where(ids == ids[0, 0], E, ids), w)
    yield "expert_ids", ValueError, (x, np.where(ids == ids[0, 0], -1, ids), w)
    yield "weights", ValueError, (x, ids, w[:, :1])
    yield "weights", TypeError, (x, ids, w.astype(np.int64))
    yield "weights", ValueError, (x, ids, np.full_like(w, np.nan))


def test_bad_forward_inputs(setup):
    p, m, snap = setup
    for name, exc, args in bad_forward_inputs(p):
        with pytest.raises(exc, match=name):
            m.forward_sft(*args)
        assert_unchanged(p, m, snap)


def test_too_many_tokens(setup):
    p = Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)
    m = p.wrapper(chunked_prefill_size=T - 1)
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        m.forward_sft(p.x, p.ids, p.w)
    assert m.cache_depth == 0


def test_bad_grad_output(setup):
    p, m, snap = setup
    for bad in (p.dO[:, :3], p.dO.astype(np.float64), np.full_like(p.dO, np.inf), "x"):
        with pytest.raises((ValueError, TypeError), match="grad_output"):
            m.backward(bad)
        assert_unchanged(p, m, snap)


def test_bad_lora(setup):
    p, m, snap = setup
    names = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
    for i, name in enumerate(names):
        variants = [
            p.lora[i][:, :1],                                  # shape
            p.lora[i].astype(np.float64),                      # dtype
            np.asfortranarray(p.lora[i]) if p.lora[i].shape[1] > 1 else p.lora[i][::-1],
            np.full_like(p.lora[i], np.nan),                   # non-finite
            p.lora[i][:-1],                                    # wrong expert count
        ]
        for bad in variants:
            args = list(p.lora)
            args[i] = bad
            with pytest.raises((ValueError, TypeError), match=name):
                m.init_lora_weights(*args)
            assert_unchanged(p, m, snap)


def test_bad_weights(setup):
    p, m, snap = setup
    good = dict(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    for name in good:
        for bad in (good[name][:, :-1], good[name].astype(np.int32), np.full_like(good[name], np.inf)):
            with pytest.raises((ValueError, TypeError), match=name):
                m.load_weights(**{**good, name: bad})
            assert_unchanged(p, m, snap)
    with pytest.raises(ValueError, match="physical_to_logical_map_cpu"):
        m.load_weights(np.zeros(E, np.int64), **good)
    with pytest.raises(ValueError, match="gate_proj"):
        m.load_weights(up_proj=p.up_proj, down_proj=p.down_proj)
    assert_unchanged(p, m, snap)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_experts_per_tok=9), ValueError, "num_experts_per_tok"),
    (dict(hidden_size=2.5), TypeError, "hidden_size"),
    (dict(lora_rank=0), ValueError, "lora_rank"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(lora_alpha=-1.0), ValueError, "lora_alpha"),
    (dict(max_cache_depth=0), ValueError, "max_cache_depth"),
    (dict(cpuinfer_threads=0), ValueError, "cpuinfer_threads"),
    (dict(threadpool_count=0), ValueError, "threadpool_count"),
    (dict(chunked_prefill_size=0), ValueError, "chunked_prefill_size"),
    (dict(dtype="fp16"), ValueError, "dtype"),
    (dict(num_gpu_experts=2), NotImplementedError, "num_gpu_experts"),
    (dict(isa="avx1024"), ValueError, "isa"),
    (dict(hidden_size=1 << 20, moe_intermediate_size=1 << 20), MemoryError, "GiB"),
])
def test_bad_config(kwargs, exc, name):
    args = dict(layer_idx=0, num_experts=8, num_experts_per_tok=2, hidden_size=16,
                moe_intermediate_size=8)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        ktsft.SFTMoEWrapper(**args)


def test_calls_out_of_order():
    m = ktsft.SFTMoEWrapper(0, 4, 2, 16, 8, lora_rank=2, dtype="fp32")
    x = np.zeros((2, 16), np.float32)
    ids = np.zeros((2, 2), np.int64)
    w = np.ones((2, 2), np.float32)
    with pytest.raises(RuntimeError, match="load_weights"):
        m.forward_sft(x, ids, w)
    with pytest.raises(RuntimeError, match="load_weights"):
        m.backward(x)
    with pytest.raises(RuntimeError, match="init_lora_weights"):
        m.update_lora_weights()


def test_bf16_lora_only_in_bf16_mode():
    p = Problem(T=3, H=16, I=8, E=3, k=2, r=2)
    bf = [a.astype(ml_dtypes.bfloat16) for a in p.lora]
    m = p.wrapper(dtype="fp32")
    with pytest.raises(TypeError, match="gate_lora_a"):
        m.init_lora_weights(*bf)
    m16 = p.wrapper(dtype="bf16")
    m16.init_lora_weights(*bf)  # accepted: fp32 working copy


# ---- the configuration cannot change behind the native layer's back ----
FIXED = ["num_experts", "num_experts_per_tok", "hidden_size",
         "moe_intermediate_size", "num_gpu_experts", "threadpool_count", "lora_rank",
         "lora_alpha", "lora_scaling", "dtype", "isa", "quant_group"]


@pytest.mark.parametrize("name", FIXED)
def test_size_attributes_are_fixed(name):
    from conftest import Problem

    p = Problem()
    m = p.wrapper(dtype="bf16")
    before = p.run(m)
    old = getattr(m, name)
    with pytest.raises(AttributeError, match=f"{name} is fixed when the layer is built"):
        setattr(m, name, 2 * old if isinstance(old, (int, float)) else "fp32")
    assert getattr(m, name) == old
    after = p.run(m)  # still the layer it was
    for k in before:
        assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("name, bad, err", [
    ("cpuinfer_threads", 100_000, ValueError), ("cpuinfer_threads", 0, ValueError),
    ("cpuinfer_threads", 2.5, TypeError), ("lora_dropout", 1.0, ValueError),
    ("lora_dropout", float("nan"), ValueError), ("max_cache_depth", 0, ValueError),
    ("chunked_prefill_size", 2 ** 31, ValueError), ("weight_path", 3, TypeError),
    ("layer_idx", -1, ValueError),
])
def test_tunables_are_validated_when_set(name, bad, err):
    from conftest import Problem

    p = Problem()
    m = p.wrapper()
    old = getattr(m, name)
    with pytest.raises(err, match=name):
        setattr(m, name, bad)
    assert getattr(m, name) == old
    p.run(m)  # the layer still works: nothing reached the native code


def test_tunables_can_change():
    from conftest import Problem

    p = Problem(T=20)
    m = p.wrapper(threads=1)
    ref = p.run(m)
    m.cpuinfer_threads = 3
    m.max_cache_depth = 4
    m.chunked_prefill_size = 64
    m.cpuinfer_threads = None  # back to the default
    got = p.run(m)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def _misaligned(a):
    """A copy of `a` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


def test_misaligned_inputs_are_copied_and_give_the_same_bits():
    """Misaligned ids, routing weights, hidden states and dO (a view into a
    byte buffer) are read through aligned copies: never loaded as
    misaligned elements, and the results are those of aligned inputs."""
    p = Problem(T=6, H=32, I=16, E=4, k=2, r=2, seed=3)
    ref = p.run(p.wrapper())
    m = p.wrapper()
    out = m.forward_sft(_misaligned(p.x), _misaligned(p.ids.astype(np.int32)), _misaligned(p.w))
    dx, grads = m.backward(_misaligned(p.dO))
    assert np.array_equal(out, ref["out"]) and np.array_equal(dx, ref["grad_input"])
    for n in grads:
        assert np.array_equal(grads[n], ref[n]), n


def test_in_place_arrays_must_be_aligned():
    p = Problem(T=6, H=32, I=16, E=4, k=2, r=2, seed=3)
    m = p.wrapper()
    lora = [_misaligned(a) for a in p.lora]
    with pytest.raises(ValueError, match="aligned"):
        m.init_lora_weights(*lora)
    with pytest.raises(ValueError, match="out: must be aligned"):
        m.forward_sft(p.x, p.ids, p.w, out=_misaligned(np.zeros((6, 32), np.float32)))


def test_masked_arrays_are_refused():
    p = Problem(T=6, H=32, I=16, E=4, k=2, r=2, seed=3)
    m = p.wrapper()
    x = np.ma.masked_invalid(p.x.copy())
    with pytest.raises(TypeError, match="hidden_states: masked arrays are not supported"):
        m.forward_sft(x, p.ids, p.w)
    with pytest.raises(TypeError, match="weights: masked arrays"):
        m.forward_sft(p.x, p.ids, np.ma.masked_array(p.w))
    assert m.cache_depth == 0


def test_overflow_after_conversion_is_caught():
    """float64 weights beyond float32 become inf in the conversion: the
    finite check runs after it."""
    p = Problem(T=6, H=32, I=16, E=4, k=2, r=2, seed=3)
    m = p.wrapper()
    w = p.w.astype(np.float64)
    w[2, 1] = 1e300
    with pytest.raises(ValueError, match=r"weights: contains a non-finite value at index \(2, 1\)"):
        m.forward_sft(p.x, p.ids, w)


def test_copies_of_a_wrapper_are_refused():
    import copy
    import pickle

    m = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1).wrapper()
    for f in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="native"):
            f(m)


def test_aliased_grads_out_are_refused():
    from ktsft.schema import lora_shapes

    p = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1)
    m = p.wrapper(depth=2)
    shapes = lora_shapes(4, 16, 8, 2)
    m.forward_sft(p.x, p.ids, p.w)
    g = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    g["grad_up_lora_a"] = g["grad_gate_lora_a"]  # the same memory twice
    with pytest.raises(ValueError, match="overlap in memory"):
        m.backward(p.dO, grads_out=g)
    g = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    g["grad_down_lora_b"] = p.lora[5]  # the registered LoRA itself
    with pytest.raises(ValueError, match="overlaps the registered LoRA"):
        m.backward(p.dO, grads_out=g)
    assert m.cache_depth == 1  # the forward is still there
    m.backward(p.dO)
