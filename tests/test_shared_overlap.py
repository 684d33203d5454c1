"""The shared-experts overlap (ktsft/_overlap.py, integrations/shared_experts.py):
the overlapped block forwards compute what transformers' own forwards
compute, values and gradients, with the routed experts' native forward on
the worker thread.  Without a GPU the deferral is forced on CPU tensors
(_overlap.FORCE_CPU); tests/test_cuda.py runs the device path."""
import copy
import pickle
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import ktsft.integrations.transformers as kti  # noqa: E402
from ktsft import _overlap  # noqa: E402
from ktsft.integrations.shared_experts import overlap_shared_experts  # noqa: E402
from ktsft.profile import StepProfile  # noqa: E402
from hf_tiny import build, rel, tokens  # noqa: E402
from test_hf_experts import pair, step  # noqa: E402

SHARED = ["deepseek_v3", "qwen2_moe"]


@pytest.fixture
def forced():
    _overlap.FORCE_CPU = True
    yield
    _overlap.FORCE_CPU = False


def blocks(model):
    return [m for m in model.modules() if type(m).__name__ in ("DeepseekV3MoE",
                                                               "Qwen2MoeSparseMoeBlock")]


def ktsft_model(family):
    model = build(family)
    kti.apply_lora_experts(model, r=4, alpha=8, dtype="fp32", threads=2)
    for m in model.modules():  # non-zero B: the LoRA contributes
        if isinstance(m, kti.LoRAExperts):
            with torch.no_grad():
                for n in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                    getattr(m, n).normal_(0, 0.05)
    return model


def grads_of(model, ids):
    """(logits, grads by name) of one step from input embeddings
    (test_hf_experts.step; the routers stay frozen, as apply_lora_experts left them)."""
    logits, _, grads = step(model, ids, train_router=False)
    return logits, grads


@pytest.mark.parametrize("family", SHARED)
def test_apply_lora_experts_installs_it(family):
    model = ktsft_model(family)
    bs = blocks(model)
    assert bs and all("forward" in b.__dict__ for b in bs)
    before = [b.__dict__["forward"] for b in bs]
    assert overlap_shared_experts(model) == len(bs)  # idempotent
    assert [b.__dict__["forward"] for b in bs] == before
    assert overlap_shared_experts(model, enabled=False) == len(bs)
    assert not any("forward" in b.__dict__ for b in bs)
    assert overlap_shared_experts(model, enabled=False) == len(bs)


@pytest.mark.parametrize("family", SHARED)
def test_overlapped_equals_transformers_forward(family, forced):
    """The same model, transformers' block forward against the overlapped
    one with the routed experts deferred to the worker: the same bits where
    the order of the branches is transformers' own (DeepSeek-V3); Qwen2-MoE
    computes its shared expert first, so the block input's gradient sums
    the branches in another order (fp32 rounding, upstream of the block)."""
    model = ktsft_model(family)
    ids = tokens(S=13)
    overlap_shared_experts(model, enabled=False)
    ref_logits, ref = grads_of(model, ids)
    overlap_shared_experts(model)
    seen = []
    orig = _overlap.submit

    def spy(fn):
        seen.append(threading.current_thread().name)
        return orig(lambda: (seen.append(threading.current_thread().name), fn())[1])

    _overlap.submit = spy
    try:
        with StepProfile() as prof:
            logits, got = grads_of(model, ids)
    finally:
        _overlap.submit = orig
    n_blocks = len(blocks(model))
    assert prof.calls["join_wait"] == n_blocks  # every block deferred its routed experts
    assert seen[0::2] == ["MainThread"] * n_blocks  # submitted by the block forward
    assert all(s.startswith("ktsft-experts") for s in seen[1::2])  # run on the worker
    assert torch.equal(logits, ref_logits)
    assert sorted(got) == sorted(ref)
    for n in ref:
        if family == "deepseek_v3":
            assert torch.equal(got[n], ref[n]), n
        else:
            assert rel(got[n], ref[n]) <= 1e-6, n


@pytest.mark.parametrize("family", SHARED)
def test_peft_path_matches_transformers_eager(family, forced):
    """experts_implementation='ktsft' with PEFT LoRA, overlapped, against
    transformers' eager experts with PEFT's own LoRA, not overlapped."""
    me, mk = pair(family)
    assert overlap_shared_experts(mk) == len(blocks(mk))
    kti.configure(mk, threads=2)
    ids = tokens()
    le, _, ge = step(me, ids)
    with StepProfile() as prof:
        lk, _, gk = step(mk, ids)
    assert prof.calls["join_wait"] == len(blocks(mk))
    assert rel(lk, le) <= 1e-5
    assert sorted(gk) == sorted(ge)
    for n in ge:
        assert rel(gk[n], ge[n]) <= 1e-4, n


def test_not_deferred_on_cpu_by_default():
    model = ktsft_model("deepseek_v3")
    with StepProfile() as prof:
        grads_of(model, tokens())
    assert prof.calls["join_wait"] == 0 and prof.calls["kernel_fwd"] > 0


def test_error_in_shared_experts_leaves_the_layer_usable(forced):
    """The shared experts raise while the routed forward is on the worker:
    the error propagates after the worker is waited for, and the next step
    computes what it should."""
    model = ktsft_model("deepseek_v3")
    ids = tokens()
    _, ref = grads_of(model, ids)
    blk = blocks(model)[0]
    real = blk.shared_experts.forward

    def boom(*a, **k):
        raise RuntimeError("shared experts failed")

    blk.shared_experts.forward = boom
    with pytest.raises(RuntimeError, match="shared experts failed"):
        grads_of(model, ids)
    blk.shared_experts.forward = real
    _, got = grads_of(model, ids)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_worker_error_propagates(forced):
    model = ktsft_model("qwen2_moe")
    ex = [m for m in model.modules() if isinstance(m, kti.LoRAExperts)][0]
    real = ex.wrapper.forward_sft

    def bad(*a, **k):
        raise MemoryError("no memory for the cache")

    ex.wrapper.forward_sft = bad
    try:
        with pytest.raises(MemoryError, match="no memory"):
            grads_of(model, tokens())
    finally:
        ex.wrapper.forward_sft = real
    grads_of(model, tokens())  # usable again


def test_copy_and_pickle_keep_the_overlapped_forward(forced):
    model = ktsft_model("deepseek_v3")
    ids = tokens()
    logits, _ = grads_of(model, ids)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        bs = blocks(twin)
        assert all(b.__dict__["forward"].args[0] is b for b in bs)
        got, _ = grads_of(twin, ids)
        assert torch.equal(got, logits)


def test_eval_no_grad(forced):
    model = ktsft_model("qwen2_moe").eval()
    ids = tokens()
    with torch.no_grad():
        a = model(input_ids=ids).logits
    overlap_shared_experts(model, enabled=False)
    with torch.no_grad():
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_placeholder_views_keep_their_history(forced, monkeypatch):
    """Filling the placeholder bumps no version: the view the block took of
    it stays a view (no as_strided replay), and the routed backward gets
    the very gradient tensor of the block output (what the device path's
    event marks ready)."""
    import ktsft.torch as kt

    E, K, H, I = 6, 2, 16, 8
    m = kt.LoRAExperts(E, K, H, I, r=2, dtype="fp32", threads=1)
    g = torch.Generator().manual_seed(0)
    m.load_weights(*[torch.randn(s, generator=g) for s in ((E, I, H), (E, I, H), (E, H, I))])
    x = torch.randn(5, H, requires_grad=True)
    ids = torch.randint(0, E, (5, K), generator=g)
    w = torch.rand(5, K, requires_grad=True)
    s = torch.randn(5, H, requires_grad=True)
    seen = {}
    real = kt._run_backward

    def spy(module, grad_out, *a, **k):
        seen["bwd"] = grad_out.untyped_storage().data_ptr()
        return real(module, grad_out, *a, **k)

    monkeypatch.setattr(kt, "_run_backward", spy)
    with _overlap.block():
        y = m(x, ids, w).view(5, H)
        assert y._version == 0
    assert y._version == 0 and y.grad_fn.name() == "ViewBackward0"
    z = y + s
    z.register_hook(lambda gz: seen.update(out=gz.untyped_storage().data_ptr()))
    (z * 3).sum().backward()
    assert seen["bwd"] == seen["out"]
    ref = m(x.detach(), ids, w.detach())
    assert torch.equal(y.detach(), ref.detach())
