"""Shared fixtures: random layers, the reference oracle and error bounds."""
import ml_dtypes
import numpy as np
import pytest

import ktsft
from ktsft import reference

ISAS = ktsft.cpu_info()["runnable_isas"]
DTYPES = ("fp32", "bf16")
LORA_ARGS = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
OUTPUTS = ("out", "grad_input", "grad_routing_weights", "grad_gate_lora_a", "grad_gate_lora_b",
           "grad_up_lora_a", "grad_up_lora_b", "grad_down_lora_a", "grad_down_lora_b")


def bf16_round(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / den) if den > 0 else float(np.linalg.norm(got))


class Problem:
    """A random layer, a batch and an output gradient."""

    def __init__(self, T=7, H=37, I=29, E=5, k=3, r=3, alpha=6.0, seed=0, routing="uniform",
                 allow_repeats=False):
        rng = np.random.default_rng(seed)
        self.T, self.H, self.I, self.E, self.k, self.r, self.alpha = T, H, I, E, k, r, alpha
        f = np.float32
        self.gate_proj = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(f)
        self.up_proj = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(f)
        self.down_proj = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(f)
        shapes = [(E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r)]
        self.lora = [(0.3 * rng.standard_normal(s) / np.sqrt(s[-1])).astype(f) for s in shapes]
        self.x = rng.standard_normal((T, H)).astype(f)
        if routing == "uniform":
            self.ids = np.stack([rng.choice(E, k, replace=allow_repeats) for _ in range(T)])
        elif routing == "skewed":  # a few experts take most tokens, several get none
            p = 1.0 / np.arange(1, E + 1) ** 2
            p /= p.sum()
            self.ids = np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)])
        elif routing == "two_experts":
            self.ids = np.tile(np.arange(k) % 2, (T, 1))
        else:
            raise ValueError(routing)
        self.ids = self.ids.astype(np.int64)
        self.w = rng.uniform(-0.2, 1.0, (T, k)).astype(f)
        self.dO = rng.standard_normal((T, H)).astype(f)

    def wrapper(self, dtype="fp32", isa=None, threads=2, depth=1, **kw):
        m = ktsft.SFTMoEWrapper(0, self.E, self.k, self.H, self.I, cpuinfer_threads=threads,
                                lora_rank=self.r, lora_alpha=self.alpha, max_cache_depth=depth,
                                dtype=dtype, isa=isa, **kw)
        m.load_weights(gate_proj=self.gate_proj, up_proj=self.up_proj, down_proj=self.down_proj)
        m.init_lora_weights(*self.lora)
        return m

    def run(self, m, x=None, dO=None):
        out = m.forward_sft(self.x if x is None else x, self.ids, self.w)
        dx, grads = m.backward(self.dO if dO is None else dO)
        res = {"out": np.array(out, copy=True), "grad_input": np.array(dx, copy=True)}
        res.update({n: np.array(v, copy=True) for n, v in grads.items()})
        return res

    def reference(self, bf16=False):
        rnd = bf16_round if bf16 else (lambda a: a)
        out, ctx = reference.forward(rnd(self.x), self.ids, self.w, rnd(self.gate_proj),
                                     rnd(self.up_proj), rnd(self.down_proj), *self.lora,
                                     self.alpha / self.r)
        dx, grads = reference.backward(rnd(self.dO), ctx)
        res = {"out": out, "grad_input": dx}
        res.update(grads)
        return res


def check_against_reference(problem, got, dtype):
    """fp32: every output within 1e-5 relative.  bf16: within 1e-2, or 1.5x
    the error that bf16-rounding the inputs alone causes, if that is larger."""
    ref = problem.reference()
    ref_b = problem.reference(bf16=True) if dtype == "bf16" else None
    for name in OUTPUTS:
        err = rel_err(got[name], ref[name])
        if dtype == "fp32":
            bound = 1e-5
        else:
            bound = max(1e-2, 1.5 * rel_err(ref_b[name], ref[name]))
        assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} ({dtype})"


@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


# ---------------------------------------------------------------------------
# markers (registered in pyproject.toml), one table: module -> marks, and the
# single slow tests of otherwise quick modules
# ---------------------------------------------------------------------------
def run_python(args, timeout):
    """A Python subprocess (args after the interpreter: ["-c", code] or a
    script path), output captured; a hang fails the test instead of
    stalling CI."""
    import subprocess
    import sys

    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"subprocess hung for {timeout} s: {e.stdout}{e.stderr}")


MARKS = {
    "test_kernels": ("native",), "test_determinism": ("native",), "test_amx": ("native",),
    "test_native_boundary": ("native",), "test_portability": ("native",),
    "test_properties": ("native",), "test_reference": ("native",), "test_quantized": ("native",),
    "test_dropout": ("native",), "test_bad_input_matrix": ("native",), "test_numa": ("native",),
    "test_distributed": ("distributed", "slow"),
    "test_demo": ("slow",), "test_hf_trainer": ("slow",), "test_readme": ("slow",),
    "test_bench_paths": ("slow",), "test_bench_probe": ("slow",), "test_bench_e2e": ("slow",),
    "test_stability": ("slow",), "test_cli": ("slow",),
}
SLOW_TESTS = ("test_no_dense_delta_peak_memory", "test_peak_rss_of_a_1gb_checkpoint")


def pytest_collection_modifyitems(config, items):
    for item in items:
        mod = item.module.__name__.rsplit(".", 1)[-1]
        for mark in MARKS.get(mod, ()):
            item.add_marker(getattr(pytest.mark, mark))
        if item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
