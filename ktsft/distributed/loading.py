"""Reading one rank's slice of a layer's experts from a checkpoint, one
expert at a time, so a rank never holds more than its shard."""
from __future__ import annotations

import numpy as np

from .._arrays import BF16
from .. import validation as V
from ..weights import NAMES, check_expert, check_source_shapes, expert_source, ktsft_layer


def read_expert_shard(weight_path, layer_idx: int, lo: int, hi: int, num_experts: int,
                      hidden_size: int, intermediate_size: int, dtype: str,
                      key_prefix: str | None = None):
    """(gate [n, I, H], up [n, I, H], down [n, H, I]) of experts [lo, hi),
    in bf16 for a bf16 layer and float32 otherwise (the wrapper uses them
    in place; int8/int4 layers quantize them at load, so those pass through
    a float32 copy of the shard)."""
    own = ktsft_layer(weight_path)  # a save_weights file: stored, not checkpoint, layout
    if own is not None:
        if own.dtype not in ("bf16", "fp32"):
            raise ValueError(f"weight_path {weight_path!r} holds {own.dtype} weights saved by "
                             "ktsft; a shard is read from the original checkpoint (bf16/fp32/fp8) "
                             "or from a bf16/fp32 save_weights file")
        src = _Stored(own)
    else:
        src = expert_source(weight_path, layer_idx, key_prefix)
    E, H, I = num_experts, hidden_size, intermediate_size
    want = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
    check_source_shapes(src, want, weight_path, where=f"layer {layer_idx} ",
                        sizes="num_experts, hidden_size, intermediate_size")
    store = BF16 if dtype == "bf16" else np.dtype(np.float32)
    out = [np.empty((hi - lo, *want[n][1:]), store) for n in NAMES]
    for i, e in enumerate(range(lo, hi)):
        ws = src.expert(e)
        if not isinstance(src, _Stored):  # stored files were checked whole when opened
            ws = check_expert(ws, want, weight_path, e, where=f"layer {layer_idx} ")
        for dst, w in zip(out, ws):
            V.check_finite(w, f"weight_path {weight_path!r}: expert {e} (layer {layer_idx})")
            dst[i] = w
    return out


class _Stored:
    """A bf16/fp32 save_weights file seen as an expert source."""

    def __init__(self, layer):
        self.layer = layer

    def shapes(self):
        return self.layer.stored_shapes()

    def expert(self, e):
        return self.layer.stored_expert(e)[0]
