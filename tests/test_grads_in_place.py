"""LoRA gradients written straight into persistent .grad buffers: no
allocation per step, accumulation over micro-batches in place (bitwise the
sum of the separate gradients), and autograd's semantics wherever the
in-place path would change them (torch.autograd.grad, hooks, a .grad the
user kept)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from test_torch_module import batch, make  # noqa: E402

from ktsft.buffers import LORA_GRAD_NAMES  # noqa: E402


def _step(m, seed, T=11, dtype="fp32"):
    x, ids, w = batch(T, seed)
    g = torch.Generator().manual_seed(seed + 100)
    m(x, ids, w).backward(torch.randn(T, x.shape[1], generator=g))


def _grads(m):
    return [p.grad.detach().clone() for p in m.lora_parameters()]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grad_buffers_persist_across_steps(dtype):
    m, _ = make(dtype)
    _step(m, 1)
    ptrs = [p.grad.data_ptr() for p in m.lora_parameters()]
    first = _grads(m)
    m.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.lora_parameters())
    _step(m, 1)
    assert [p.grad.data_ptr() for p in m.lora_parameters()] == ptrs  # no new allocation
    for a, b in zip(first, _grads(m)):
        assert torch.equal(a, b)  # overwritten, not added to stale values


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_accumulation_in_place_is_the_sum(dtype):
    m, _ = make(dtype)
    _step(m, 1)
    g1 = _grads(m)
    m.zero_grad()
    _step(m, 2)
    g2 = _grads(m)
    m.zero_grad()
    _step(m, 1)
    ptrs = [p.grad.data_ptr() for p in m.lora_parameters()]
    _step(m, 2)  # the second micro-batch adds in place
    assert [p.grad.data_ptr() for p in m.lora_parameters()] == ptrs
    for a, b, got in zip(g1, g2, _grads(m)):
        assert torch.equal(got, a + b)
    # zero_grad(set_to_none=False): the zeroed buffers are added to
    m.zero_grad(set_to_none=False)
    _step(m, 1)
    for a, got in zip(g1, _grads(m)):
        assert torch.equal(got, a)


def test_accumulated_gradients_do_not_depend_on_threads():
    out = []
    for threads in (1, 2, 3):
        m, _ = make()
        m.wrapper.cpuinfer_threads = threads
        _step(m, 1, T=37)
        _step(m, 2, T=5)
        out.append(_grads(m))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


def test_autograd_grad_leaves_dot_grad_alone():
    m, _ = make()
    x, ids, w = batch(9, 3)
    loss = m(x, ids, w).square().sum()
    gs = torch.autograd.grad(loss, m.lora_parameters())
    assert all(p.grad is None for p in m.lora_parameters())
    m2, _ = make()
    m2(x, ids, w).square().sum().backward()
    for g, p in zip(gs, m2.lora_parameters()):
        assert torch.equal(g, p.grad)


def test_backward_inputs_subset():
    m, _ = make()
    x, ids, w = batch(9, 3)
    m(x, ids, w).square().sum().backward(inputs=[m.gate_lora_a, m.down_lora_b])
    assert m.gate_lora_a.grad is not None and m.down_lora_b.grad is not None
    assert m.up_lora_a.grad is None and m.gate_lora_b.grad is None
    m2, _ = make()
    m2(x, ids, w).square().sum().backward()
    assert torch.equal(m.gate_lora_a.grad, m2.gate_lora_a.grad)
    assert torch.equal(m.down_lora_b.grad, m2.down_lora_b.grad)


def test_hooks_still_run():
    m, _ = make()
    seen = []
    m.up_lora_b.register_hook(lambda g: seen.append("tensor") or g * 2)
    m.down_lora_a.register_post_accumulate_grad_hook(lambda p: seen.append("post"))
    _step(m, 1)
    ref, _ = make()
    _step(ref, 1)
    assert sorted(seen) == ["post", "tensor"]
    assert torch.equal(m.up_lora_b.grad, 2 * ref.up_lora_b.grad)
    assert torch.equal(m.down_lora_a.grad, ref.down_lora_a.grad)


def test_a_kept_grad_is_never_overwritten():
    m, _ = make()
    _step(m, 1)
    kept = m.gate_lora_a.grad
    kept_val = kept.clone()
    m.zero_grad(set_to_none=True)
    _step(m, 2)
    assert m.gate_lora_a.grad is not kept
    assert torch.equal(kept, kept_val)


def test_numpy_backward_accumulate():
    m, _ = make()
    wr = m.wrapper
    x, ids, w = batch(8, 4)
    dO = np.random.default_rng(0).standard_normal((8, x.shape[1])).astype(np.float32)
    xs, ws = x.detach().numpy(), w.detach().numpy()
    shapes = {n: getattr(m, p).shape for n, p in zip(LORA_GRAD_NAMES, [
        "gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b"])}
    outs = {n: np.empty(s, np.float32) for n, s in shapes.items()}
    wr.forward_sft(xs, ids.numpy(), ws, save_for_backward=True)
    wr.backward(dO, grads_out=outs)
    once = {n: a.copy() for n, a in outs.items()}
    wr.forward_sft(xs, ids.numpy(), ws, save_for_backward=True)
    wr.backward(dO, grads_out=outs, accumulate=True)
    for n in outs:
        np.testing.assert_array_equal(outs[n], once[n] + once[n])


def test_copy_and_pickle_after_a_step():
    """The bookkeeping (autograd nodes, buffers) stays with the original:
    a deep copy or a pickle taken after a backward works and trains its
    own parameters into its own buffers."""
    import copy
    import pickle

    m, _ = make("fp32")
    _step(m, 1)
    ref = _grads(m)
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        for p in twin.lora_parameters():
            p.grad = None
        _step(twin, 1)
        for a, b in zip(ref, _grads(twin)):
            assert torch.equal(a, b)
        ptrs = {q.grad.data_ptr() for q in twin.lora_parameters()}
        assert not ptrs & {p.grad.data_ptr() for p in m.lora_parameters()}
