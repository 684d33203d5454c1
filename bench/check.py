"""The accuracy gate: ktsft's outputs and gradients against a PyTorch peer's,
so a fast but wrong kernel cannot produce a good row."""
from __future__ import annotations

import numpy as np

TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
COMPARED = ("out", "grad_x", "grad_routing_weights", "grad_gate_lora_a", "grad_gate_lora_b",
            "grad_up_lora_a", "grad_up_lora_b", "grad_down_lora_a", "grad_down_lora_b")


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| (Frobenius), in float64."""
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def compare(ours: dict, peer: dict, dtype: str) -> dict:
    """Per-tensor relative errors, the worst one and whether it passes."""
    errs = {n: rel_err(ours[n], peer[n]) for n in COMPARED}
    worst = max(errs, key=errs.get)
    return {"errors": errs, "worst": worst, "max_rel_err": errs[worst],
            "tolerance": TOLERANCE[dtype], "ok": errs[worst] <= TOLERANCE[dtype]}
