"""LoRA dropout: the mask hash (C kernel vs its numpy twin, statistics), every
ISA and dtype against the float64 reference run with the same masks,
seeds, thread-count independence, the torch module (training only,
torch.manual_seed, recompute / retained graph / checkpoint) and argument
checks."""
import json
import zlib

import numpy as np
import pytest

import ktsft
from conftest import OUTPUTS, Problem, bf16_round, rel_err
from ktsft import reference
from ktsft._kernels import moe_sft as native

P = 0.3
SEED = 0x0123456789ABCDEF


# ---------------------------------------------------------------------------
# the hash
# ---------------------------------------------------------------------------
def test_kernel_masks_equal_numpy_masks_bitwise(isa):
    tj = np.array([0, 1, 2, 7, 1000, 2**31 - 1])
    for seed in (0, 1, SEED, 2**64 - 1):
        for proj in (0, 1, 2):
            for n, p in ((1, 0.5), (37, 0.1), (300, P), (64, 0.0), (129, 0.999)):
                got = native.dropout_mask(seed, proj, tj, n, p, isa)
                keep = reference.dropout_keep(seed, proj, tj, n, p)
                want = np.where(keep, np.float32(1.0 / (1.0 - p)), np.float32(0.0))
                assert np.array_equal(got, want), (seed, proj, n, p)
    assert native.dropout_threshold(0.1) == reference.dropout_threshold(0.1) == 429496729


def test_keep_rate_and_independence():
    n, rows = 2048, 256
    tj = np.arange(rows)
    for p in (0.05, 0.1, 0.5):
        keep = reference.dropout_keep(7, 0, tj, n, p)
        sd = np.sqrt(p * (1 - p) / keep.size)
        assert abs(keep.mean() - (1 - p)) < 5 * sd, p
        # per row and per column: no row or element index is special
        assert np.abs(keep.mean(axis=1) - (1 - p)).max() < 6 * np.sqrt(p * (1 - p) / n)
        assert np.abs(keep.mean(axis=0) - (1 - p)).max() < 6 * np.sqrt(p * (1 - p) / rows)
    # masks of other projections, rows, seeds and neighbouring elements are
    # uncorrelated (correlation ~ N(0, 1/N))
    a = reference.dropout_keep(7, 0, tj, n, 0.5).astype(np.float64)
    others = {
        "proj": reference.dropout_keep(7, 1, tj, n, 0.5),
        "down": reference.dropout_keep(7, 2, tj, n, 0.5),
        "seed": reference.dropout_keep(8, 0, tj, n, 0.5),
        "seed_hi_bit": reference.dropout_keep(7 + 2**63, 0, tj, n, 0.5),
        "row": reference.dropout_keep(7, 0, tj + 1, n, 0.5),
    }
    for name, b in others.items():
        c = np.corrcoef(a.ravel(), b.astype(np.float64).ravel())[0, 1]
        assert abs(c) < 5 / np.sqrt(a.size), name
    c = np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]
    assert abs(c) < 5 / np.sqrt(a.size), "neighbouring elements"


# ---------------------------------------------------------------------------
# kernels vs the reference with the same masks
# ---------------------------------------------------------------------------
def reference_with_dropout(p, seed, prob, bf16=False):
    rnd = bf16_round if bf16 else (lambda a: a)
    masks = reference.dropout_masks(seed, prob, p.T, p.k, p.H, p.I)
    out, ctx = reference.forward(rnd(p.x), p.ids, p.w, rnd(p.gate_proj), rnd(p.up_proj),
                                 rnd(p.down_proj), *p.lora, p.alpha / p.r,
                                 dropout_masks=masks)
    dx, grads = reference.backward(rnd(p.dO), ctx)
    res = {"out": out, "grad_input": dx}
    res.update(grads)
    return res


def run(p, m, seed=SEED, **kw):
    out = m.forward_sft(p.x, p.ids, p.w, dropout_seed=seed, **kw)
    dx, grads = m.backward(p.dO)
    res = {"out": np.array(out, copy=True), "grad_input": np.array(dx, copy=True)}
    res.update({n: np.array(v, copy=True) for n, v in grads.items()})
    return res


def check(p, got, dtype, seed=SEED, prob=P):
    ref = reference_with_dropout(p, seed, prob)
    ref_b = reference_with_dropout(p, seed, prob, bf16=True) if dtype == "bf16" else None
    plain = p.reference()
    for name in OUTPUTS:
        err = rel_err(got[name], ref[name])
        bound = 1e-5 if dtype == "fp32" else max(1e-2, 1.5 * rel_err(ref_b[name], ref[name]))
        assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} ({dtype})"
        # the masks matter: the result is much closer to the masked
        # reference than to the run without dropout
        if np.any(plain[name]):
            assert rel_err(got[name], plain[name]) > 4 * err, name


CASES = {
    "odd_sizes": dict(T=7, H=37, I=29, E=5, k=3, r=3),
    "rank1_single_token": dict(T=1, H=33, I=17, E=3, k=1, r=1),
    "empty_experts_skewed": dict(T=23, H=48, I=40, E=12, k=2, r=4, routing="skewed"),
    "repeated_ids": dict(T=11, H=24, I=20, E=3, k=3, r=2, allow_repeats=True),
    # several pair blocks per expert, whole-row NN tasks and 256-column blocks
    "blocks": dict(T=80, H=300, I=200, E=3, k=2, r=8),
    # experts of > 1024 pairs: the masked A gradients in column sub-blocks
    # narrower than a gradient block (moe_sft.pyx _drop_cols)
    "hot_experts_sub_blocks": dict(T=2100, H=272, I=48, E=2, k=1, r=2, routing="two_experts"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_with_masks(case, isa, dtype):
    if case == "rank1_single_token" and dtype == "bf16":
        pytest.skip("one short, cancelling dot product per result: bf16 is judged on the "
                    "larger cases")
    p = Problem(seed=zlib.crc32(case.encode()) % 1000, **CASES[case])
    check(p, run(p, p.wrapper(dtype=dtype, isa=isa, lora_dropout=P)), dtype)


@pytest.mark.parametrize("wtype", ["int8", "int4"])
def test_quantized_matches_reference_with_masks(wtype):
    from test_quantized import dequantized, dequantized4

    p = Problem(T=20, H=64, I=96, E=4, k=2, r=4, seed=21)
    kw = {"quant_group": 32} if wtype == "int4" else {}
    got = run(p, p.wrapper(dtype=wtype, lora_dropout=P, **kw))
    check(dequantized(p) if wtype == "int8" else dequantized4(p, 32), got, "fp32")


def test_p0_is_bitwise_the_plain_path(dtype):
    p = Problem(T=21, H=70, I=50, E=5, k=2, r=4, seed=30)
    plain = p.run(p.wrapper(dtype=dtype))
    zero = run(p, p.wrapper(dtype=dtype, lora_dropout=0.0))
    off = run(p, p.wrapper(dtype=dtype, lora_dropout=P), lora_dropout=0.0)   # eval call
    for name in plain:
        assert np.array_equal(zero[name], plain[name]), name
        assert np.array_equal(off[name], plain[name]), name


def test_seeds():
    p = Problem(T=15, H=40, I=24, E=4, k=2, r=3, seed=31)
    m = p.wrapper(lora_dropout=P)
    a, b, c = run(p, m, seed=5), run(p, m, seed=5), run(p, m, seed=6)
    for name in OUTPUTS:
        assert np.array_equal(a[name], b[name]), name
    assert not np.array_equal(a["out"], c["out"])
    # no seed given: drawn from the wrapper's generator, reported, reproducible
    m1, m2 = p.wrapper(lora_dropout=P, dropout_seed=9), p.wrapper(lora_dropout=P, dropout_seed=9)
    o1 = m1.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    s1 = m1.last_dropout_seed
    o2 = m2.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert s1 is not None and s1 == m2.last_dropout_seed and np.array_equal(o1, o2)
    o3 = m1.forward_sft(p.x, p.ids, p.w, save_for_backward=False)
    assert m1.last_dropout_seed != s1 and not np.array_equal(o1, o3)
    o4 = m2.forward_sft(p.x, p.ids, p.w, save_for_backward=False, dropout_seed=s1)
    assert np.array_equal(o1, o4)
    m1.forward_sft(p.x, p.ids, p.w, save_for_backward=False, lora_dropout=0.0)
    assert m1.last_dropout_seed is None


def test_empty_batch():
    p = Problem(T=3, H=16, I=8, E=3, k=2, r=2)
    m = p.wrapper(lora_dropout=0.5)
    out = m.forward_sft(p.x[:0], p.ids[:0], p.w[:0], dropout_seed=1)
    dx, grads = m.backward(p.dO[:0])
    assert out.shape == dx.shape == (0, 16)
    assert not any(np.any(grads[n]) for n in grads)


def test_backward_uses_its_forwards_seed():
    """Two forwards in flight with different seeds, backwards out of order."""
    p = Problem(T=12, H=36, I=20, E=4, k=2, r=3, seed=32)
    want = [run(p, p.wrapper(lora_dropout=P), seed=s) for s in (1, 2)]
    m = p.wrapper(lora_dropout=P, depth=2)
    _, h1 = m.forward_sft(p.x, p.ids, p.w, dropout_seed=1, return_handle=True)
    _, h2 = m.forward_sft(p.x, p.ids, p.w, dropout_seed=2, return_handle=True)
    m.lora_dropout = 0.0  # changing the wrapper's p after the forward changes nothing
    for h, w in ((h1, want[0]), (h2, want[1])):
        dx, grads = m.backward(p.dO, handle=h)
        assert np.array_equal(dx, w["grad_input"])
        for n in ("grad_gate_lora_a", "grad_down_lora_a", "grad_up_lora_b"):
            assert np.array_equal(grads[n], w[n]), n


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_bitwise_across_thread_counts(isa, dtype, routing):
    p = Problem(T=45, H=301, I=203, E=4, k=3, r=5, seed=33, routing=routing)
    base = run(p, p.wrapper(dtype=dtype, isa=isa, threads=1, lora_dropout=P))
    for threads in (2, 3):
        got = run(p, p.wrapper(dtype=dtype, isa=isa, threads=threads, lora_dropout=P))
        for name, ref in base.items():
            assert np.array_equal(got[name], ref), f"{name} differs with {threads} threads"


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad, exc", [(1.0, ValueError), (-0.1, ValueError),
                                      (float("nan"), ValueError), (float("inf"), ValueError),
                                      ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_lora_dropout(bad, exc):
    p = Problem(T=3, H=16, I=8, E=3, k=2, r=2)
    with pytest.raises(exc, match="lora_dropout"):
        ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, lora_rank=2, dtype="fp32", lora_dropout=bad)
    m = p.wrapper()
    if bad is not None:  # None means "the wrapper's" in forward_sft
        with pytest.raises(exc, match="lora_dropout"):
            m.forward_sft(p.x, p.ids, p.w, lora_dropout=bad)
    assert m.cache_depth == 0
    if exc is ValueError:
        for f in (native.dropout_threshold, reference.dropout_threshold):
            with pytest.raises(ValueError, match="lora_dropout"):
                f(bad)


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError),
                                      ("3", TypeError), (False, TypeError)])
def test_bad_dropout_seed(bad, exc):
    p = Problem(T=3, H=16, I=8, E=3, k=2, r=2)
    m = p.wrapper(lora_dropout=P)
    with pytest.raises(exc, match="dropout_seed"):
        m.forward_sft(p.x, p.ids, p.w, dropout_seed=bad)
    with pytest.raises(exc, match="dropout_seed"):
        ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, lora_rank=2, dtype="fp32", dropout_seed=bad)
    assert m.cache_depth == 0


def test_adapter_records_lora_dropout_in_metadata_not_config(tmp_path):
    """Adapter files carry lora_dropout 0.0 in adapter_config.json (PEFT's
    ParamWrapper refuses any other value; dropout does not change what the
    adapter computes) and the training value in the safetensors metadata
    (ktsft.lora_dropout), which load_adapter returns as config["lora_dropout"]."""
    from safetensors import safe_open

    from ktsft.adapters import CONFIG, META_DROPOUT, WEIGHTS, load_adapter

    p = Problem(T=3, H=16, I=8, E=3, k=2, r=2)
    for sub, write, value in (("a", "save_adapter", 0.05), ("f", "export_peft_fused", 0.1)):
        w = p.wrapper(lora_dropout=value)
        getattr(w, write)(tmp_path / sub)
        with open(tmp_path / sub / CONFIG) as f:
            assert json.load(f)["lora_dropout"] == 0.0
        with safe_open(str(tmp_path / sub / WEIGHTS), framework="np") as f:
            assert f.metadata()[META_DROPOUT] == repr(value)
        config, _ = load_adapter(tmp_path / sub, layer=0, num_experts=p.E)
        assert config["lora_dropout"] == value
        # the wrapper's own load: the adapter's value is reported, its own kept
        other = p.wrapper(lora_dropout=0.0)
        assert other.load_adapter(tmp_path / sub)["lora_dropout"] == value
        assert other.lora_dropout == 0.0


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------
def _torch_setup(**kw):
    torch = pytest.importorskip("torch")
    from test_torch_module import batch, make

    m, wb = make(lora_dropout=P, **kw)
    return torch, m, wb, batch


def _grads(m, x, w):
    return [x.grad.clone(), w.grad.clone()] + [q.grad.clone() for q in m.lora_parameters()]


def test_torch_matches_eager_autograd_with_the_same_masks():
    torch, m, wb, batch = _torch_setup()
    from test_torch_module import E, H, I, K, rel
    from ktsft.eager import eager_moe_forward

    x, ids, w = batch(13)
    dO = torch.randn(13, H)
    torch.manual_seed(5)
    seed = int(torch.randint(1 << 62, (1,)).item())
    torch.manual_seed(5)
    out = m(x, ids, w)
    out.backward(dO)
    assert m.wrapper.last_dropout_seed == seed
    leaves = [[q.detach()[e].clone().requires_grad_() for e in range(E)]
              for q in m.lora_parameters()]
    xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = eager_moe_forward(xe, ids, we, *wb, leaves, m.scaling, torch.float32,
                            reference.dropout_masks(seed, P, 13, K, H, I))
    ref.backward(dO)
    assert rel(out, ref) < 1e-5
    assert rel(x.grad, xe.grad) < 1e-5 and rel(w.grad, we.grad) < 1e-5
    for q, ls in zip(m.lora_parameters(), leaves):
        assert rel(q.grad, torch.stack([l.grad if l.grad is not None else torch.zeros_like(l)
                                        for l in ls])) < 1e-5


def test_torch_eval_and_manual_seed():
    torch, m, _, batch = _torch_setup()
    from test_torch_module import make

    plain, _ = make()
    x, ids, w = batch(9)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x, ids, w), plain(x, ids, w))      # eval: no dropout
        m.train()
        torch.manual_seed(0)
        a = m(x, ids, w)
        b = m(x, ids, w)
        torch.manual_seed(0)
        c = m(x, ids, w)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert not torch.equal(a, plain(x, ids, w))
    m.lora_dropout = 0.0
    with torch.no_grad():
        assert torch.equal(m(x, ids, w), plain(x, ids, w))
    with pytest.raises(ValueError, match="lora_dropout"):
        m.lora_dropout = 1.0
    import ktsft.torch as kt
    with pytest.raises(ValueError, match="lora_dropout"):
        kt.LoRAExperts(4, 2, 16, 8, r=2, lora_dropout=-0.5)


def test_torch_recompute_retain_graph_and_checkpoint_reuse_the_masks():
    torch, m, _, batch = _torch_setup()
    from torch.utils.checkpoint import checkpoint

    x, ids, w = batch(11, seed=12)

    def step(mode):
        m.zero_grad()
        x.grad = w.grad = None
        torch.manual_seed(42)
        m.recompute = mode == "recompute"
        if mode == "checkpoint":
            out = checkpoint(m, x, ids, w, use_reentrant=False)
        else:
            out = m(x, ids, w)
        loss = out.square().sum()
        if mode == "retain":
            loss.backward(retain_graph=True)
            loss.backward()  # cache spent: recomputed with the ctx's seed
        else:
            loss.backward()
        m.recompute = False
        return loss.detach(), _grads(m, x, w)

    loss, ref = step("cached")
    for mode in ("recompute", "checkpoint", "retain"):
        l2, got = step(mode)
        assert torch.equal(l2, loss), mode
        for a, b in zip(got, ref):
            want = 2 * b if mode == "retain" else b
            assert torch.allclose(a, want, rtol=1e-6, atol=0), mode
        if mode != "retain":
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), mode
    assert m.wrapper.cache_depth == 0


def test_torch_gradcheck_float64_with_dropout():
    torch, m, _, batch = _torch_setup(seed=3)
    x, ids, w = batch(3, seed=4)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()

    def f(x_, w_):
        torch.manual_seed(123)   # the same masks for every evaluation
        return m(x_, ids, w_).double()

    assert torch.autograd.gradcheck(f, (xd, wd), eps=1e-2, atol=2e-3, rtol=2e-2)


def test_apply_lora_experts_passes_lora_dropout(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_transformers import build, randomize_lora_b, tokens
    from ktsft.integrations.transformers import (EagerHFLoRAExperts, HFLoRAExperts,
                                                 apply_lora_experts, save_lora_experts)

    for backend, cls in (("ktsft", HFLoRAExperts), ("eager", EagerHFLoRAExperts)):
        model = apply_lora_experts(build("qwen3_moe"), r=4, dtype="fp32", threads=2,
                                   backend=backend, lora_dropout=0.2)
        mods = [m for m in model.modules() if isinstance(m, cls)]
        assert mods and all(m.lora_dropout == 0.2 for m in mods)
        randomize_lora_b(model)   # B = 0 would hide any dropout
        ids = tokens()
        model.train()
        torch.manual_seed(1)
        a = model(ids).logits
        b = model(ids).logits
        model.eval()
        c, d = model(ids).logits, model(ids).logits
        assert not torch.equal(a, b) and torch.equal(c, d)
    from safetensors import safe_open
    save_lora_experts(model, tmp_path / "l.safetensors")
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        assert f.metadata()["lora_dropout"] == "0.2"
