"""Copies, checkpoints and PEFT exports of models patched by apply_lora_experts,
checked against stock transformers and PEFT (PeftModel.from_pretrained into a
model that never saw ktsft), never against ktsft itself.  Tiny random models
built from config classes (no hub downloads), fp32."""
import copy
import io
import json
import math
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ktsft import adapters  # noqa: E402
from ktsft.integrations.transformers import (  # noqa: E402
    HFLoRAExperts, apply_lora_experts, load_lora_state_dict, lora_state_dict)
from ktsft.torch import PARAM_NAMES  # noqa: E402

# the tiny models of test_transformers (one definition of their configs)
from test_transformers import COMMON, E, H, K, R, V, _config, _MODELS  # noqa: E402,F401

I = 24  # their moe_intermediate_size
TOL = 1e-5


def build(family="qwen3_moe", seed=0):
    """A stock model; routing made decisive and the experts non-trivial."""
    torch.manual_seed(seed)
    model = getattr(transformers, _MODELS[family])(_config(family)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.gate" in n or "experts" in n:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[-1]))
    return model


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tokens(seed=3, B=2, S=10):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=7, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    sd = {k: (scale * torch.randn(v.shape, generator=g) if k.endswith("_b") else v)
          for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, sd)


def patched(family="qwen3_moe", seed=0, **kw):
    kw = {"r": R, "alpha": 8.0, "dtype": "fp32", "threads": 1, **kw}
    stock = build(family, seed)
    model = apply_lora_experts(copy.deepcopy(stock), **kw).eval()  # new modules start in train()
    randomize_lora(model)
    return stock, model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_step(model, ids, lr=1e-2):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


# ---------------------------------------------------------------------------
# 1. deepcopy / pickle / torch.save of a patched model
# ---------------------------------------------------------------------------
def _pickle(m):
    return pickle.loads(pickle.dumps(m))


def _torch_save(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_copies_compute_the_same_and_train_independently(how, dtype):
    _, model = patched(dtype=dtype)
    ids = tokens()
    want = logits(model, ids)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    cp = {"deepcopy": copy.deepcopy, "pickle": _pickle, "torch.save": _torch_save}[how](model)
    mods = [m for m in model.modules() if isinstance(m, HFLoRAExperts)]
    cmods = [m for m in cp.modules() if isinstance(m, HFLoRAExperts)]
    assert len(cmods) == len(mods) == 2
    for a, b in zip(mods, cmods):
        assert a.wrapper is not b.wrapper
        for pa, pb in zip(a.lora_parameters(), b.lora_parameters()):
            assert pa.data_ptr() != pb.data_ptr() and torch.equal(pa, pb)
        same_base = a.wrapper.stored_weights()[:3][0].ctypes.data == b.wrapper.stored_weights()[:3][0].ctypes.data
        assert same_base == (how == "deepcopy")  # deepcopy shares the frozen base weights
    assert torch.equal(logits(cp, ids), want)
    # the copy trains on its own: the original's LoRA and outputs stay
    train_step(cp, ids)
    assert torch.equal(logits(model, ids), want)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, before[k]), k
    assert rel(logits(cp, ids), want) > 1e-4
    # and the original still trains, its copy unaffected
    got_cp = logits(cp, ids)
    train_step(model, ids)
    assert rel(logits(model, ids), want) > 1e-4
    assert torch.equal(logits(cp, ids), got_cp)


def test_trl_style_reference_copy_keeps_backward_state_apart():
    """A reference model copied mid-training (TRL's create_reference_model is a
    deepcopy): forwards of both in any order, backward of the policy only."""
    _, model = patched()
    ids = tokens()
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    model.train()
    out = model(input_ids=ids, labels=ids)
    with torch.no_grad():
        r1 = ref(input_ids=ids).logits
    out.loss.backward()
    assert all(p.grad is not None for m in model.modules() if isinstance(m, HFLoRAExperts)
               for p in m.lora_parameters())
    assert all(p.grad is None for p in ref.parameters())
    assert torch.equal(ref(input_ids=ids).logits, r1)


# ---------------------------------------------------------------------------
# 2. save_pretrained of a patched model restores the stock base model
# ---------------------------------------------------------------------------
def _is_lora_key(k):
    return k.rsplit(".", 1)[-1] in PARAM_NAMES


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_save_pretrained_restores_the_stock_base_model(family, tmp_path):
    stock, model = patched(family)
    ids = tokens()
    want = logits(stock, ids)
    sd = model.state_dict()
    assert set(sd) - {k for k in sd if _is_lora_key(k)} == set(stock.state_dict())
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gu, stock.model.layers[1].mlp.experts.gate_up_proj)
    model.save_pretrained(tmp_path / "full")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # the LoRA parameters ride along and are ignored by the stock model
    assert set(info["unexpected_keys"]) == {k for k in sd if _is_lora_key(k)}
    assert torch.equal(logits(back.float().eval(), ids), want)
    # a base-only checkpoint: drop the LoRA keys
    model.save_pretrained(tmp_path / "base",
                          state_dict={k: v for k, v in sd.items() if not _is_lora_key(k)})
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(logits(back.float().eval(), ids), want)


def test_bf16_model_save_pretrained(tmp_path):
    stock = build().to(torch.bfloat16)
    model = apply_lora_experts(copy.deepcopy(stock), r=R, alpha=8.0, dtype="bf16", threads=1)
    model.save_pretrained(tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    for (k, a), (k2, b) in zip(sorted(stock.state_dict().items()),
                               sorted(back.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), k


def test_load_state_dict_round_trip_reads_base_weights():
    stock, model = patched()
    ids = tokens()
    want = logits(model, ids)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    _, other = patched(seed=1)          # other base weights and LoRA
    assert rel(logits(other, ids), want) > 1e-2
    res = other.load_state_dict(sd)     # strict: the base keys are understood
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(logits(other, ids), want)
    # a state dict without base keys (LoRA and the rest) leaves the base as it is
    _, third = patched(seed=1)
    third.load_state_dict({k: v for k, v in sd.items()
                           if not k.endswith(("gate_up_proj", "down_proj"))}, strict=False)
    assert rel(logits(third, ids), want) > 1e-3


def test_modulelist_checkpoint_layout():
    """checkpoint_layout = modulelist: per-expert keys, as a 4.x model has."""
    m = HFLoRAExperts(E, K, H, I, r=R, alpha=8, dtype="fp32", threads=1)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(s, generator=g) for s in ((E, I, H), (E, I, H), (E, H, I))]
    m.load_weights(*w)
    m.checkpoint_layout = {"kind": "modulelist", "names": ("w1", "w3", "w2")}
    sd = m.state_dict()
    assert torch.equal(sd["3.w1.weight"], w[0][3]) and torch.equal(sd["5.w2.weight"], w[2][5])
    m2 = HFLoRAExperts(E, K, H, I, r=R, alpha=8, dtype="fp32", threads=1)
    m2.checkpoint_layout = m.checkpoint_layout
    m2.load_state_dict(sd)
    assert all(np.array_equal(a, b) for a, b in zip(m.wrapper.stored_weights()[:3], m2.wrapper.stored_weights()[:3]))


# ---------------------------------------------------------------------------
# PEFT loading, the model types and layouts
# ---------------------------------------------------------------------------
peft = pytest.importorskip("peft")
from ktsft.integrations.transformers import export_adapter  # noqa: E402

# PEFT (<= 0.21) checks rank/alpha_pattern keys against target modules only and warns
# although it applies them to target parameters (test_peft_roundtrip checks it does)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning",
    "ignore:Found missing adapter keys:UserWarning")


def peft_logits(stock, path, ids, merge=False):
    """Logits of a stock model (deep-copied) with the adapter loaded by PEFT."""
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(stock), str(path)).eval()
    inner = pm.merge_and_unload() if merge else pm.get_base_model()
    return logits(inner, ids)


def meta(path):
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "np") as f:
        return f.metadata()


def cfg_of(path):
    return json.loads((path / "adapter_config.json").read_text())


FUSED_CONVERTED = ["qwen3_moe", "mixtral", "olmoe"]  # PEFT converts per-expert adapters for these


@pytest.mark.parametrize("family", FUSED_CONVERTED + ["qwen2_moe"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("rslora", [False, True])
def test_export_adapter_loads_in_peft(family, layout, rslora, tmp_path):
    """7/5/3. The default export (per-expert; PEFT converts it into the
    transformers-5 fused experts) and the fused one, with rsLoRA and with
    lora_dropout > 0: PEFT's logits equal ktsft's, merged or not."""
    if family == "qwen2_moe" and layout == "per_expert":
        pytest.skip("refused: test_qwen2_moe_per_expert_is_refused")
    stock, model = patched(family, use_rslora=rslora, lora_dropout=0.1, alpha=6.0)
    ids = tokens()
    want = logits(model, ids)
    assert rel(logits(stock, ids), want) > 0.1  # the LoRA is not negligible
    cfg = export_adapter(model, tmp_path / "a", layout=layout)
    assert cfg == cfg_of(tmp_path / "a")
    assert cfg["lora_dropout"] == 0.0 and cfg["use_rslora"] is False
    assert float(meta(tmp_path / "a")["ktsft.lora_dropout"]) == 0.1
    for merge in (False, True):
        assert rel(peft_logits(stock, tmp_path / "a", ids, merge), want) < TOL
    if layout == "per_expert":
        from safetensors.numpy import load_file

        keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
        block, names = (("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else
                        ("mlp", ("gate_proj", "up_proj", "down_proj")))
        assert len(keys) == 2 * 2 * E * 3 and all(
            f"base_model.model.model.layers.{L}.{block}.experts.{e}.{n}.lora_{x}.weight" in keys
            for L in range(2) for e in range(E) for n in names for x in "AB")
        assert cfg["target_modules"] == list(names)
    # and ktsft reads it back, exactly
    m0 = next(m for m in model.modules() if isinstance(m, HFLoRAExperts))
    fresh = HFLoRAExperts(E, K, H, I, r=R, alpha=6.0, dtype="fp32", use_rslora=rslora, threads=1,
                          layer_idx=0)
    got = fresh.load_adapter(tmp_path / "a", block="block_sparse_moe" if
                             family == "mixtral" and layout == "per_expert" else "mlp")
    assert got["lora_dropout"] == 0.1  # the training value, from the metadata
    for a, b in zip(m0.lora_parameters(), fresh.lora_parameters()):
        assert torch.equal(a, b)


def test_qwen2_moe_per_expert_is_refused(tmp_path):
    """4. PEFT converts no per-expert adapter for transformers-5 Qwen2-MoE: it
    would target the shared expert and drop the experts' tensors. Refused,
    naming the export to use; forced, PEFT indeed computes the base model."""
    stock, model = patched("qwen2_moe")
    ids = tokens()
    with pytest.raises(ValueError, match=r"layout='fused'.*peft_check=False"):
        export_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cfg = export_adapter(model, tmp_path / "a", peft_check=False)   # for vLLM / SGLang
    assert all(f"model.layers.{L}.mlp.shared_expert.{n}" in cfg["exclude_modules"]
               for L in range(2) for n in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(ValueError, match="No modules were targeted"):  # PEFT: nothing to adapt
        peft_logits(stock, tmp_path / "a", ids)
    # the model-blind writer: PEFT puts the LoRA on the shared expert and computes the base
    adapters.save_adapter(tmp_path / "raw", *adapters.model_layers(model))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "raw"))
    assert isinstance(pm.get_base_model().model.layers[0].mlp.shared_expert.gate_proj,
                      peft.tuners.lora.Linear)
    assert rel(logits(pm.get_base_model(), ids), logits(stock, ids)) < 1e-6
    export_adapter(model, tmp_path / "f", layout="fused")
    assert rel(peft_logits(stock, tmp_path / "f", ids), logits(model, ids)) < TOL


def test_fused_export_with_dropout_loads_in_peft(tmp_path):
    """3. export_peft_fused of a model trained with lora_dropout > 0."""
    stock, model = patched(lora_dropout=0.05)
    ids = tokens()
    train_step(model, ids)
    want = logits(model, ids)
    m0 = next(m for m in model.modules() if isinstance(m, HFLoRAExperts))
    adapters.export_peft_fused(tmp_path / "f", *adapters.model_layers(model),
                               lora_dropout=m0.lora_dropout)
    assert cfg_of(tmp_path / "f")["lora_dropout"] == 0.0
    assert meta(tmp_path / "f")["ktsft.lora_dropout"] == "0.05"
    assert rel(peft_logits(stock, tmp_path / "f", ids), want) < TOL
    m0.export_peft_fused(tmp_path / "one")   # the module's own export records its dropout
    assert meta(tmp_path / "one")["ktsft.lora_dropout"] == "0.05"
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "one")).lora_dropout == 0.0


# ---- a transformers-4-style model: ModuleList experts, PEFT without conversion ----
class _MLP(torch.nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj = torch.nn.Linear(H, I, bias=False)
        self.up_proj = torch.nn.Linear(H, I, bias=False)
        self.down_proj = torch.nn.Linear(I, H, bias=False)
        self.act_fn = torch.nn.SiLU()
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate)
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _tensor_out(module, args, out):
    return out[0] if isinstance(out, tuple) else out


class LegacyQwen3MoeBlock(torch.nn.Module):
    """The transformers 4.x Qwen3-MoE sparse block (router nn.Linear, a
    ModuleList of expert MLPs, a loop; returns (out, router_logits); a hook
    hands the 5.x decoder layer the tensor), with a fused block's weights."""

    def __init__(self, fused):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = E, K, True
        self.gate = torch.nn.Linear(H, E, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(fused.gate.weight)
        gu, dn = fused.experts.gate_up_proj, fused.experts.down_proj
        self.experts = torch.nn.ModuleList(_MLP(gu[e, :I], gu[e, I:], dn[e]) for e in range(E))
        self.register_forward_hook(_tensor_out)

    def forward(self, hidden_states):
        B, S, D = hidden_states.shape
        x = hidden_states.reshape(-1, D)
        router_logits = self.gate(x)
        w = torch.softmax(router_logits, dim=-1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(sel == e)
            if tok.numel():
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out.reshape(B, S, D), router_logits


class LegacyLM(torch.nn.Module):
    """A causal LM whose MoE blocks are 4.x style, with no transformers config
    (PEFT then loads per-expert adapters as they are, as under transformers 4)."""

    def __init__(self, causal_lm):
        super().__init__()
        self.model, self.lm_head = causal_lm.model, causal_lm.lm_head
        for layer in self.model.layers:
            layer.mlp = LegacyQwen3MoeBlock(layer.mlp)

    def forward(self, input_ids=None, **kw):
        out = transformers.modeling_outputs.CausalLMOutput()
        out["logits"] = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        return out

    def prepare_inputs_for_generation(self, *a, **kw):  # PeftModelForCausalLM wants one
        raise NotImplementedError


def legacy(seed=0):
    return LegacyLM(build("qwen3_moe", seed)).eval()


def test_legacy_per_expert_export_loads_in_peft(tmp_path):
    """7. Per-expert layout on 4.x-style ModuleList experts: PEFT puts it on the
    nn.Linear experts as it is (no conversion)."""
    stock = legacy()
    ids = tokens()
    assert rel(logits(stock, ids), logits(build("qwen3_moe"), ids)) < 1e-5  # same model
    model = apply_lora_experts(copy.deepcopy(stock), r=R, alpha=6.0, dtype="fp32", threads=1,
                               use_rslora=True).eval()
    randomize_lora(model)
    want = logits(model, ids)
    assert rel(logits(stock, ids), want) > 0.1
    export_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "a")).eval()
    assert isinstance(pm.get_base_model().model.layers[0].mlp.experts[3].down_proj,
                      peft.tuners.lora.Linear)
    assert rel(logits(pm.get_base_model(), ids), want) < TOL
    assert rel(logits(pm.merge_and_unload(), ids), want) < TOL


# ---- attention LoRA (PEFT) and expert LoRA (ktsft) in one adapter ------------
def _randomize_peft_b(model, seed=11):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("order", ["ktsft_then_peft", "peft_then_ktsft"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "legacy"])
def test_one_adapter_with_attention_lora(family, layout, order, tmp_path):
    """7. PEFT LoRA on attention (its own rank and alpha, with dropout) plus
    ktsft's expert LoRA (rsLoRA): one directory, PEFT loads both."""
    if family == "legacy" and layout == "fused":
        pytest.skip("ModuleList experts have no fused parameters")
    stock = legacy() if family == "legacy" else build(family)
    ids = tokens()
    lcfg = peft.LoraConfig(r=8, lora_alpha=4, lora_dropout=0.05,
                           target_modules=["q_proj", "v_proj", "o_proj"])
    kt = dict(r=R, alpha=6.0, dtype="fp32", threads=1, use_rslora=True)
    if order == "ktsft_then_peft":
        model = peft.get_peft_model(apply_lora_experts(copy.deepcopy(stock), **kt), lcfg)
        for m in model.modules():  # PEFT >= 0.19 freezes every parameter but its own
            if isinstance(m, HFLoRAExperts):
                m.requires_grad_(True)
    else:  # PEFT first: keep its LoRA trainable
        model = apply_lora_experts(peft.get_peft_model(copy.deepcopy(stock), lcfg),
                                   freeze_other=False, **kt)
    model.eval()
    randomize_lora(model)
    _randomize_peft_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("gate_lora_a" in n for n in trainable)
    want = logits(model.get_base_model(), ids)
    with model.disable_adapter():  # the attention LoRA matters
        assert rel(logits(model.get_base_model(), ids), want) > 1e-2
    cfg = export_adapter(model, tmp_path / "a", layout=layout)
    assert "q_proj" in cfg["target_modules"] and cfg["rank_pattern"]
    # attention: r=8, scaling 4/8; experts: rsLoRA 6/sqrt(4) = (6*2)/4, so attention's B is
    # rescaled to the config's alpha 12 (rank 8 via rank_pattern)
    assert cfg["lora_alpha"] == 12.0 and meta(tmp_path / "a")["ktsft.peft_rescaled_modules"] == "6"
    assert meta(tmp_path / "a")["ktsft.peft_lora_dropout"] == "0.05"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "a")).eval()
    # one scaling for every module, the config's lora_alpha / r (what vLLM and SGLang apply)
    from peft.tuners.lora import LoraLayer

    scal = {m.scaling["default"] for m in pm.modules() if isinstance(m, LoraLayer)}
    assert len(scal) == 1 and scal.pop() == pytest.approx(cfg["lora_alpha"] / cfg["r"], rel=1e-12)
    got = logits(pm.get_base_model(), ids)
    assert rel(got, want) < TOL
    assert rel(logits(pm.merge_and_unload(), ids), want) < TOL
    # neither half alone would do
    assert rel(logits(stock, ids), want) > 1e-2


def test_model_without_ktsft_experts_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no ktsft LoRA experts"):
        export_adapter(build(), tmp_path / "a")
    _, model = patched()
    with pytest.raises(ValueError, match="layout"):
        export_adapter(model, tmp_path / "a", layout="2d")


# ---------------------------------------------------------------------------
# 6. adapters on a subset of the projections, both layouts, made by PEFT
# ---------------------------------------------------------------------------
def _ktsft_layer_outputs(experts_mods, blocks, x):
    outs = []
    for m, block in zip(experts_mods, blocks):
        if isinstance(block.gate, torch.nn.Linear):
            p = torch.softmax(block.gate(x), dim=-1)
            w, ids = torch.topk(p, K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        else:
            _, w, ids = block.gate(x)
        with torch.no_grad():
            outs.append(m(x, ids, w))
    return outs


@pytest.mark.parametrize("targets", [["down_proj"], ["gate_proj", "up_proj"], ["up_proj"]])
def test_per_expert_subset_adapter_made_by_peft(targets, tmp_path):
    stock = legacy()
    pm = peft.get_peft_model(copy.deepcopy(stock), peft.LoraConfig(
        r=R, lora_alpha=6, target_modules=targets))
    _randomize_peft_b(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(2))
    blocks = [layer.mlp for layer in pm.get_base_model().model.layers]
    with torch.no_grad():
        want = [_tensor_out(None, None, b(x[None]))[0] for b in blocks]
    mods = []
    for L, b in enumerate(blocks):
        m = HFLoRAExperts(E, K, H, I, r=R, alpha=6, dtype="fp32", threads=1, layer_idx=L)
        ex = b.experts
        m.load_weights(*(torch.stack([getattr(e, n).base_layer.weight if hasattr(
            getattr(e, n), "base_layer") else getattr(e, n).weight for e in ex]).detach()
            for n in ("gate_proj", "up_proj", "down_proj")))
        m.load_adapter(tmp_path / "p")
        for proj in ("gate", "up", "down"):
            b_ = getattr(m, f"{proj}_lora_b")
            assert bool(b_.abs().max() > 0) == (f"{proj}_proj" in targets), proj
        mods.append(m)
    for got, w in zip(_ktsft_layer_outputs(mods, blocks, x), want):
        assert rel(got, w) < TOL
    with pytest.raises(KeyError, match="adapter has no"):   # targeted but absent: an error
        cfg = cfg_of(tmp_path / "p")
        cfg["target_modules"] = ["gate_proj", "up_proj", "down_proj"]
        (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
        mods[0].load_adapter(tmp_path / "p")


@pytest.mark.parametrize("targets", [["down_proj"], ["gate_up_proj"]])
def test_fused_subset_adapter_made_by_peft(targets, tmp_path):
    stock = build()
    rank = R if targets == ["down_proj"] else 2 * R
    pm = peft.get_peft_model(copy.deepcopy(stock), peft.LoraConfig(
        r=rank, lora_alpha=3.0 * rank, target_modules=[],
        target_parameters=[f"mlp.experts.{t}" for t in targets]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a gate_up LoRA ktsft can hold: B block-diagonal per expert
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                B = 0.2 * torch.randn(p.shape, generator=g)
                if targets == ["gate_up_proj"]:
                    Bv = B.view(2 * I, rank, E)
                    Bv[:I, R:] = 0
                    Bv[I:, :R] = 0
                p.copy_(B)
    pm.save_pretrained(str(tmp_path / "p"))
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(2))
    blocks = [layer.mlp for layer in pm.get_base_model().model.layers]
    with torch.no_grad():
        want = [b(x[None])[0] for b in blocks]
    mods = []
    for L, b in enumerate(stock.model.layers):
        m = HFLoRAExperts(E, K, H, I, r=R, alpha=3.0 * R, dtype="fp32", threads=1, layer_idx=L)
        gu = b.mlp.experts.gate_up_proj.detach()
        m.load_weights(gu[:, :I], gu[:, I:], b.mlp.experts.down_proj.detach())
        m.load_adapter(tmp_path / "p")
        assert bool(m.down_lora_b.abs().max() > 0) == (targets == ["down_proj"])
        assert bool(m.gate_lora_b.abs().max() > 0) == (targets != ["down_proj"])
        mods.append(m)
    for got, w in zip(_ktsft_layer_outputs(mods, [l.mlp for l in stock.model.layers], x), want):
        assert rel(got, w) < TOL
