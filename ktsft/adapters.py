"""LoRA adapters in PEFT's format: adapter_config.json plus
adapter_model.safetensors with per-expert ("2D") keys

    base_model.model.{module}.lora_A.weight   [r, in]
    base_model.model.{module}.lora_B.weight   [out, r]

where module is, by default, model.layers.{layer}.mlp.experts.{expert}.{proj}
and proj is gate_proj / up_proj / down_proj (Mixtral: pass
proj_names=("w1", "w3", "w2") and block="block_sparse_moe").
"""
from __future__ import annotations

import json
import os

import numpy as np

PROJS = ("gate", "up", "down")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _module(layer, expert, proj, block, proj_names, model_prefix):
    name = proj_names[PROJS.index(proj)]
    return f"{model_prefix}layers.{layer}.{block}.experts.{expert}.{name}"


def save_adapter(path, layers: dict, r: int, lora_alpha: float, use_rslora: bool = False,
                 base_model_name_or_path: str | None = None, block: str = "mlp",
                 proj_names=("gate_proj", "up_proj", "down_proj"), model_prefix: str = "model.",
                 dtype=np.float32) -> None:
    """Write `layers` = {layer_idx: {"gate_lora_a": [E, r, H], ...}} (the six
    LoRA matrices, numpy or torch) as a PEFT adapter directory."""
    from safetensors.numpy import save_file

    from ._arrays import as_numpy

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for layer, mats in layers.items():
        for proj in PROJS:
            A = np.asarray(as_numpy(mats[f"{proj}_lora_a"], f"{proj}_lora_a"), np.float32)
            B = np.asarray(as_numpy(mats[f"{proj}_lora_b"], f"{proj}_lora_b"), np.float32)
            for e in range(A.shape[0]):
                mod = _module(layer, e, proj, block, proj_names, model_prefix)
                tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(A[e], dtype)
                tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(B[e], dtype)
    save_file(tensors, os.path.join(path, WEIGHTS))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(lora_alpha),
        "use_rslora": bool(use_rslora), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": list(proj_names),
        "layers_to_transform": sorted(int(x) for x in layers),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "modules_to_save": None,
    }
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(path, layer: int, num_experts: int, block: str = "mlp",
                 proj_names=None, model_prefix: str = "model.") -> tuple[dict, dict]:
    """(config, {"gate_lora_a": [E, r, H] float32, ...}) for one layer of a
    PEFT adapter directory; a clear KeyError lists what is missing."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    proj_names = tuple(proj_names or config.get("target_modules") or ("gate_proj", "up_proj", "down_proj"))
    if len(proj_names) != 3:
        raise ValueError(f"{path}: target_modules {proj_names} do not name gate, up and down "
                         "projections; pass proj_names=(gate, up, down)")
    tensors = load_file(os.path.join(path, WEIGHTS))
    out = {}
    for proj in PROJS:
        for ab in ("A", "B"):
            mats = []
            for e in range(num_experts):
                key = (f"base_model.model.{_module(layer, e, proj, block, proj_names, model_prefix)}"
                       f".lora_{ab}.weight")
                if key not in tensors:
                    near = sorted(k for k in tensors if f"layers.{layer}." in k)[:6]
                    raise KeyError(f"{path}: adapter has no {key!r}; keys of layer {layer}: "
                                   f"{near or sorted(tensors)[:6]}")
                mats.append(np.asarray(tensors[key], np.float32))
            out[f"{proj}_lora_{ab.lower()}"] = np.stack(mats)
    return config, out
