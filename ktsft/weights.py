"""Reading one layer's frozen expert weights from weight_path.

Supported here: a directory holding gate_proj.npy, up_proj.npy and
down_proj.npy (memory-mapped), or one .safetensors file with the keys
gate_proj, up_proj and down_proj (read through the safetensors library).
"""
from __future__ import annotations

import os

import numpy as np

NAMES = ("gate_proj", "up_proj", "down_proj")


def read_layer(weight_path) -> dict:
    """{'gate_proj': [E, I, H], 'up_proj': [E, I, H], 'down_proj': [E, H, I]}"""
    if weight_path is None:
        raise ValueError("load_weights: no arrays given and weight_path is None")
    path = os.fspath(weight_path)
    if os.path.isdir(path):
        missing = [n for n in NAMES if not os.path.isfile(os.path.join(path, n + ".npy"))]
        if missing:
            found = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"weight_path {path!r}: missing {', '.join(m + '.npy' for m in missing)}; found {found}")
        return {n: np.load(os.path.join(path, n + ".npy"), mmap_mode="r") for n in NAMES}
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
            missing = [n for n in NAMES if n not in keys]
            if missing:
                raise KeyError(f"weight_path {path!r}: missing keys {missing}; found {sorted(keys)}")
            return {n: f.get_tensor(n) for n in NAMES}
    raise FileNotFoundError(
        f"weight_path {path!r} is neither a directory of .npy files nor a .safetensors file")
