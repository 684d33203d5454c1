"""Plain numpy float64 reference for one MoE layer with LoRA on gate/up/down.

This is the oracle the compiled kernels are tested against. It is slow but
simple: every array is converted to float64, and the work is vectorised per
expert (gather that expert's (token, slot) pairs, then use matrix products).

Math, per token t and slot j with e = expert_ids[t, j] and s = lora_scaling::

    g    = W_gate[e] x + s B_gate[e] (A_gate[e] x)
    u    = W_up[e]   x + s B_up[e]   (A_up[e]   x)
    h    = silu(g) * u
    y_tj = W_down[e] h + s B_down[e] (A_down[e] h)
    out[t] = sum_j weights[t, j] * y_tj

A token may list the same expert in two slots; each slot is its own term.
See docs/derivation.md for the backward formulas.
"""

import numpy as np

__all__ = ["forward", "backward", "forward_backward", "sigmoid", "silu"]

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
):
    """Forward pass. Returns (out [T, H] float64, ctx) where ctx feeds backward."""
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
    E = Wg.shape[0]
    out = np.zeros((T, H), dtype=np.float64)
    per_expert = {}

    for e in range(E):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        xe = x[tok]  # [n, H]; a row per (token, slot) pair
        ax_g = xe @ Ag[e].T  # [n, r]
        ax_u = xe @ Au[e].T
        g = xe @ Wg[e].T + s * (ax_g @ Bg[e].T)  # [n, I]
        u = xe @ Wu[e].T + s * (ax_u @ Bu[e].T)
        sg = sigmoid(g)
        h = g * sg * u
        ah = h @ Ad[e].T  # [n, r]
        y = h @ Wd[e].T + s * (ah @ Bd[e].T)  # [n, H]
        # np.add.at so a token with a repeated expert gets both slot terms.
        np.add.at(out, tok, w[tok, slot][:, None] * y)
        per_expert[e] = dict(
            tok=tok, slot=slot, ax_g=ax_g, ax_u=ax_u, g=g, u=u, sg=sg, h=h, ah=ah
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
        we = w[tok, slot][:, None]  # [n, 1]
        dOe = dO[tok]  # [n, H]

        # z = W_d^T dO + s A_d^T B_d^T dO; then <dO, y> = <z, h>, so y need not be kept.
        bd_dO = dOe @ Bd[e]  # [n, r]
        z = dOe @ Wd[e] + s * (bd_dO @ Ad[e])  # [n, I]
        d_w[tok, slot] = np.sum(z * h, axis=1)

        dY = we * dOe
        dBd[e] = s * (dY.T @ c["ah"])  # [H, r]
        dAd[e] = s * ((we * bd_dO).T @ h)  # [r, I]

        dH = we * z
        silu_g = g * sg
        dG = dH * u * (sg * (1.0 + g * (1.0 - sg)))
        dU = dH * silu_g

        bg_dG = dG @ Bg[e]  # [n, r]
        bu_dU = dU @ Bu[e]
        dBg[e] = s * (dG.T @ c["ax_g"])
        dAg[e] = s * (bg_dG.T @ x[tok])
        dBu[e] = s * (dU.T @ c["ax_u"])
        dAu[e] = s * (bu_dU.T @ x[tok])

        dxe = dG @ Wg[e] + dU @ Wu[e] + s * (bg_dG @ Ag[e] + bu_dU @ Au[e])
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
