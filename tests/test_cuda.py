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
