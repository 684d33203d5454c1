"""int8 base weights (symmetric, per output channel), dequantized in
registers on every ISA path, forward and backward."""
import numpy as np
import pytest

import ktsft
from conftest import OUTPUTS, Problem, check_against_reference, rel_err
from ktsft.quantize import quantize_int8

CASES = [dict(T=7, H=37, I=29, E=5, k=3, r=3),
         dict(T=40, H=300, I=200, E=4, k=2, r=8),      # packed NN path, row chunks
         dict(T=1, H=33, I=17, E=3, k=1, r=1),
         # 1-3 tokens per expert: the row-streaming NT and NN kernels, with tails
         dict(T=10, H=300, I=200, E=12, k=2, r=4)]


def dequantized(p):
    """The problem with its base weights replaced by what int8 stores."""
    for n in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(p, n)
        deq = np.empty_like(w)
        for e in range(w.shape[0]):
            q, s = quantize_int8(w[e])
            deq[e] = q.astype(np.float64) * s[:, None].astype(np.float64)
        setattr(p, n, deq)
    return p


@pytest.mark.parametrize("case", range(len(CASES)))
def test_int8_matches_reference_on_dequantized_weights(case, isa):
    p = Problem(seed=40 + case, **CASES[case])
    orig = p.reference()
    got = p.run(p.wrapper(dtype="int8", isa=isa))
    check_against_reference(dequantized(p), got, "fp32")  # fp32-exact on what is stored
    # the quantization itself: Gaussian rows (max ~ 3 sigma) lose ~1% per layer
    assert rel_err(got["out"], orig["out"]) < 3e-2


def test_int8_storage_is_a_quarter_of_fp32():
    p = Problem(T=4, H=64, I=32, E=6, k=2, r=2)
    m = p.wrapper(dtype="int8")
    sw = m.stored_weights()
    q, scales = sw[:3], sw.scales
    assert all(a.dtype == np.int8 for a in q)
    fp32 = 3 * p.E * p.H * p.I * 4
    stored = sum(a.nbytes for a in q) + sum(s.nbytes for s in scales)
    assert stored == fp32 // 4 + 4 * p.E * (2 * p.I + p.H)


def test_int8_from_checkpoint_and_map(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    p = Problem(T=9, H=40, I=24, E=5, k=2, r=3, seed=44)
    t = {f"model.layers.0.mlp.experts.{e}.{n}.weight": torch.from_numpy(getattr(p, n)[e])
         for e in range(p.E) for n in ("gate_proj", "up_proj", "down_proj")}
    save_file(t, str(tmp_path / "model.safetensors"))
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha,
                            dtype="int8", weight_path=str(tmp_path))
    m.load_weights(np.array([4, 2, 0, 1, 3]))
    m.init_lora_weights(*p.lora)
    want = p.run(p.wrapper(dtype="int8"))
    got = p.run(m)
    for n in OUTPUTS:
        assert np.array_equal(got[n], want[n]), n


@pytest.mark.parametrize("T", [45, 9])  # tiles; the few-token streaming kernels
def test_int8_deterministic_across_threads(isa, T):
    p = Problem(T=T, H=301, I=203, E=6 if T > 9 else 14, k=3, r=5, seed=45)
    base = p.run(p.wrapper(dtype="int8", isa=isa, threads=1))
    got = p.run(p.wrapper(dtype="int8", isa=isa, threads=3))
    for n in base:
        assert np.array_equal(base[n], got[n]), n


def dequantized4(p, group):
    from ktsft.quantize import dequantize_int4, quantize_int4

    for n in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(p, n)
        deq = np.empty(w.shape, np.float64)
        for e in range(w.shape[0]):
            deq[e] = dequantize_int4(*quantize_int4(w[e], group), group)
        setattr(p, n, deq)
    return p


CASES4 = [dict(T=7, H=64, I=128, E=5, k=3, r=3),
          dict(T=40, H=320, I=256, E=4, k=2, r=8),    # packed NN path, row chunks, tails
          dict(T=1, H=64, I=64, E=3, k=1, r=1),
          dict(T=10, H=320, I=192, E=12, k=2, r=4)]   # 1-3 tokens per expert: streaming


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("case", range(len(CASES4)))
def test_int4_matches_reference_on_dequantized_weights(case, group, isa):
    kw = CASES4[case]
    p = Problem(seed=50 + case, **kw)
    orig = p.reference()
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha,
                            dtype="int4", quant_group=group, isa=isa, cpuinfer_threads=2)
    m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    m.init_lora_weights(*p.lora)
    got = p.run(m)
    check_against_reference(dequantized4(p, group), got, "fp32")
    # int4 itself is lossy: 15-20% on Gaussian weights (max|w| ~ 3 sigma, 15 levels)
    assert rel_err(got["out"], orig["out"]) < 0.35


def test_int4_storage_and_bad_groups():
    p = Problem(T=4, H=128, I=64, E=3, k=2, r=2)
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, dtype="int4", quant_group=32)
    m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    sw = m.stored_weights()
    q, scales = sw[:3], sw.scales
    assert q[0].dtype == np.uint8 and q[0].shape == (3, 64, 64) and q[2].shape == (3, 128, 32)
    assert sum(a.nbytes for a in q) * 8 == 3 * p.E * p.H * p.I * 4 * 1  # half a byte a weight
    assert scales[0].shape == (3, 64, 4) and scales[2].shape == (3, 128, 2)
    with pytest.raises(ValueError, match="quant_group"):
        ktsft.SFTMoEWrapper(0, 3, 2, 96, 64, dtype="int4", quant_group=64)
    with pytest.raises(ValueError, match="quant_group"):
        ktsft.SFTMoEWrapper(0, 3, 2, 128, 64, dtype="int4", quant_group=48)


@pytest.mark.parametrize("H,I,group", [(128, 768, 128), (64, 160, 32), (2880, 2880, 64),
                                        (96, 64, 32)])
def test_int4_group_picked_when_not_given(H, I, group):
    """quant_group=None: the largest built group dividing both input sizes
    (I=160 and gpt-oss' 2880 no longer refused with the default)."""
    m = ktsft.SFTMoEWrapper(0, 2, 1, H, I, dtype="int4", lora_rank=1, chunked_prefill_size=4)
    assert m.quant_group == group
    assert ktsft.SFTMoEWrapper(0, 2, 1, H, I, dtype="bf16", lora_rank=1,
                               chunked_prefill_size=4).quant_group == 128
    with pytest.raises(ValueError, match=r"quant_group=48.*None picks one"):
        ktsft.SFTMoEWrapper(0, 2, 1, H, I, dtype="int4", quant_group=48)


def test_int4_picked_group_matches_reference():
    p = Problem(T=9, H=96, I=160, E=3, k=2, r=2, seed=77)
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha,
                            dtype="int4", cpuinfer_threads=2)
    assert m.quant_group == 32
    m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    m.init_lora_weights(*p.lora)
    check_against_reference(dequantized4(p, 32), p.run(m), "fp32")


def test_int4_without_a_dividing_group_says_what_to_do():
    with pytest.raises(ValueError, match=r"no quant_group in \(128, 64, 32\) divides.*int8"):
        ktsft.SFTMoEWrapper(0, 2, 1, 100, 64, dtype="int4")


@pytest.mark.parametrize("dtype", ["int8", "int4", "bf16", "fp32"])
def test_saved_layer_reloads_as_stored(tmp_path, dtype):
    """save_weights then weight_path: the same stored bytes (no second
    quantization), the same results; the expert map is honoured."""
    p = Problem(T=9, H=64, I=32, E=4, k=2, r=3, seed=47)
    kw = dict(lora_rank=p.r, lora_alpha=p.alpha, dtype=dtype, quant_group=32)
    a = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, **kw)
    a.load_weights(np.array([2, 0, 3, 1]), gate_proj=p.gate_proj, up_proj=p.up_proj,
                   down_proj=p.down_proj)
    a.init_lora_weights(*p.lora)
    a.save_weights(tmp_path / "layer.safetensors")
    b = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, weight_path=str(tmp_path / "layer.safetensors"), **kw)
    b.load_weights()
    b.init_lora_weights(*p.lora)
    want, got = p.run(a), p.run(b)
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_saved_quantized_layer_needs_its_dtype(tmp_path):
    p = Problem(T=4, H=64, I=32, E=3, k=2, r=2, seed=48)
    a = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, dtype="int4", quant_group=32)
    a.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    a.save_weights(tmp_path / "q.safetensors")
    for kw in (dict(dtype="bf16"), dict(dtype="int8")):
        b = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, weight_path=str(tmp_path / "q.safetensors"), **kw)
        with pytest.raises(ValueError, match="saved by ktsft"):
            b.load_weights()


@pytest.mark.parametrize("T", [40, 9])  # tiles; the few-token streaming kernels
def test_int4_deterministic_across_threads(isa, T):
    p = Problem(T=T, H=320, I=192, E=5 if T > 9 else 14, k=3, r=4, seed=46)

    def run(threads):
        m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha,
                                dtype="int4", quant_group=32, isa=isa, cpuinfer_threads=threads)
        m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
        m.init_lora_weights(*p.lora)
        return p.run(m)

    base, got = run(1), run(3)
    for n in base:
        assert np.array_equal(base[n], got[n]), n

