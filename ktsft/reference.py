"""Plain numpy float64 reference for one MoE layer with LoRA on gate/up/down.

This is the oracle the compiled kernels are tested against. It is slow but
simple: every array is converted to float64, and the work is vectorised per
expert (gather that expert's (token, slot) pairs, then use matrix products).

Math, per token t and slot j with e = expert_ids[t, j] and s = lora_scaling::

    g    = W_gate[e] x + s B_gate[e] (A_gate[e] (m_g * x))
    u    = W_up[e]   x + s B_up[e]   (A_up[e]   (m_u * x))
    h    = silu(g) * u
    y_tj = W_down[e] h + s B_down[e] (A_down[e] (m_d * h))
    out[t] = sum_j weights[t, j] * y_tj

m_g, m_u, m_d are the LoRA-dropout multipliers of pair (t, j) (0 or
1 / (1 - p); all ones without dropout), see dropout_masks.
A token may list the same expert in two slots; each slot is its own term.
See docs/derivation.md for the backward formulas.
"""

import numpy as np

__all__ = ["forward", "backward", "forward_backward", "sigmoid", "silu", "dropout_threshold",
           "dropout_hash", "dropout_keep", "dropout_masks"]

# ---------------------------------------------------------------------------
# LoRA dropout masks: the numpy twin of kt_dropout_f32 (src/common.inc),
# bitwise.  Row (seed, proj, tj) gets a 32-bit key from two rounds of the
# splitmix64 finaliser; element i of the row hashes as
# lowbias32(key ^ (i * 0x9E3779B9)) and is kept when the hash is
# >= floor(p * 2^32).  proj: 0 gate, 1 up, 2 down; tj = t * k + j.
# ---------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _mix64(z):
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _lowbias32(x):
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def dropout_threshold(p: float) -> int:
    """floor(p * 2^32): elements whose hash is below are dropped."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
    return int(p * 4294967296.0)


def dropout_hash(seed: int, proj: int, tj, n: int) -> np.ndarray:
    """uint32 [len(tj), n]: the hash of element i of row (seed, proj, tj)."""
    tj = np.asarray(tj, np.int64).reshape(-1)
    row = (np.uint64(int(proj) & 0xFFFFFFFF) << np.uint64(32)) | (
        tj.astype(np.uint32).astype(np.uint64))
    with np.errstate(over="ignore"):
        z = _mix64(np.uint64(int(seed) & _M64) ^ _mix64(row + np.uint64(0x9E3779B97F4A7C15)))
    key = (z ^ (z >> np.uint64(32))).astype(np.uint32)           # low 32 bits
    with np.errstate(over="ignore"):
        ij = np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B9)
    return _lowbias32(key[:, None] ^ ij[None, :])


def dropout_keep(seed: int, proj: int, tj, n: int, p: float) -> np.ndarray:
    """bool [len(tj), n]: which elements LoRA dropout keeps."""
    return dropout_hash(seed, proj, tj, n) >= np.uint32(dropout_threshold(p))


def dropout_masks(seed: int, p: float, T: int, k: int, H: int, I: int):
    """The three float64 multiplier arrays of one forward: (m_gate [T, k, H],
    m_up [T, k, H], m_down [T, k, I]), 0 where dropped and 1 / (1 - p) where
    kept -- the ``dropout_masks`` argument of forward()."""
    tj = np.arange(T * k)
    scale = 1.0 / (1.0 - float(p))
    return tuple(dropout_keep(seed, proj, tj, n, p).reshape(T, k, n) * scale
                 for proj, n in ((0, H), (1, H), (2, I)))


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def sigmoid(z):
    """Numerically stable logistic function (no overflow for large |z|)."""
    z = _f64(z)
    e = np.exp(-np.abs(z))  # in (0, 1], never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(z):
    """silu(z) = z * sigmoid(z)."""
    z = _f64(z)
    return z * sigmoid(z)


def _check_shapes(x, ids, w, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd):
    if x.ndim != 2:
        raise ValueError(f"hidden_states must be [T, H], got {x.shape}")
    T, H = x.shape
    if Wg.ndim != 3:
        raise ValueError(f"gate_proj must be [E, I, H], got {Wg.shape}")
    E, I, _ = Wg.shape
    if Ag.ndim != 3:
        raise ValueError(f"gate_lora_a must be [E, r, H], got {Ag.shape}")
    r = Ag.shape[1]
    expected = {
        "gate_proj": (Wg, (E, I, H)),
        "up_proj": (Wu, (E, I, H)),
        "down_proj": (Wd, (E, H, I)),
        "gate_lora_a": (Ag, (E, r, H)),
        "gate_lora_b": (Bg, (E, I, r)),
        "up_lora_a": (Au, (E, r, H)),
        "up_lora_b": (Bu, (E, I, r)),
        "down_lora_a": (Ad, (E, r, I)),
        "down_lora_b": (Bd, (E, H, r)),
    }
    for name, (arr, shape) in expected.items():
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if ids.ndim != 2 or ids.shape[0] != T:
        raise ValueError(f"expert_ids must be [T, k] with T={T}, got {ids.shape}")
    if w.shape != ids.shape:
        raise ValueError(f"weights must have shape {ids.shape}, got {w.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        raise ValueError(f"expert_ids must lie in [0, {E})")


def forward(
    hidden_states,
    expert_ids,
    weights,
    gate_proj,
    up_proj,
    down_proj,
    gate_lora_a,
    gate_lora_b,
    up_lora_a,
    up_lora_b,
    down_lora_a,
    down_lora_b,
    lora_scaling,
    dropout_masks=None,
):
    """Forward pass. Returns (out [T, H] float64, ctx) where ctx feeds backward.

    dropout_masks: None, or (m_gate [T, k, H], m_up [T, k, H], m_down
    [T, k, I]) multipliers of the LoRA inputs (see dropout_masks())."""
    x = _f64(hidden_states)
    ids = np.asarray(expert_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"expert_ids must be an integer array, got {ids.dtype}")
    ids = ids.astype(np.int64)
    w = _f64(weights)
    Wg, Wu, Wd = _f64(gate_proj), _f64(up_proj), _f64(down_proj)
    Ag, Bg = _f64(gate_lora_a), _f64(gate_lora_b)
    Au, Bu = _f64(up_lora_a), _f64(up_lora_b)
    Ad, Bd = _f64(down_lora_a), _f64(down_lora_b)
    s = float(lora_scaling)
    _check_shapes(x, ids, w, Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd)

    T, H = x.shape
    E, I = Wg.shape[0], Wg.shape[1]
    if dropout_masks is not None:
        Mg, Mu, Md = (_f64(m) for m in dropout_masks)
        k = ids.shape[1]
        for name, m, n in (("m_gate", Mg, H), ("m_up", Mu, H), ("m_down", Md, I)):
            if m.shape != (T, k, n):
                raise ValueError(f"dropout_masks: {name} must have shape {(T, k, n)}, got {m.shape}")
    out = np.zeros((T, H), dtype=np.float64)
    per_expert = {}

    for e in range(E):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        xe = x[tok]  # [n, H]; a row per (token, slot) pair
        if dropout_masks is None:
            mg = mu = md = 1.0
        else:
            mg, mu, md = Mg[tok, slot], Mu[tok, slot], Md[tok, slot]
        ax_g = (mg * xe) @ Ag[e].T  # [n, r]
        ax_u = (mu * xe) @ Au[e].T
        g = xe @ Wg[e].T + s * (ax_g @ Bg[e].T)  # [n, I]
        u = xe @ Wu[e].T + s * (ax_u @ Bu[e].T)
        sg = sigmoid(g)
        h = g * sg * u
        ah = (md * h) @ Ad[e].T  # [n, r]
        y = h @ Wd[e].T + s * (ah @ Bd[e].T)  # [n, H]
        # np.add.at so a token with a repeated expert gets both slot terms.
        np.add.at(out, tok, w[tok, slot][:, None] * y)
        per_expert[e] = dict(
            tok=tok, slot=slot, ax_g=ax_g, ax_u=ax_u, g=g, u=u, sg=sg, h=h, ah=ah,
            mg=mg, mu=mu, md=md,
        )

    ctx = dict(
        x=x, ids=ids, w=w, s=s,
        Wg=Wg, Wu=Wu, Wd=Wd, Ag=Ag, Bg=Bg, Au=Au, Bu=Bu, Ad=Ad, Bd=Bd,
        per_expert=per_expert,
    )
    return out, ctx


def backward(grad_output, ctx):
    """Backward pass. Returns (grad_input [T, H] float64, grads dict).

    grads holds grad_{gate,up,down}_lora_{a,b} (zeros for experts with no
    token) and grad_routing_weights [T, k].
    """
    dO = _f64(grad_output)
    x, w, s = ctx["x"], ctx["w"], ctx["s"]
    Wg, Wu, Wd = ctx["Wg"], ctx["Wu"], ctx["Wd"]
    Ag, Bg, Au, Bu = ctx["Ag"], ctx["Bg"], ctx["Au"], ctx["Bu"]
    Ad, Bd = ctx["Ad"], ctx["Bd"]
    if dO.shape != x.shape:
        raise ValueError(f"grad_output must have shape {x.shape}, got {dO.shape}")

    dX = np.zeros_like(x)
    d_w = np.zeros_like(w)
    dAg, dBg = np.zeros_like(Ag), np.zeros_like(Bg)
    dAu, dBu = np.zeros_like(Au), np.zeros_like(Bu)
    dAd, dBd = np.zeros_like(Ad), np.zeros_like(Bd)

    for e, c in ctx["per_expert"].items():
        tok, slot = c["tok"], c["slot"]
        g, u, sg, h = c["g"], c["u"], c["sg"], c["h"]
        mg, mu, md = c["mg"], c["mu"], c["md"]
        we = w[tok, slot][:, None]  # [n, 1]
        dOe = dO[tok]  # [n, H]

        # z = W_d^T dO + m_d * s A_d^T B_d^T dO; then <dO, y> = <z, h>, so y need not be kept.
        bd_dO = dOe @ Bd[e]  # [n, r]
        z = dOe @ Wd[e] + md * (s * (bd_dO @ Ad[e]))  # [n, I]
        d_w[tok, slot] = np.sum(z * h, axis=1)

        dY = we * dOe
        dBd[e] = s * (dY.T @ c["ah"])  # [H, r]
        dAd[e] = s * ((we * bd_dO).T @ (md * h))  # [r, I]

        dH = we * z
        silu_g = g * sg
        dG = dH * u * (sg * (1.0 + g * (1.0 - sg)))
        dU = dH * silu_g

        bg_dG = dG @ Bg[e]  # [n, r]
        bu_dU = dU @ Bu[e]
        dBg[e] = s * (dG.T @ c["ax_g"])
        dAg[e] = s * (bg_dG.T @ (mg * x[tok]))
        dBu[e] = s * (dU.T @ c["ax_u"])
        dAu[e] = s * (bu_dU.T @ (mu * x[tok]))

        dxe = dG @ Wg[e] + dU @ Wu[e] + s * (mg * (bg_dG @ Ag[e]) + mu * (bu_dU @ Au[e]))
        np.add.at(dX, tok, dxe)

    grads = {
        "grad_gate_lora_a": dAg,
        "grad_gate_lora_b": dBg,
        "grad_up_lora_a": dAu,
        "grad_up_lora_b": dBu,
        "grad_down_lora_a": dAd,
        "grad_down_lora_b": dBd,
        "grad_routing_weights": d_w,
    }
    return dX, grads


def forward_backward(grad_output, *args, **kwargs):
    """Run forward then backward. Same arguments as forward, after grad_output.

    Returns (out, grad_input, grads).
    """
    out, ctx = forward(*args, **kwargs)
    grad_input, grads = backward(grad_output, ctx)
    return out, grad_input, grads
