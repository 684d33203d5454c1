"""ktsft.torch.LoRAExperts: autograd against an eager PyTorch LoRA, zero-copy
parameters, accumulation, several micro-batches in flight."""
import gc
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ktsft.torch as kt  # noqa: E402
from ktsft.eager import eager_moe_forward  # noqa: E402

E, K, H, I, R = 6, 2, 40, 24, 4


def make(dtype="fp32", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    m = kt.LoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype=dtype, threads=2, **kw)
    w = [torch.randn(s, generator=g) / math.sqrt(s[-1]) for s in ((E, I, H), (E, I, H), (E, H, I))]
    m.load_weights(*w)
    with torch.no_grad():
        for p in m.lora_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return m, w


def batch(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    return x, ids, w


def eager_grads(m, w_base, x, ids, w, dO, act=torch.float32):
    """The same math through plain PyTorch autograd (per-expert LoRA leaves)."""
    leaves = [[p.detach()[e].clone().requires_grad_() for e in range(E)] for p in m.lora_parameters()]
    xe = x.detach().clone().requires_grad_()
    we = w.detach().clone().requires_grad_()
    Wb = [t.to(act) for t in w_base]
    out = eager_moe_forward(xe, ids, we, *Wb, leaves, m.scaling, act)
    out.backward(dO)
    pg = [torch.stack([l.grad if l.grad is not None else torch.zeros_like(l) for l in ls])
          for ls in leaves]
    return out.detach(), xe.grad, we.grad, pg


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gradients_match_eager_autograd():
    m, wb = make()
    x, ids, w = batch(13)
    dO = torch.randn(13, H)
    out = m(x, ids, w)
    out.backward(dO)
    ref_out, ref_dx, ref_dw, ref_pg = eager_grads(m, wb, x, ids, w, dO)
    assert rel(out, ref_out) < 1e-5
    assert rel(x.grad, ref_dx) < 1e-5
    assert rel(w.grad, ref_dw) < 1e-5
    for p, g in zip(m.lora_parameters(), ref_pg):
        assert rel(p.grad, g) < 1e-5


def test_bf16_module_and_bf16_inputs():
    m, wb = make(dtype="bf16")
    x, ids, w = batch(16)
    xb = x.detach().bfloat16().requires_grad_()
    out = m(xb, ids, w)
    assert out.dtype == torch.bfloat16
    dO = torch.randn(16, H)
    out.float().backward(dO)
    assert xb.grad.dtype == torch.bfloat16
    ref_out, ref_dx, ref_dw, ref_pg = eager_grads(m, wb, xb.float(), ids, w, dO)
    assert rel(out.float(), ref_out) < 2e-2
    assert rel(xb.grad.float(), ref_dx) < 2e-2
    for p, g in zip(m.lora_parameters(), ref_pg):
        assert rel(p.grad, g) < 2e-2


def test_gradcheck_float64_tiny():
    """torch.autograd.gradcheck in float64 through the fp32 kernels: the
    finite-difference step is sized for fp32 arithmetic."""
    m, _ = make(seed=3)
    x, ids, w = batch(3, seed=4)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()

    def f(x_, w_):
        return m(x_, ids, w_).double()

    assert torch.autograd.gradcheck(f, (xd, wd), eps=1e-2, atol=2e-3, rtol=2e-2)


def test_optimizer_step_is_seen_without_copy():
    m, wb = make()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, ids, w = batch(9)
    m(x, ids, w).square().sum().backward()
    ptrs = [p.data_ptr() for p in m.lora_parameters()]
    opt.step()
    assert [p.data_ptr() for p in m.lora_parameters()] == ptrs  # updated in place
    out = m(x, ids, w)
    ref_out = eager_grads(m, wb, x, ids, w, torch.zeros(9, H))[0]
    assert rel(out, ref_out) < 1e-5


def test_replaced_storage_is_picked_up():
    m, wb = make()
    x, ids, w = batch(5)
    with torch.no_grad():
        m.gate_lora_b.data = m.gate_lora_b.data * 3.0
    out = m(x, ids, w)
    assert rel(out, eager_grads(m, wb, x, ids, w, torch.zeros(5, H))[0]) < 1e-5


def test_gradient_accumulation_and_zero_grad():
    m, _ = make()
    (xa, ia, wa), (xb, ib, wbt) = batch(7, seed=5), batch(11, seed=6)
    m(xa, ia, wa).sum().backward()
    ga = [p.grad.clone() for p in m.lora_parameters()]
    m.zero_grad()
    m(xb, ib, wbt).sum().backward()
    gb = [p.grad.clone() for p in m.lora_parameters()]
    m.zero_grad()
    (m(xa, ia, wa).sum() + m(xb, ib, wbt).sum()).backward()
    for p, a, b in zip(m.lora_parameters(), ga, gb):
        assert rel(p.grad, a + b) < 1e-6


def test_micro_batches_in_flight_pair_with_their_forward():
    m, wb = make()
    (xa, ia, wa), (xb, ib, wbt) = batch(7, seed=8), batch(10, seed=9)
    oa = m(xa, ia, wa)
    ob = m(xb, ib, wbt)
    dA, dB = torch.randn(7, H), torch.randn(10, H)
    oa.backward(dA)  # first in, first out: not LIFO
    ob.backward(dB)
    assert rel(xa.grad, eager_grads(m, wb, xa, ia, wa, dA)[1]) < 1e-5
    assert rel(xb.grad, eager_grads(m, wb, xb, ib, wbt, dB)[1]) < 1e-5
    assert m.wrapper.cache_depth == 0


def test_freed_graph_releases_its_cache():
    m, _ = make()
    x, ids, w = batch(6)
    out = m(x, ids, w)
    assert m.wrapper.cache_depth == 1
    del out
    gc.collect()
    assert m.wrapper.cache_depth == 0
    with torch.no_grad():            # inference caches nothing
        m(x, ids, w)
    assert m.wrapper.cache_depth == 0


def test_backward_twice_through_a_retained_graph():
    m, _ = make()
    x, ids, w = batch(4)
    out = m(x, ids, w).sum()
    out.backward(retain_graph=True)
    g1 = x.grad.clone()
    out.backward()  # the cache was spent: the forward is recomputed
    assert rel(x.grad, 2 * g1) < 1e-6


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_and_recompute_give_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    m, _ = make()
    x, ids, w = batch(9, seed=12)
    m(x, ids, w).square().sum().backward()
    ref = [x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in m.lora_parameters()]
    for mode in ("checkpoint", "recompute"):
        m.zero_grad()
        x.grad = w.grad = None
        if mode == "checkpoint":
            out = checkpoint(m, x, ids, w, use_reentrant=reentrant)
        else:
            m.recompute = True
            out = m(x, ids, w)
            assert m.wrapper.cache_depth == 0  # only input references kept
        out.square().sum().backward()
        m.recompute = False
        got = [x.grad, w.grad] + [p.grad for p in m.lora_parameters()]
        for a, b in zip(got, ref):
            assert rel(a, b) < 1e-6, mode
    gc.collect()
    assert m.wrapper.cache_depth == 0


def test_peft_init_and_rslora():
    m = kt.LoRAExperts(E, K, H, I, r=R, alpha=8.0, dtype="fp32")
    assert not torch.any(m.gate_lora_b) and torch.any(m.gate_lora_a)
    bound = 1 / math.sqrt(H)  # kaiming_uniform(a=sqrt(5)) on fan_in = H
    assert m.gate_lora_a.abs().max() <= bound + 1e-6
    assert m.scaling == pytest.approx(8.0 / R)
    assert kt.LoRAExperts(E, K, H, I, r=R, alpha=8.0, use_rslora=True).scaling == \
        pytest.approx(8.0 / math.sqrt(R))


def test_leading_dims_and_numpy_free_import():
    m, _ = make()
    x = torch.randn(2, 3, H)
    ids = torch.randint(0, E, (2, 3, K))
    ids[..., 1] = (ids[..., 0] + 1) % E
    w = torch.rand(2, 3, K)
    assert m(x, ids, w).shape == (2, 3, H)


def test_second_order_gradients_raise():
    """The experts' backward is not differentiable: a double backward
    raises instead of returning silent zeros."""
    m, _ = make("fp32")
    x, ids, w = batch(5, 1)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(m(x, ids, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()


@pytest.mark.parametrize("kw, exc", [(dict(r=2.7), TypeError), (dict(r=0), ValueError),
                                     (dict(alpha=-1.0), ValueError), (dict(top_k=1.5), TypeError)])
def test_sizes_are_validated_not_truncated(kw, exc):
    args = {**dict(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8), **kw}
    with pytest.raises(exc, match=next(iter(kw))):
        kt.LoRAExperts(**args)
