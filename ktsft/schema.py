"""The LoRA schema of one experts layer, defined once: the names of the six
matrices (argument, parameter and adapter order), their gradients' names,
their shapes and the scaling.  Every module that names, shapes or scales a
LoRA matrix reads it from here (a leaf: imports nothing of ktsft)."""
from __future__ import annotations

import math

#: the projections, in the order of everything below
PROJECTIONS = ("gate", "up", "down")
#: the six matrices: the argument order of init_lora_weights, the parameter
#: names of ktsft.torch.LoRAExperts, the keys of adapter layers
LORA_NAMES = tuple(f"{p}_lora_{ab}" for p in PROJECTIONS for ab in ("a", "b"))
#: their gradients, as backward returns them
LORA_GRAD_NAMES = tuple(f"grad_{n}" for n in LORA_NAMES)


def lora_shapes(E: int, H: int, I: int, r: int) -> dict:
    """Shapes of the six LoRA matrices, keyed by gradient name: A [E, r, in],
    B [E, out, r]; gate and up map H -> I, down maps I -> H."""
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    out = {}
    for p in PROJECTIONS:
        n_in, n_out = dims[p]
        out[f"grad_{p}_lora_a"] = (E, r, n_in)
        out[f"grad_{p}_lora_b"] = (E, n_out, r)
    return out


def lora_param_shapes(E: int, H: int, I: int, r: int) -> dict:
    """The same shapes keyed by matrix name (LORA_NAMES)."""
    s = lora_shapes(E, H, I, r)
    return {n: s["grad_" + n] for n in LORA_NAMES}


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)
