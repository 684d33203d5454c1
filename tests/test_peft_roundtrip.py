"""ktsft adapters loaded by PEFT itself, on a tiny random transformers MoE model.

For every MoE layer, the block's output computed by ktsft (LoRAExperts fed the
model's expert weights and its router's top-k) must equal what PEFT computes
after loading the adapter ktsft wrote, before and after merge_and_unload.
Needs the test extra (peft, transformers); skipped without them.
"""
import copy
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ktsft import adapters  # noqa: E402
from ktsft.torch import PARAM_NAMES, LoRAExperts  # noqa: E402

try:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
except ImportError:  # pragma: no cover - very old transformers
    pytest.skip("transformers has no Qwen3-MoE", allow_module_level=True)

# PEFT (<= 0.21 at least) checks rank_pattern/alpha_pattern keys against the targeted
# modules only, not the targeted parameters, and warns although they were applied
# (test_fused_export_layout_is_peft_own asserts the rank and scaling it really uses).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")

E, K, H, I, R, LAYERS, T = 8, 2, 64, 32, 4, 2, 12
TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def base_model():
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=H, intermediate_size=2 * H,
                         moe_intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # make routing decisive and the experts non-trivial
        for n, p in model.named_parameters():
            if "mlp.gate" in n or "experts" in n:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[-1]))
    return model


def _blocks(model):
    return [layer.mlp for layer in model.model.layers]


def _expert_weights(experts):
    """gate [E, I, H], up [E, I, H], down [E, H, I] of fused (transformers 5)
    or ModuleList (4.x) experts."""
    if isinstance(experts, torch.nn.ModuleList):
        st = lambda n: torch.stack([getattr(e, n).weight.detach() for e in experts])  # noqa: E731
        return st("gate_proj"), st("up_proj"), st("down_proj")
    gu = experts.gate_up_proj.detach()
    return gu[:, :I].contiguous(), gu[:, I:].contiguous(), experts.down_proj.detach().contiguous()


def _route(block, x):
    """The block's own router: (top-k ids [T, k], weights [T, k])."""
    if isinstance(block.gate, torch.nn.Linear):  # transformers 4.x
        p = torch.softmax(block.gate(x).float(), dim=-1)
        w, ids = torch.topk(p, K, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)
    _, w, ids = block.gate(x)
    return ids, w


def _block_out(block, x):
    y = block(x[None])
    return (y[0] if isinstance(y, tuple) else y)[0]


def _random_lora(seed):
    rng = np.random.default_rng(seed)
    shapes = {"gate_lora_a": (E, R, H), "gate_lora_b": (E, I, R), "up_lora_a": (E, R, H),
              "up_lora_b": (E, I, R), "down_lora_a": (E, R, I), "down_lora_b": (E, H, R)}
    return {L: {n: (rng.standard_normal(s) / math.sqrt(s[-1])).astype(np.float32)
                for n, s in shapes.items()} for L in range(LAYERS)}


@torch.no_grad()
def _ktsft_outputs(model, layers, x, alpha, rslora):
    outs = []
    for L, block in enumerate(_blocks(model)):
        m = LoRAExperts(E, K, H, I, r=R, alpha=alpha, dtype="fp32", use_rslora=rslora, threads=1,
                        layer_idx=L)
        m.load_weights(*_expert_weights(block.experts))
        for n in PARAM_NAMES:
            getattr(m, n).copy_(torch.from_numpy(layers[L][n]))
        ids, w = _route(block, x)
        outs.append(m(x, ids, w).numpy())
    return outs


@torch.no_grad()
def _check_against_peft(model, path, layers, alpha, rslora):
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((T, H)).astype(np.float32))
    want = _ktsft_outputs(model, layers, x, alpha, rslora)
    base = [_block_out(b, x).numpy() for b in _blocks(model)]
    for L in range(LAYERS):  # the LoRA is not negligible: a dropped adapter would show
        assert rel(base[L], want[L]) > 1e-2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    inner = pm.get_base_model()
    for L, block in enumerate(_blocks(inner)):
        assert rel(_block_out(block, x).numpy(), want[L]) < TOL, f"layer {L}"
    merged = pm.merge_and_unload()
    for L, block in enumerate(_blocks(merged)):
        assert rel(_block_out(block, x).numpy(), want[L]) < TOL, f"merged, layer {L}"


def _fused_experts(model):
    return hasattr(model.model.layers[0].mlp.experts, "gate_up_proj")


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_export_matches_peft(base_model, tmp_path, rslora):
    if not _fused_experts(base_model):
        pytest.skip("this transformers keeps per-expert modules (no fused gate_up_proj)")
    layers, alpha = _random_lora(1), 6.0
    adapters.export_peft_fused(tmp_path / "f", layers, R, alpha, use_rslora=rslora)
    _check_against_peft(base_model, tmp_path / "f", layers, alpha, rslora)
    # and back into ktsft: exact
    for L in range(LAYERS):
        _, back = adapters.load_adapter(tmp_path / "f", L, E, hidden_size=H, intermediate_size=I,
                                        r=R, scaling=alpha / (math.sqrt(R) if rslora else R))
        for n in PARAM_NAMES:
            assert np.array_equal(back[n], layers[L][n]), n


def test_fused_export_layout_is_peft_own(base_model, tmp_path):
    """The keys and shapes PEFT itself saves for our adapter_config equal ours."""
    if not _fused_experts(base_model):
        pytest.skip("no fused experts")
    from safetensors.numpy import load_file

    adapters.export_peft_fused(tmp_path / "f", _random_lora(2), R, 8.0)
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "f"))
    pm = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    ours = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    wrapper = pm.get_base_model().model.layers[0].mlp.experts
    assert wrapper.parameter_name == "down_proj" and wrapper.r["default"] == R
    assert wrapper.base_layer.parameter_name == "gate_up_proj"
    assert wrapper.base_layer.r["default"] == 2 * R
    assert wrapper.base_layer.scaling["default"] == wrapper.scaling["default"] == 8.0 / R


def test_per_expert_adapter_matches_peft(base_model, tmp_path):
    """The per-expert ("2D") adapter: PEFT loads it as it is on per-expert
    models, and converts it on transformers-5 fused ones (PEFT >= 0.18)."""
    if _fused_experts(base_model):
        pytest.importorskip("peft.utils.transformers_weight_conversion",
                            reason="PEFT cannot convert per-expert adapters for fused experts")
    layers, alpha = _random_lora(3), 6.0
    adapters.save_adapter(tmp_path / "p", layers, R, alpha)
    _check_against_peft(base_model, tmp_path / "p", layers, alpha, False)


def test_per_expert_rslora_adapter_matches_peft(base_model, tmp_path):
    """PEFT's conversion of per-expert adapters to a fused gate_up_proj doubles
    alpha with the rank, right for alpha / r only: save_adapter writes rsLoRA
    as plain LoRA of the same scaling (lora_alpha = alpha * sqrt(r))."""
    if _fused_experts(base_model):
        pytest.importorskip("peft.utils.transformers_weight_conversion")
    layers, alpha = _random_lora(3), 6.0
    adapters.save_adapter(tmp_path / "p", layers, R, alpha, use_rslora=True)
    _check_against_peft(base_model, tmp_path / "p", layers, alpha, True)


def test_whole_model_logits(base_model, tmp_path):
    """End to end: the model with ktsft experts (apply_lora_experts) and the
    fused export loaded by PEFT give the same logits, merged or not."""
    integ = pytest.importorskip("ktsft.integrations.transformers")
    if not _fused_experts(base_model):
        pytest.skip("no fused experts")
    layers, alpha = _random_lora(4), 6.0
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 96, (2, 10)))
    ref = copy.deepcopy(base_model)
    integ.apply_lora_experts(ref, r=R, alpha=alpha, dtype="fp32", threads=1)
    mods = [m for m in ref.modules() if isinstance(m, LoRAExperts)]
    assert sorted(m.wrapper.layer_idx for m in mods) == list(range(LAYERS))
    with torch.no_grad():
        for m in mods:
            for n in PARAM_NAMES:
                getattr(m, n).copy_(torch.from_numpy(layers[m.wrapper.layer_idx][n]))
        want = ref(input_ids=ids).logits.numpy()
        got_layers, r, a, rs = adapters.model_layers(ref)
        assert (r, a, rs) == (R, alpha, False) and list(got_layers) == list(range(LAYERS))
        adapters.export_peft_fused(tmp_path / "f", got_layers, r, a, use_rslora=rs)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "f")).eval()
        assert rel(pm(input_ids=ids).logits.numpy(), want) < TOL
        assert rel(pm.merge_and_unload()(input_ids=ids).logits.numpy(), want) < TOL
        assert rel(base_model(input_ids=ids).logits.numpy(), want) > 1e-3


def test_fused_config_fields(tmp_path):
    adapters.export_peft_fused(tmp_path / "f", {3: _random_lora(6)[0]}, R, 5.0, use_rslora=True)
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["model.layers.3.mlp.experts.gate_up_proj",
                                        "model.layers.3.mlp.experts.down_proj"]
    assert cfg["rank_pattern"] == {"gate_up_proj": 2 * R}
    assert cfg["alpha_pattern"]["gate_up_proj"] == pytest.approx(5.0 * math.sqrt(2))
    c = peft.LoraConfig.from_pretrained(str(tmp_path / "f"))
    assert c.r == R and c.use_rslora and not c.target_modules
