"""ktsft.integrations.transformers on tiny random-init transformers MoE models
(built from config classes: no hub downloads): the patched model computes
what the original does, its LoRA gradients and AdamW trajectory match an
eager PyTorch LoRA on the same experts, and no second copy of the expert
weights is left behind."""
import copy
import gc

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ktsft.integrations.transformers import (  # noqa: E402
    EagerHFLoRAExperts, HFLoRAExperts, apply_lora_experts, find_expert_modules,
    load_lora_state_dict, lora_state_dict, save_lora_experts)
from ktsft.torch import PARAM_NAMES  # noqa: E402

V, H, E, K, R = 96, 48, 8, 2, 4
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, num_experts_per_tok=K, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family):
    t = transformers
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=E,
                                norm_topk_prob=True, head_dim=12, **COMMON)
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=24, num_local_experts=E, head_dim=12, **COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=E,
                                shared_expert_intermediate_size=32, norm_topk_prob=False, **COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=24, num_experts=E, **COMMON)
    raise KeyError(family)


_MODELS = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
FAMILIES = list(_MODELS)


def build(family, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, _MODELS[family])(_config(family)).float().eval()
    return model


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lora_grads(model):
    """name -> stacked LoRA gradient (experts that got no token: zeros, as a
    stacked parameter has)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (HFLoRAExperts, EagerHFLoRAExperts)):
            for n in PARAM_NAMES:
                p = getattr(m, n)
                if isinstance(p, torch.Tensor):
                    out[f"{name}.{n}"] = p.grad.clone()
                else:
                    out[f"{name}.{n}"] = torch.stack(
                        [q.grad if q.grad is not None else torch.zeros_like(q) for q in p])
    return out


def randomize_lora_b(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    sd = lora_state_dict(model)
    sd = {k: (0.3 * torch.randn(v.shape, generator=g) if k.endswith("_b") else v)
          for k, v in sd.items()}
    load_lora_state_dict(model, sd)


def tokens(seed=3, B=2, S=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, S), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_lora_computes_the_original_model(family):
    orig = build(family)
    model = apply_lora_experts(copy.deepcopy(orig), r=R, alpha=8, dtype="fp32", threads=2)
    assert len([m for m in model.modules() if isinstance(m, HFLoRAExperts)]) == 2
    emb = orig.get_input_embeddings()(tokens()).detach()
    e0, e1 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    y0, y1 = orig(inputs_embeds=e0).logits, model(inputs_embeds=e1).logits
    assert rel(y1, y0) < 1e-5
    dO = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    y0.backward(dO)
    y1.backward(dO)
    assert rel(e1.grad, e0.grad) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_lora_gradients_and_adamw_match_eager_pytorch(family):
    orig = build(family)
    kt = apply_lora_experts(copy.deepcopy(orig), r=R, alpha=8, dtype="fp32", threads=2)
    ea = apply_lora_experts(copy.deepcopy(orig), r=R, alpha=8, dtype="fp32", backend="eager")
    randomize_lora_b(kt)
    load_lora_state_dict(ea, lora_state_dict(kt))
    ids = tokens(seed=5, B=2, S=16)

    # one step: logits, loss and every LoRA gradient
    l_kt = kt(ids, labels=ids).loss
    l_ea = ea(ids, labels=ids).loss
    assert rel(l_kt, l_ea) < 1e-6
    l_kt.backward()
    l_ea.backward()
    gk, ge = lora_grads(kt), lora_grads(ea)
    assert gk.keys() == ge.keys() and len(gk) == 12
    for n in gk:
        assert rel(gk[n], ge[n]) < 1e-5, n
    assert all(not p.requires_grad for n, p in kt.named_parameters() if "lora" not in n)

    # ten AdamW steps on a fixed batch: the same loss curve
    curves = []
    for model in (kt, ea):
        model.train()
        model.zero_grad()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        curve = []
        for _ in range(10):
            loss = model(ids, labels=ids).loss
            loss.backward()
            if model is ea:  # experts with no token: zero grads, as a stacked parameter
                for m in model.modules():
                    if isinstance(m, EagerHFLoRAExperts):
                        for p in m.parameters():
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    ck, ce = curves
    assert ck[-1] < ck[0] - 0.05  # it learns
    for a, b in zip(ck, ce):
        assert abs(a - b) <= 1e-4 * abs(b), (ck, ce)
    for n, v in lora_state_dict(kt).items():
        assert rel(v, lora_state_dict(ea)[n]) < 1e-4, n


def test_expert_weights_are_moved_not_copied():
    orig = build("qwen3_moe")
    model = copy.deepcopy(orig)
    exps = [m for _, _, _, m, _ in find_expert_modules(model)]
    old_params = [(m.gate_up_proj, m.down_proj) for m in exps]
    down_ptrs = [m.down_proj.data_ptr() for m in exps]
    n_before = sum(p.numel() for p in model.parameters())
    n_experts = sum(p.numel() for m in exps for p in m.parameters())
    apply_lora_experts(model, r=R, alpha=8, dtype="fp32", threads=1)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora" in n)
    assert sum(p.numel() for p in model.parameters()) == n_before - n_experts + n_lora
    assert n_lora == 2 * E * R * (2 * H + 2 * 24 + 24 + H)
    # the replaced parameters hold no storage any more, even though we keep them
    assert all(p.numel() == 0 for pair in old_params for p in pair)
    new = [m for m in model.modules() if isinstance(m, HFLoRAExperts)]
    for m, ptr, e_orig in zip(new, down_ptrs, [m for _, _, _, m, _ in find_expert_modules(orig)]):
        gate, up, down = m.wrapper.stored_weights()[:3]
        assert down.ctypes.data == ptr  # fp32 down_proj used in place
        I = gate.shape[1]
        assert torch.equal(torch.from_numpy(gate), e_orig.gate_up_proj[:, :I])
        assert torch.equal(torch.from_numpy(up), e_orig.gate_up_proj[:, I:])
        assert torch.equal(torch.from_numpy(down), e_orig.down_proj)
    # bf16 mode: one bf16 copy
    m16 = apply_lora_experts(copy.deepcopy(orig), r=R, alpha=8, dtype="bf16", threads=1)
    b = next(m for m in m16.modules() if isinstance(m, HFLoRAExperts)).wrapper.stored_weights()[:3]
    assert all(a.dtype.itemsize == 2 for a in b)
    ids = tokens()
    with torch.no_grad():
        assert rel(m16(ids).logits, orig(ids).logits) < 2e-2


def test_to_dtype_keeps_lora_fp32_and_adapter_roundtrip(tmp_path):
    model = apply_lora_experts(build("olmoe"), r=R, alpha=8, dtype="fp32", threads=1)
    randomize_lora_b(model)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora" in n)
    with torch.no_grad():
        assert rel(model(ids).logits.float(), ref) < 5e-2
    model.float()
    path = save_lora_experts(model, tmp_path / "adapter.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata()["r"] == str(R)
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    assert loaded.keys() == lora_state_dict(model).keys()
    fresh = apply_lora_experts(build("olmoe"), r=R, alpha=8, dtype="fp32", threads=1)
    load_lora_state_dict(fresh, loaded)
    with torch.no_grad():
        assert rel(fresh(ids).logits, ref) < 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    model = apply_lora_experts(build("qwen3_moe"), r=R, alpha=8, dtype="fp32", threads=1)
    randomize_lora_b(model)
    model.train()
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    ref = lora_grads(model)
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()
    model(ids, labels=ids).loss.backward()
    for n, g in lora_grads(model).items():
        assert rel(g, ref[n]) < 1e-6, n
    gc.collect()
    assert all(m.wrapper.cache_depth == 0 for m in model.modules() if isinstance(m, HFLoRAExperts))


def test_sentinel_expert_id_contributes_nothing():
    m = HFLoRAExperts(E, K, H, 24, r=R, alpha=8, dtype="fp32", threads=1)
    g = torch.Generator().manual_seed(0)
    m.load_weights(*(0.1 * torch.randn(s, generator=g) for s in ((E, 24, H), (E, 24, H), (E, H, 24))))
    x = torch.randn(5, H, generator=g)
    ids = torch.tensor([[0, 1], [2, E], [3, 4], [E, 5], [6, 7]])
    w = torch.rand(5, K, generator=g, requires_grad=True)
    out = m(x, ids, w)
    keep = (ids < E).float()
    ref = m(x, torch.where(ids < E, ids, 0), (w * keep).detach())
    assert rel(out, ref) < 1e-7
    out.sum().backward()
    assert w.grad[1, 1] == 0 and w.grad[3, 0] == 0


# ---- transformers 4.x layout: a ModuleList of per-expert MLPs ---------------
class _MLP(torch.nn.Module):
    def __init__(self, names, hidden, inter):
        super().__init__()
        g, u, d = names
        setattr(self, g, torch.nn.Linear(hidden, inter, bias=False))
        setattr(self, u, torch.nn.Linear(hidden, inter, bias=False))
        setattr(self, d, torch.nn.Linear(inter, hidden, bias=False))
        self.names = names
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class _LegacyBlock(torch.nn.Module):
    """The transformers 4.x sparse MoE block (Qwen3-MoE / Mixtral style)."""

    def __init__(self, names, norm_topk_prob, shared=False):
        super().__init__()
        self.num_experts, self.top_k = E, K
        if norm_topk_prob is not None:
            self.norm_topk_prob = norm_topk_prob
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.experts = torch.nn.ModuleList(_MLP(names, H, 24) for _ in range(E))
        if shared:
            self.shared_expert = _MLP(("gate_proj", "up_proj", "down_proj"), H, 16)
            self.shared_expert_gate = torch.nn.Linear(H, 1, bias=False)

    def forward(self, hidden_states):
        B, S, D = hidden_states.shape
        x = hidden_states.view(-1, D)
        router_logits = self.gate(x)
        w = torch.nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            w /= w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            slot, tok = torch.where((sel == e).T)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(B, S, D), router_logits


class MixtralSparseMoeBlock(_LegacyBlock):  # the name tells the patch: always normalise
    pass


@pytest.mark.parametrize("kind", ["qwen3", "qwen2_shared", "mixtral"])
def test_legacy_modulelist_layout(kind):
    torch.manual_seed(0)
    if kind == "mixtral":
        block = MixtralSparseMoeBlock(("w1", "w3", "w2"), None)
    else:
        block = _LegacyBlock(("gate_proj", "up_proj", "down_proj"), kind == "qwen3",
                             shared=kind == "qwen2_shared")
    model = torch.nn.Sequential(block)
    orig = copy.deepcopy(model)
    apply_lora_experts(model, r=R, alpha=8, dtype="fp32", threads=1)
    assert isinstance(block.experts, HFLoRAExperts)
    x = torch.randn(2, 7, H)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (y0, l0), (y1, l1) = orig(x0), model(x1)
    assert rel(y1, y0) < 1e-5 and torch.equal(l0, l1)
    y0.square().sum().backward()
    y1.square().sum().backward()
    assert rel(x1.grad, x0.grad) < 1e-5
    assert all(p.grad is not None for p in block.experts.lora_parameters())


# ---- the replacement takes over the replaced module's mode and layout -------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_replacement_keeps_the_training_mode(mode):
    """An eval-mode model gets eval-mode experts: no LoRA dropout until
    model.train() (a fresh nn.Module would be in training mode)."""
    model = build("qwen3_moe").train(mode == "train")
    apply_lora_experts(model, r=R, alpha=8, dtype="fp32", threads=1, lora_dropout=0.5)
    randomize_lora_b(model)
    exps = [m for m in model.modules() if isinstance(m, HFLoRAExperts)]
    assert len(exps) == 2 and all(m.training == (mode == "train") for m in exps)
    ids = tokens()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b) == (mode == "eval")  # dropout draws fresh masks in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


class _FusedExperts(torch.nn.Module):
    """A transformers-5 style fused experts module, stored as given."""

    def __init__(self, transposed, concatenated, inter=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        gu, dn = (E, 2 * inter, H), (E, H, inter)
        if transposed:
            gu, dn = (E, H, 2 * inter), (E, inter, H)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(gu, generator=g))
        self.down_proj = torch.nn.Parameter(torch.randn(dn, generator=g))
        self.is_transposed, self.is_concatenated = transposed, concatenated
        self.act_fn = torch.nn.SiLU()


class _FusedBlock(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.top_k, self.experts = K, experts


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("concatenated", [True, False])
def test_checkpoint_layout_follows_the_replaced_fused_module(transposed, concatenated):
    """state_dict writes gate_up_proj / down_proj as the replaced module
    stored them (is_transposed, is_concatenated), whatever the transformers
    version, and load_state_dict reads them back."""
    block = _FusedBlock(_FusedExperts(transposed, concatenated))
    want = {k: v.detach().clone() for k, v in block.state_dict().items()}
    apply_lora_experts(block, r=R, alpha=8, dtype="fp32", threads=1)
    assert block.experts.checkpoint_layout == {"kind": "fused", "transposed": transposed,
                                               "concatenated": concatenated}
    sd = block.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    other = apply_lora_experts(_FusedBlock(_FusedExperts(transposed, concatenated, seed=1)),
                               r=R, alpha=8, dtype="fp32", threads=1)
    other.load_state_dict(sd)
    assert all(torch.equal(torch.from_numpy(a), torch.from_numpy(b)) for a, b in
               zip(block.experts.wrapper.stored_weights()[:3], other.experts.wrapper.stored_weights()[:3]))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_checkpoint_layout_follows_the_replaced_modulelist(names):
    """A ModuleList keeps its per-expert keys under its own names (Mixtral's
    w1/w3/w2 need no block_sparse_moe in the path), on transformers 5 too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_LegacyBlock(names, True))
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_lora_experts(model, r=R, alpha=8, dtype="fp32", threads=1)
    assert model[0].experts.checkpoint_layout == {"kind": "modulelist", "names": names}
    sd = model.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


# ---- a patched 4.x-style model pickles --------------------------------------
class _TopKRouter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.top_k = K
        self.weight = torch.nn.Parameter(torch.randn(E, H))

    def forward(self, x):
        w = torch.softmax(x @ self.weight.T, dim=-1)
        w, ids = torch.topk(w, self.top_k, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)


class DeepseekV3StyleMoE(torch.nn.Module):
    """The 4.x DeepSeek-V3 MoE: its own router, experts looped in moe()."""

    def __init__(self):
        super().__init__()
        self.gate = _TopKRouter()
        self.experts = torch.nn.ModuleList(_MLP(("gate_proj", "up_proj", "down_proj"), H, 24)
                                           for _ in range(E))

    def moe(self, x, ids, w):
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out

    def forward(self, hidden_states):
        ids, w = self.gate(hidden_states.reshape(-1, H))
        return self.moe(hidden_states.reshape(-1, H), ids, w).view(hidden_states.shape), None


@pytest.mark.parametrize("kind", ["qwen3", "qwen2_shared", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_patched_legacy_model_pickles(kind, how):
    """The replaced forward / moe is picklable and bound to the copy's own
    block: the copy computes the same and does not follow the original."""
    import pickle

    torch.manual_seed(0)
    if kind == "mixtral":
        block = MixtralSparseMoeBlock(("w1", "w3", "w2"), None)
    elif kind == "deepseek_v3":
        block = DeepseekV3StyleMoE()
    else:
        block = _LegacyBlock(("gate_proj", "up_proj", "down_proj"), kind == "qwen3",
                             shared=kind == "qwen2_shared")
    model = apply_lora_experts(torch.nn.Sequential(block), r=R, alpha=8, dtype="fp32", threads=1)
    randomize_lora_b(model)
    x = torch.randn(2, 7, H)
    with torch.no_grad():
        want = model(x)[0]
    twin = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x)[0], want)
    randomize_lora_b(model, seed=8)  # the original changes, the copy does not
    with torch.no_grad():
        assert rel(model(x)[0], want) > 1e-3
        assert torch.equal(twin(x)[0], want)
    y = twin(x.requires_grad_())[0]
    y.square().sum().backward()
    assert all(p.grad is not None for p in twin[0].experts.lora_parameters())


def test_patched_legacy_causal_lm_pickles_and_torch_saves():
    """A whole causal LM with 4.x-style ModuleList blocks (test_exports.legacy)."""
    import io
    import pickle

    from test_exports import legacy, logits

    model = apply_lora_experts(legacy(), r=R, alpha=8, dtype="fp32", threads=1)
    randomize_lora_b(model)
    ids = tokens()
    want = logits(model, ids)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert torch.equal(logits(twin, ids), want)
        assert all(isinstance(layer.mlp.experts, HFLoRAExperts) for layer in twin.model.layers)
