"""The activation cache: LIFO pairing, depth limit, refusals that lose nothing."""
import numpy as np
import pytest

from conftest import Problem, rel_err


def test_two_stacked_forwards_lifo():
    a = Problem(T=9, H=24, I=16, E=4, k=2, r=3, seed=1)
    b = Problem(T=5, H=24, I=16, E=4, k=2, r=3, seed=2)
    b.gate_proj, b.up_proj, b.down_proj, b.lora = a.gate_proj, a.up_proj, a.down_proj, a.lora
    m = a.wrapper(depth=2)
    m.forward_sft(a.x, a.ids, a.w)
    m.forward_sft(b.x, b.ids, b.w)
    assert m.cache_depth == 2
    dx_b, g_b = m.backward(b.dO)
    g_b = {n: np.array(v) for n, v in g_b.items()}
    dx_a, g_a = m.backward(a.dO)
    assert m.cache_depth == 0
    ref_a, ref_b = a.reference(), b.reference()
    assert rel_err(dx_a, ref_a["grad_input"]) < 1e-5
    assert rel_err(dx_b, ref_b["grad_input"]) < 1e-5
    for n in ("grad_gate_lora_a", "grad_down_lora_b", "grad_routing_weights"):
        assert rel_err(g_a[n], ref_a[n]) < 1e-5
        assert rel_err(g_b[n], ref_b[n]) < 1e-5


def test_depth_exceeded_is_refused_and_keeps_entry():
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2)
    m = p.wrapper(depth=1)
    m.forward_sft(p.x, p.ids, p.w)
    with pytest.raises(RuntimeError, match="max_cache_depth"):
        m.forward_sft(p.x * 2, p.ids, p.w)
    assert m.cache_depth == 1
    dx, _ = m.backward(p.dO)
    assert rel_err(dx, p.reference()["grad_input"]) < 1e-5


def test_no_save_caches_nothing():
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2)
    m = p.wrapper(depth=1)
    out = m.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert m.cache_depth == 0
    assert rel_err(out, p.reference()["out"]) < 1e-5
    with pytest.raises(RuntimeError, match="no cached forward"):
        m.backward(p.dO)


def test_backward_shape_mismatch_keeps_entry():
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2)
    m = p.wrapper()
    m.forward_sft(p.x, p.ids, p.w)
    with pytest.raises(ValueError, match="grad_output"):
        m.backward(np.zeros((5, 16), np.float32))
    with pytest.raises(ValueError, match="grad_output"):
        m.backward(np.full((4, 16), np.nan, np.float32))
    assert m.cache_depth == 1
    dx, _ = m.backward(p.dO)
    assert rel_err(dx, p.reference()["grad_input"]) < 1e-5


def test_bytes_per_token_matches_entry():
    from ktsft.buffers import CacheEntry

    H, I, k, r, E, T = 64, 48, 4, 8, 10, 13
    e = CacheEntry(T, E, H, I, k, r)
    assert e.nbytes == CacheEntry.bytes_per_token(H, I, k, r) * T + CacheEntry.bytes_per_entry(E)
    assert CacheEntry.bytes_per_entry(E) == 8 * (E + 1)  # int32 offsets and expert order
    # Qwen3-30B-A3B layer: x + g + u + LoRA vectors + routing
    assert CacheEntry.bytes_per_token(2048, 768, 8, 16) == 4 * (2048 + 2 * 8 * 768 + 3 * 8 * 16 + 4 * 8)


def test_entries_are_reused_and_results_stay_exact():
    big = Problem(T=12, H=24, I=16, E=4, k=2, r=3, seed=1)
    small = Problem(T=5, H=24, I=16, E=4, k=2, r=3, seed=2)
    small.gate_proj, small.up_proj, small.down_proj, small.lora = (
        big.gate_proj, big.up_proj, big.down_proj, big.lora)
    m = big.wrapper(depth=1)
    first = big.run(m)
    storage = m.cache_entries()["spare"][0].storage["G"]
    got = small.run(m)                  # reuses the larger entry's memory
    assert m.cache_entries()["spare"][0].storage["G"] is storage
    ref = small.reference()
    assert rel_err(got["grad_input"], ref["grad_input"]) < 1e-5
    again = big.run(m)
    for n in first:
        assert np.array_equal(first[n], again[n]), n
    m.clear_cache()
    assert not m.cache_entries()["spare"] and m.cache_depth == 0


def test_bf16_input_is_read_as_bf16():
    """In bf16 mode a C-contiguous bf16 input goes to the base GEMMs as it
    is (no fp32 round trip): the same bits as its fp32 widening, and a
    read-only input is never written."""
    import ml_dtypes

    p = Problem(T=9, H=40, I=24, E=4, k=2, r=3, seed=12)
    x16 = p.x.astype(ml_dtypes.bfloat16)
    x16.flags.writeable = False
    a, b = p.wrapper(dtype="bf16"), p.wrapper(dtype="bf16")
    out16 = a.forward_sft(x16, p.ids, p.w)
    out32 = b.forward_sft(x16.astype(np.float32), p.ids, p.w)
    assert out16.dtype == ml_dtypes.bfloat16  # the input's dtype back
    assert np.array_equal(out16.view(np.uint16), out32.astype(ml_dtypes.bfloat16).view(np.uint16))
    g16, r16 = a.backward(p.dO)
    g32, r32 = b.backward(p.dO)
    assert np.array_equal(g16, g32)
    for n in r16:
        assert np.array_equal(r16[n], r32[n]), n
