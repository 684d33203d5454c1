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

V, H, E, K, R, I = 96, 48, 8, 2, 4, 24
TOL = 1e-5
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, num_experts_per_tok=K, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family):
    t = transformers
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                                norm_topk_prob=True, head_dim=12, **COMMON)
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=I, num_local_experts=E, head_dim=12, **COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=I, num_experts=E,
                                shared_expert_intermediate_size=32, norm_topk_prob=False, **COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=I, num_experts=E, **COMMON)
    raise KeyError(family)


_MODELS = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


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
    model = apply_lora_experts(copy.deepcopy(stock), **kw)
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
        same_base = a.wrapper._base[0][0].ctypes.data == b.wrapper._base[0][0].ctypes.data
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
    assert all(np.array_equal(a, b) for a, b in zip(m.wrapper._base[0], m2.wrapper._base[0]))
