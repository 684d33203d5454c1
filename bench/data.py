"""Deterministic synthetic layers, inputs and routings.

Weights are generated one expert at a time straight into the final array
(fp32 or bf16), so a 2.4 GB layer never needs a same-sized temporary."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
WEIGHT_STD = 0.02
SEED = 1234


def _fill_uniform(dst: np.ndarray, rng: np.random.Generator, std: float) -> None:
    """dst[e] ~ U(-a, a) with standard deviation std, one expert at a time.
    Uniform rather than normal: several times faster to draw, and the value
    distribution does not matter to the kernels' speed."""
    a = std * np.sqrt(3.0)
    tmp = np.empty(dst.shape[1:], np.float32)
    for e in range(dst.shape[0]):
        rng.random(dtype=np.float32, out=tmp)
        tmp -= 0.5
        tmp *= 2 * a
        dst[e] = tmp  # casts to bf16 when dst is bf16


def base_weights(shape, dtype: str, seed: int = SEED) -> dict:
    """gate_proj, up_proj [E, I, H] and down_proj [E, H, I] in the storage
    dtype of the run (ktsft uses arrays of its own dtype in place)."""
    E, H, I = shape.E, shape.H, shape.I
    store = BF16 if dtype == "bf16" else np.dtype(np.float32)
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
        out[name] = np.empty(dims, store)
        _fill_uniform(out[name], rng, WEIGHT_STD)
    return out


def lora_weights(shape, rank: int, seed: int = SEED + 1) -> tuple:
    """The six LoRA matrices in init_lora_weights order, float32.
    B is non-zero (unlike a fresh LoRA) so every gradient path carries data."""
    E, H, I, r = shape.E, shape.H, shape.I, rank
    rng = np.random.default_rng(seed)
    dims = ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))
    mats = []
    for d in dims:
        m = np.empty(d, np.float32)
        _fill_uniform(m, rng, WEIGHT_STD)
        mats.append(m)
    return tuple(mats)


def routing(T: int, shape, kind: str, seed: int = SEED + 2) -> tuple:
    """expert_ids [T, k] int64 (k distinct experts per token) and routing
    weights [T, k] float32 (softmax over the k, like norm_topk_prob).

    uniform: every expert equally likely.  skewed: Zipf-like popularity
    p(rank) ~ 1 / (rank + 1)**1.2 over a fixed random order of experts,
    which is what a not-yet-balanced router looks like."""
    E, k = shape.E, shape.k
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        logp = np.zeros(E)
    elif kind == "skewed":
        logp = -1.2 * np.log1p(np.arange(E, dtype=np.float64))
        logp = logp[rng.permutation(E)]
    else:
        raise ValueError(f"routing must be uniform or skewed, got {kind!r}")
    # Gumbel top-k = sampling k experts without replacement with prob. ~ p
    keys = logp[None, :] + rng.gumbel(size=(T, E))
    ids = np.argpartition(-keys, k - 1, axis=1)[:, :k].astype(np.int64)
    logits = rng.standard_normal((T, k)).astype(np.float32)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(ids), w.astype(np.float32)


def activations(T: int, H: int, seed: int = SEED + 3) -> tuple:
    """hidden_states and grad_output [T, H] float32, unit scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H), dtype=np.float32)
    g = rng.standard_normal((T, H), dtype=np.float32)
    return x, g


def active_experts(ids: np.ndarray, E: int) -> int:
    """How many experts got at least one token (their weights are streamed)."""
    return int(np.count_nonzero(np.bincount(ids.ravel(), minlength=E)))
