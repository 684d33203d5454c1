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

    staged = [b for b in KExpertsSFTBuffer.capture_buffers.values() if b.qlen == 10]
    assert staged and all(b.tensors["input_cpu"].is_pinned() for b in staged)
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
