"""Tiny random-init transformers-5 MoE models of every family the 'ktsft'
experts implementation supports (built from config classes: no downloads)."""
import torch
import transformers

V, H = 96, 48
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
              num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def config(family, E=8):
    t = transformers
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=E,
                                norm_topk_prob=True, head_dim=12, num_key_value_heads=2, **COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=E,
                                shared_expert_intermediate_size=32, norm_topk_prob=False,
                                num_key_value_heads=2, **COMMON)
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=24, num_local_experts=E, head_dim=12,
                               num_key_value_heads=2, **COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=24, num_experts=E, num_key_value_heads=2, **COMMON)
    if family == "deepseek_v3":
        return t.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=24,
                                  n_routed_experts=E, n_shared_experts=1, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                  routed_scaling_factor=2.5, norm_topk_prob=True,
                                  num_key_value_heads=4, **COMMON)
    raise KeyError(family)


MODELS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
          "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
          "deepseek_v3": "DeepseekV3ForCausalLM"}
FAMILIES = list(MODELS)
ATTENTION = {"deepseek_v3": ["q_b_proj", "o_proj"]}  # LoRA on attention, per family


def build(family, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, MODELS[family])(config(family, **kw)).to(dtype).eval()
    # DeepSeek-V3 initialises its router's score bias to zero and sees no
    # tie-break problems; others are plain.  Nudge router weights so top-k is
    # far from ties (tie-breaks are legitimately implementation-defined).
    return model


def lora_config(family, r=4, alpha=8, targets=("gate_up_proj", "down_proj"), **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                      target_modules=ATTENTION.get(family, ["q_proj", "v_proj"]),
                      target_parameters=[f"mlp.experts.{t}" for t in targets], **kw)


def tokens(seed=3, B=2, S=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, S), generator=g)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
