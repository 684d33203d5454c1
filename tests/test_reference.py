"""Tests that make ktsft/reference.py trustworthy on its own (no kernels needed)."""

import importlib.util
import pathlib

import numpy as np
import pytest

try:
    from ktsft import reference as ref
except Exception:  # package __init__ may import a not-yet-built extension
    _path = pathlib.Path(__file__).resolve().parents[1] / "ktsft" / "reference.py"
    _spec = importlib.util.spec_from_file_location("ktsft_reference", _path)
    ref = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ref)


LORA_KEYS = (
    "gate_lora_a",
    "gate_lora_b",
    "up_lora_a",
    "up_lora_b",
    "down_lora_a",
    "down_lora_b",
)
ARG_ORDER = (
    "hidden_states",
    "expert_ids",
    "weights",
    "gate_proj",
    "up_proj",
    "down_proj",
) + LORA_KEYS + ("lora_scaling",)


def make_layer(rng, T, H, I, E, k, r, expert_ids=None, scaling=1.7):
    """Random layer as a dict keyed by forward()'s argument names."""
    if expert_ids is None:
        expert_ids = rng.integers(0, E, size=(T, k))
    p = {
        "hidden_states": rng.standard_normal((T, H)),
        "expert_ids": np.asarray(expert_ids, dtype=np.int64),
        "weights": rng.uniform(0.1, 1.0, size=(T, k)),
        "gate_proj": rng.standard_normal((E, I, H)) / np.sqrt(H),
        "up_proj": rng.standard_normal((E, I, H)) / np.sqrt(H),
        "down_proj": rng.standard_normal((E, H, I)) / np.sqrt(I),
        "gate_lora_a": rng.standard_normal((E, r, H)) / np.sqrt(H),
        "gate_lora_b": rng.standard_normal((E, I, r)) * 0.5,  # nonzero B
        "up_lora_a": rng.standard_normal((E, r, H)) / np.sqrt(H),
        "up_lora_b": rng.standard_normal((E, I, r)) * 0.5,
        "down_lora_a": rng.standard_normal((E, r, I)) / np.sqrt(I),
        "down_lora_b": rng.standard_normal((E, H, r)) * 0.5,
        "lora_scaling": scaling,
    }
    return p


def call_forward(p):
    return ref.forward(*(p[n] for n in ARG_ORDER))


def test_sigmoid_stable_for_large_inputs():
    z = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        sg = ref.sigmoid(z)
        s = ref.silu(z)
    assert np.all(np.isfinite(sg)) and np.all(np.isfinite(s))
    assert sg[0] == 0.0 and sg[2] == 0.5 and sg[4] == 1.0
    assert s[0] == 0.0 and s[4] == 1000.0


def test_finite_differences_every_element():
    rng = np.random.default_rng(0)
    # Token 1 routes to expert 1 twice: both slots must count.
    ids = np.array([[0, 2], [1, 1], [2, 0]])
    p = make_layer(rng, T=3, H=5, I=4, E=3, k=2, r=2, expert_ids=ids)
    dO = rng.standard_normal((3, 5))

    out, ctx = call_forward(p)
    grad_input, grads = ref.backward(dO, ctx)
    analytic = {"hidden_states": grad_input, "weights": grads["grad_routing_weights"]}
    for key in LORA_KEYS:
        analytic[key] = grads["grad_" + key]

    def loss(q):
        return float(np.sum(dO * call_forward(q)[0]))

    eps = 1e-5
    for name, ana in analytic.items():
        base = p[name]
        num = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            q = dict(p)
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            q[name] = plus
            lp = loss(q)
            q[name] = minus
            lm = loss(q)
            num[idx] = (lp - lm) / (2 * eps)
        assert ana.shape == base.shape, name
        np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8, err_msg=name)

    # grad_routing_weights is <dO_t, y_tj>; y_tj is linear in nothing else, so
    # also check it against a direct evaluation with one-hot weights.
    for t in range(3):
        for j in range(2):
            q = dict(p)
            w1 = np.zeros_like(p["weights"])
            w1[t, j] = 1.0
            q["weights"] = w1
            y_tj = call_forward(q)[0][t]
            assert np.isclose(grads["grad_routing_weights"][t, j], dO[t] @ y_tj, rtol=1e-12)


def torch_moe_lora(torch, x, ids, w, P, s):
    """Eager torch version: loop over experts, gather (token, slot) pairs."""
    out = torch.zeros_like(x)
    E = P["gate_proj"].shape[0]
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        g = xe @ P["gate_proj"][e].T + s * (xe @ P["gate_lora_a"][e].T) @ P["gate_lora_b"][e].T
        u = xe @ P["up_proj"][e].T + s * (xe @ P["up_lora_a"][e].T) @ P["up_lora_b"][e].T
        h = torch.nn.functional.silu(g) * u
        y = h @ P["down_proj"][e].T + s * (h @ P["down_lora_a"][e].T) @ P["down_lora_b"][e].T
        out = out.index_add(0, tok, w[tok, slot].unsqueeze(1) * y)
    return out


def test_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    T, H, I, E, k, r = 17, 12, 10, 6, 3, 4
    p = make_layer(rng, T, H, I, E, k, r, scaling=0.75)
    p["expert_ids"][0] = [2, 2, 5]  # repeated expert
    p["hidden_states"][1] *= 30.0  # push some gate inputs into silu saturation
    dO = rng.standard_normal((T, H))

    out, grad_input, grads = ref.forward_backward(dO, *(p[n] for n in ARG_ORDER))

    tt = {n: torch.tensor(p[n], dtype=torch.float64) for n in ARG_ORDER
          if n not in ("expert_ids", "lora_scaling")}
    for n in ("hidden_states", "weights") + LORA_KEYS:
        tt[n].requires_grad_(True)
    ids = torch.tensor(p["expert_ids"])
    t_out = torch_moe_lora(torch, tt["hidden_states"], ids, tt["weights"], tt, p["lora_scaling"])
    t_out.backward(torch.tensor(dO))

    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_input, tt["hidden_states"].grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["grad_routing_weights"], tt["weights"].grad.numpy(),
                               rtol=1e-10, atol=1e-12)
    for key in LORA_KEYS:
        np.testing.assert_allclose(grads["grad_" + key], tt[key].grad.numpy(),
                                   rtol=1e-10, atol=1e-12, err_msg=key)


def test_zero_lora_b_is_plain_gated_mlp():
    rng = np.random.default_rng(2)
    T, H, I, E, k, r = 7, 6, 5, 4, 2, 3
    p = make_layer(rng, T, H, I, E, k, r)
    for key in ("gate_lora_b", "up_lora_b", "down_lora_b"):
        p[key] = np.zeros_like(p[key])
    out, _ = call_forward(p)

    x = p["hidden_states"]
    expected = np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            e = p["expert_ids"][t, j]
            g = p["gate_proj"][e] @ x[t]
            u = p["up_proj"][e] @ x[t]
            h = g / (1.0 + np.exp(-g)) * u
            expected[t] += p["weights"][t, j] * (p["down_proj"][e] @ h)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)


def test_unused_experts_get_exactly_zero_lora_grads():
    rng = np.random.default_rng(3)
    T, H, I, E, k, r = 6, 5, 4, 5, 2, 2
    ids = np.array([[0, 2], [2, 2], [4, 0], [0, 4], [2, 0], [4, 4]])  # 1 and 3 unused
    p = make_layer(rng, T, H, I, E, k, r, expert_ids=ids)
    _, ctx = call_forward(p)
    _, grads = ref.backward(rng.standard_normal((T, H)), ctx)
    for key in LORA_KEYS:
        g = grads["grad_" + key]
        assert g.shape == p[key].shape and g.dtype == np.float64
        for e in (1, 3):
            assert np.all(g[e] == 0.0), (key, e)
        for e in (0, 2, 4):
            assert np.any(g[e] != 0.0), (key, e)


def test_low_precision_inputs_are_upcast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    p = make_layer(rng, T=4, H=6, I=5, E=3, k=2, r=2)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        low = {n: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v)
               for n, v in p.items()}
        # The oracle for low-precision inputs is the float64 math on the rounded values.
        up = {n: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == dtype else v)
              for n, v in low.items()}
        dO = rng.standard_normal((4, 6)).astype(dtype)
        out_l, gi_l, gr_l = ref.forward_backward(dO, *(low[n] for n in ARG_ORDER))
        out_u, gi_u, gr_u = ref.forward_backward(dO.astype(np.float64), *(up[n] for n in ARG_ORDER))
        assert out_l.dtype == gi_l.dtype == np.float64
        np.testing.assert_array_equal(out_l, out_u)
        np.testing.assert_array_equal(gi_l, gi_u)
        for key in gr_u:
            assert gr_l[key].dtype == np.float64
            np.testing.assert_array_equal(gr_l[key], gr_u[key])


def test_rejects_bad_expert_ids():
    rng = np.random.default_rng(5)
    p = make_layer(rng, T=2, H=3, I=2, E=2, k=1, r=1)
    p["expert_ids"] = np.array([[0], [2]])
    with pytest.raises(ValueError):
        call_forward(p)
