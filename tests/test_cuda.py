"""CUDA tensors in, CUDA tensors out (the experts run on the CPU).  Runs on
the lent GPU machine; skipped where torch has no CUDA device (CI)."""
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import ktsft.torch as kt  # noqa: E402


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_inputs_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    E, K, H, I = 6, 2, 64, 32
    m = kt.LoRAExperts(E, K, H, I, r=4, alpha=8.0, dtype=dtype, threads=2)
    m.load_weights(*[torch.randn(s, generator=g) * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I))])
    with torch.no_grad():
        for p in m.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(10, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(10)])
    w = torch.rand(10, K, generator=g)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    xc = x.to("cuda", tdt).requires_grad_()
    wc = w.cuda().requires_grad_()
    out = m(xc, ids.cuda(), wc)
    assert out.device.type == "cuda" and out.dtype == tdt
    out.float().square().sum().backward()
    assert xc.grad.device.type == "cuda" and xc.grad.dtype == tdt
    assert wc.grad.device.type == "cuda"
    # the copies went through pinned KExpertsSFTBuffer staging buffers
    from ktsft import KExpertsSFTBuffer

    staged = KExpertsSFTBuffer.staging(10, H, I, E, K, 4, dtype)  # the pool's bucket for T=10
    assert staged.tensors["input_cpu"].is_pinned() and staged.qlen == 64
    # the same step on CPU tensors gives the same numbers
    g_lora = [p.grad.clone() for p in m.lora_parameters()]
    m.zero_grad()
    xh = x.to(tdt).requires_grad_()
    wh = w.clone().requires_grad_()
    out_h = m(xh, ids, wh)
    out_h.float().square().sum().backward()
    assert torch.equal(out.cpu(), out_h)
    assert torch.equal(xc.grad.cpu(), xh.grad)
    for a, b in zip(g_lora, m.lora_parameters()):
        assert torch.equal(a, b.grad)


def _layer(seed, dtype="bf16", E=6, K=2, H=64, I=32):
    g = torch.Generator().manual_seed(seed)
    m = kt.LoRAExperts(E, K, H, I, r=4, alpha=8.0, dtype=dtype, threads=2)
    m.load_weights(*[torch.randn(s, generator=g) * 0.1 for s in ((E, I, H), (E, I, H), (E, H, I))])
    with torch.no_grad():
        for p in m.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_layers_sharing_staging_buffers_chain_on_the_gpu():
    """The results go back to the GPU without blocking from staging buffers
    shared by every layer of a shape: a chain of layers must still see each
    result intact, forward and backward, as on the CPU."""
    layers = [_layer(s) for s in range(4)]
    g = torch.Generator().manual_seed(9)
    T, H, E, K = 300, 64, 6, 2
    x = torch.randn(T, H, generator=g)
    ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) for _ in layers]
    w = torch.rand(T, K, generator=g)

    def run(dev):
        h = x.to(dev, torch.bfloat16).requires_grad_()
        y = h
        for m, i in zip(layers, ids):
            y = y + m(y, i.to(dev), w.to(dev))
        y.float().square().sum().backward()
        grads = [p.grad.clone() for m in layers for p in m.lora_parameters()]
        for m in layers:
            m.zero_grad()
        return y.detach().cpu(), h.grad.cpu(), grads

    yc, hc, gc = run("cpu")
    yg, hg, gg = run("cuda")
    assert torch.equal(yc, yg) and torch.equal(hc, hg)
    for a, b in zip(gc, gg):
        assert torch.equal(a, b)


def test_cpu_adamw_steps_gpu_parameters_with_torch():
    from ktsft.optim import CPUAdamW

    g = torch.Generator().manual_seed(3)
    a = [torch.nn.Parameter(torch.randn(37, generator=g).cuda()), torch.nn.Parameter(torch.randn(5, 7, generator=g))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = torch.optim.AdamW(a, lr=1e-2), CPUAdamW(b, lr=1e-2, threads=2)
    for s in range(4):
        for ps in (a, b):
            for p in ps:
                p.grad = torch.ones_like(p) * (s + 1) - p.detach()
        oa.step(), ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb.detach().cpu(), pa.detach().cpu(), rtol=1e-5, atol=1e-6)
    assert ob.state[b[0]]["exp_avg"].device.type == "cuda"


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_shared_experts_overlap_on_the_gpu(family):
    """Shared experts on the GPU while the CPU computes the routed ones
    (ktsft/_overlap.py): the same step as transformers' own block forward,
    with the routed forward deferred to the worker in every block and the
    backward's gradient copy waiting only for the watched event."""
    import sys
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    from hf_tiny import build, rel, tokens

    import ktsft.integrations.transformers as kti
    from ktsft import _overlap
    from ktsft.integrations.shared_experts import overlap_shared_experts
    from ktsft.profile import StepProfile

    model = build(family)
    kti.apply_lora_experts(model, r=4, alpha=8, dtype="fp32", threads=2)
    for m in model.modules():
        if isinstance(m, kti.LoRAExperts):
            with torch.no_grad():
                for n in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                    getattr(m, n).normal_(0, 0.05)
    model = model.cuda().train()
    ids = tokens(S=37).cuda()

    def run():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        g = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()
             if p.grad is not None}
        g["inputs_embeds"] = emb.grad.cpu()
        model.zero_grad(set_to_none=True)
        return out.logits.detach().cpu(), g

    overlap_shared_experts(model, enabled=False)
    ref_logits, ref = run()
    n_blocks = overlap_shared_experts(model)
    assert n_blocks > 0
    used = []
    real = _overlap.Block.ready_event

    def spy(self, g):
        ev = real(self, g)
        used.append(ev is not None)
        return ev

    _overlap.Block.ready_event = spy
    try:
        with StepProfile() as prof:
            logits, got = run()
    finally:
        _overlap.Block.ready_event = real
    assert prof.calls["join_wait"] == n_blocks
    assert used == [True] * n_blocks  # every backward copied on the side stream
    assert rel(logits, ref_logits) <= 1e-5
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert rel(got[n], ref[n]) <= 1e-5, n
