"""The cross matrix: every array argument of the public calls (numpy
wrapper, torch module), crossed with layout, dtype, value and size.

Each cell has an oracle outcome:

- SAME: accepted, and every result (output, input gradient, the six LoRA
  gradients, the routing-weight gradient) is bitwise that of the plain call
  (C-contiguous, the kernels' dtype) on the values the kernels see (the
  argument converted to float32 / int);
- REFUSED: a Python exception whose message names the argument; afterwards
  the layer gives bitwise the plain call's results (weights, LoRA and the
  cached forward unchanged);
- EITHER: both are fine (e.g. an output that aliases an input); what is
  never fine is the third outcome, accepted with another result: a silent
  acceptance.

test_bad_input_matrix.py holds the hand-written rows (types, ranks, sizes,
calls out of order, absurd sizes); this file is the systematic product.
`python tests/test_input_cross.py` prints the counts by class
(docs/reliability.md quotes them).
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
import warnings

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import Problem  # noqa: E402

import ktsft  # noqa: E402
from ktsft.schema import LORA_GRAD_NAMES, LORA_NAMES  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

SAME, REFUSED, EITHER = "same", "refused", "either"
T, H, I, E, K, R = 6, 24, 16, 5, 2, 3
BF16 = ml_dtypes.bfloat16

# ---------------------------------------------------------------------------
# variants of one clean array: (class, name) -> callable(clean) -> (variant, seen)
# `seen`: what the kernels should see (None: refused anyway)
# ---------------------------------------------------------------------------
_TMP = tempfile.mkdtemp(prefix="ktsft-cross-")


def _memmap(a, mode):
    f = os.path.join(_TMP, f"m{np.random.randint(1 << 30)}.npy")
    mm = np.lib.format.open_memmap(f, mode="w+", dtype=a.dtype, shape=a.shape)
    mm[...] = a
    mm.flush()
    del mm
    return np.load(f, mmap_mode=mode)


def _misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    v = buf[1:].view(a.dtype).reshape(a.shape)
    v[...] = a
    return v


def _strided(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _masked(a):
    mask = np.zeros(a.shape, bool)
    mask.flat[0] = True
    return np.ma.masked_array(a.copy(), mask=mask)


def _set(a, value, dtype=None):
    b = a.astype(dtype or a.dtype, copy=True)
    b.flat[0] = value
    return b


LAYOUTS = {
    "read_only": lambda a: (_read_only(a), a),
    "memmap_r": lambda a: (_memmap(a, "r"), a),
    "memmap_rw": lambda a: (_memmap(a, "r+"), a),
    "strided": lambda a: (_strided(a), a),
    "fortran": lambda a: (np.asfortranarray(a), a),
    "misaligned": lambda a: (_misaligned(a), a),
    "masked": lambda a: (_masked(a), None),
    "negative_stride": lambda a: (a[::-1].copy()[::-1], a),
}
if torch is not None:
    LAYOUTS["torch"] = lambda a: (torch.from_numpy(a.copy()), a)
    LAYOUTS["torch_noncontig"] = lambda a: (torch.from_numpy(_strided(a).base.copy())[..., ::2],
                                            a)
FLOAT_DTYPES = {"float16": np.float16, "float64": np.float64, "bfloat16": BF16}
INT_DTYPES = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
              "uint8": np.uint8, "uint32": np.uint32}
OTHER_DTYPES = {"bool": np.bool_, "complex64": np.complex64, "object": object}


# ---------------------------------------------------------------------------
# the calls
# ---------------------------------------------------------------------------
def _problem():
    return Problem(T=T, H=H, I=I, E=E, k=K, r=R, seed=4)


def _results(out, dx, grads):
    res = {"out": np.asarray(out, np.float32), "grad_input": np.asarray(dx, np.float32)}
    res.update({n: np.array(v, np.float32) for n, v in grads.items()})
    return res


def _as_f32(x):
    return np.asarray(x).astype(np.float32) if not hasattr(x, "numpy") else \
        x.detach().float().numpy()


class Arg:
    """One argument of one call: role, the clean array, and how to run the
    call with it replaced."""

    def __init__(self, call, name, role, clean, run):
        self.call, self.name, self.role, self.clean, self.run = call, name, role, clean, run


def _wrapper_args(dtype):
    p = _problem()

    def fresh():
        return p.wrapper(dtype=dtype, threads=1, depth=2)

    def step(m, x=None, ids=None, w=None, dO=None, out=None, dx_out=None, grads_out=None):
        o = m.forward_sft(p.x if x is None else x, p.ids if ids is None else ids,
                          p.w if w is None else w, out=out)
        o = np.array(_as_f32(o))
        dx, g = m.backward(p.dO if dO is None else dO, grads_out=grads_out,
                           grad_input_out=dx_out)
        return _results(o, _as_f32(dx), {n: _as_f32(v) for n, v in g.items()})

    def fwd(key):
        return lambda a: step(fresh(), **{key: a})

    args = [Arg("forward_sft", "hidden_states", "in", p.x, fwd("x")),
            Arg("forward_sft", "expert_ids", "ids", p.ids.astype(np.int32), fwd("ids")),
            Arg("forward_sft", "weights", "in_fp32", p.w, fwd("w")),
            Arg("forward_sft", "out", "out", np.zeros((T, H), np.float32),
                lambda a: step(fresh(), out=a)),
            Arg("backward", "grad_output", "in", p.dO, fwd("dO")),
            Arg("backward", "grad_input_out", "out", np.zeros((T, H), np.float32),
                lambda a: step(fresh(), dx_out=a))]
    shapes = dict(zip(LORA_GRAD_NAMES, (a.shape for a in p.lora)))

    def grads(name):
        def run(a):
            g = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
            g[name] = a
            return step(fresh(), grads_out=g)
        return run

    for n in ("grad_gate_lora_a", "grad_down_lora_b"):
        args.append(Arg("backward", f"grads_out[{n!r}]", "out_grad",
                        np.zeros(shapes[n], np.float32), grads(n)))

    def base(i):
        def run(a):
            m = ktsft.SFTMoEWrapper(0, E, K, H, I, cpuinfer_threads=1, lora_rank=R,
                                    lora_alpha=p.alpha, max_cache_depth=2, dtype=dtype)
            w = [p.gate_proj, p.up_proj, p.down_proj]
            w[i] = a
            m.load_weights(gate_proj=w[0], up_proj=w[1], down_proj=w[2])
            m.init_lora_weights(*p.lora)
            return step(m)
        return run

    for i, n in ((0, "gate_proj"), (2, "down_proj")):
        args.append(Arg("load_weights", n, "base", [p.gate_proj, p.up_proj, p.down_proj][i],
                        base(i)))

    def lora(i):
        def run(a):
            m = ktsft.SFTMoEWrapper(0, E, K, H, I, cpuinfer_threads=1, lora_rank=R,
                                    lora_alpha=p.alpha, max_cache_depth=2, dtype=dtype)
            m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
            la = list(p.lora)
            la[i] = a
            m.init_lora_weights(*la)
            return step(m)
        return run

    for i in (0, 5):
        args.append(Arg("init_lora_weights", LORA_NAMES[i], "lora", p.lora[i], lora(i)))
    return args


def _module_step(p, make, x=None, ids=None, w=None):
    """One forward and backward of a torch experts module make() with
    p's inputs, any of them replaced; its results as numpy arrays."""
    torch.manual_seed(0)
    mod = make()
    mod.load_weights(torch.from_numpy(p.gate_proj), torch.from_numpy(p.up_proj),
                     torch.from_numpy(p.down_proj))
    x = torch.from_numpy(p.x.copy()) if x is None else x
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.detach().requires_grad_(True)
    out = mod(x, torch.from_numpy(p.ids) if ids is None else ids,
              torch.from_numpy(p.w) if w is None else w)
    (out.float() * torch.from_numpy(p.dO)).sum().backward()
    res = {"out": out.detach().float().numpy(), "grad_input": x.grad.float().numpy()}
    res.update({n: getattr(mod, n).grad.numpy().copy() for n in LORA_NAMES})
    return res


def _module_args(call, names, run):
    p = _problem()
    return [Arg(call, names[0], "t_in", p.x, lambda a: run(x=a)),
            Arg(call, names[1], "t_ids", p.ids, lambda a: run(ids=a)),
            Arg(call, names[2], "t_w", p.w, lambda a: run(w=a))]


def _torch_args(dtype, hf=False):
    import ktsft.torch as kt

    p = _problem()
    if hf:
        from ktsft.integrations.transformers import HFLoRAExperts as cls
        call, names = "HFLoRAExperts.forward", ("hidden_states", "top_k_index", "top_k_weights")
    else:
        cls = kt.LoRAExperts
        call, names = "LoRAExperts.forward", ("hidden_states", "topk_ids", "topk_weights")

    def run(**kw):
        return _module_step(p, lambda: cls(E, K, H, I, r=R, alpha=p.alpha, dtype=dtype,
                                           threads=1), **kw)

    return _module_args(call, names, run)


def _ep_args(dtype):
    """ExpertParallelLoRAExperts on a one-rank gloo group (made and torn
    down around each call, so no other test sees a group)."""
    import torch.distributed as dist

    from ktsft.distributed import ExpertParallelLoRAExperts

    p = _problem()

    def run(**kw):
        store = tempfile.mktemp(dir=_TMP)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            return _module_step(p, lambda: ExpertParallelLoRAExperts(
                E, K, H, I, r=R, alpha=p.alpha, dtype=dtype, threads=1), **kw)
        finally:
            dist.destroy_process_group()

    return _module_args("ExpertParallelLoRAExperts.forward",
                        ("hidden_states", "topk_ids", "topk_weights"), run)


def _ep_available():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and not dist.is_initialized()


# ---------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------
def variants(arg, dtype):
    """(class, name, make) for every variant that applies to `arg`."""
    a, role = arg.clean, arg.role
    out = []
    torch_role = role.startswith("t_")
    for name, make in LAYOUTS.items():
        if torch_role and not name.startswith("torch"):
            continue
        out.append(("layout", name, make))
    if torch_role:
        conv = lambda v: (torch.from_numpy(np.ascontiguousarray(v)), v)  # noqa: E731
    else:
        conv = lambda v: (v, v)  # noqa: E731
    for name, dt in {**FLOAT_DTYPES, **INT_DTYPES, **OTHER_DTYPES}.items():
        if torch_role and dt in (object, np.uint32):
            continue
        if torch_role and dt is BF16:
            out.append(("dtype", name, lambda a: (torch.from_numpy(a).to(torch.bfloat16),
                                                  torch.from_numpy(a).to(torch.bfloat16)
                                                  .float().numpy())))
            continue
        out.append(("dtype", name, lambda a, dt=dt: (conv(a.astype(dt))[0], a.astype(dt))))
    if role not in ("ids", "t_ids", "out", "out_grad"):
        vals = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "denormal": 1e-40}
        for name, v in vals.items():
            out.append(("value", name, lambda a, v=v: conv(_set(a, v))))
        out.append(("value", "overflow_float64", lambda a: conv(_set(a, 1e300, np.float64))))
        if dtype == "bf16" and role in ("in", "base", "t_in"):
            # finite in float32, inf once rounded to bf16 (the kernels' dtype)
            out.append(("value", "overflow_bf16", lambda a: conv(_set(a, 3.4e38))))
    if role in ("ids", "t_ids"):
        ids_vals = {"negative": -1, "num_experts": E, "beyond_int32": 1 << 40}
        if arg.call.startswith("HF"):  # id == E: transformers' mark of no local expert
            ids_vals["num_experts_plus_one"] = ids_vals.pop("num_experts") + 1
        for name, v in ids_vals.items():
            out.append(("value", name, lambda a, v=v: conv(_set(a, v, np.int64))))
    if role == "out_grad":
        out.append(("alias", "another_grads_out", None))
        out.append(("alias", "the_registered_lora", None))
    if role == "out":
        out.append(("alias", "an_input", None))
    for name, f in {"one_row_less": lambda a: a[:-1], "extra_axis": lambda a: a[None],
                    "flattened": lambda a: a.reshape(-1), "empty": lambda a: a[:0]}.items():
        if role in ("base", "lora", "out_grad") and name == "empty":
            continue
        out.append(("size", name, lambda a, f=f: conv(np.ascontiguousarray(f(a)))))
    return out


def expect(role, cls, name, dtype):
    """The outcome a cell must have (see the module docstring)."""
    float_role = role in ("in", "in_fp32", "base", "lora", "t_in", "t_w")
    if cls == "size":
        return REFUSED
    if cls == "alias":
        return EITHER if name == "an_input" else REFUSED
    if cls == "value":
        return SAME if name == "denormal" else REFUSED
    if cls == "layout":
        if name == "masked":
            return REFUSED
        if role in ("out", "out_grad"):
            # written in place: must be C-contiguous, aligned and writable
            return SAME if name in ("memmap_rw", "torch") else REFUSED
        if role == "lora":
            # registered in place and read by every later call
            return REFUSED if name == "misaligned" else EITHER
        return SAME
    # dtypes
    if role == "t_ids":
        return SAME if name in INT_DTYPES else REFUSED
    if role == "ids":  # the numpy wrapper takes the router's int32 / int64
        return SAME if name in ("int32", "int64") else EITHER if name in INT_DTYPES else REFUSED
    if role in ("out", "out_grad"):
        return EITHER if name in ("bfloat16", "float16", "float64") else REFUSED
    if float_role:
        return EITHER if name in FLOAT_DTYPES else REFUSED
    raise AssertionError((role, cls, name))


# results that follow an argument's dtype (bf16 in: bf16 out), compared at
# that dtype's precision instead of bitwise
ROUNDED = {"bfloat16": 1e-2, "float16": 2e-3}


def _close(a, b, tol):
    return float(np.linalg.norm(a - b)) <= tol * max(float(np.linalg.norm(b)), 1e-30)


def _cells():
    cells = []
    for dtype in ("fp32", "bf16"):
        args = _wrapper_args(dtype)
        if torch is not None:
            args += _torch_args(dtype) + _torch_args(dtype, hf=True)
            if _ep_available():
                args += _ep_args(dtype)
        for arg in args:
            for cls, name, make in variants(arg, dtype):
                cells.append((dtype, arg, cls, name, make))
    return cells


CELLS = _cells()


def _clean_result(arg, seen):
    a = np.asarray(seen)
    if arg.role in ("ids", "t_ids"):
        a = a.astype(np.int64)
    else:
        a = a.astype(np.float32)
    if arg.role.startswith("t_"):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return arg.run(np.ascontiguousarray(a) if not arg.role.startswith("t_") else a)


def _outcome(arg, cls, name, make):
    """(outcome, detail): 'same', 'refused', or 'different' (silent)."""
    if cls == "alias":
        return _alias_outcome(arg, name)
    variant, seen = make(arg.clean)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = arg.run(variant)
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError) as e:
        return REFUSED, f"{type(e).__name__}: {e}"  # (RankFailedError: a RuntimeError)
    if seen is None:
        return "different", "accepted an input that should be refused"
    try:
        if arg.role in ("out", "out_grad"):
            want = arg.run(np.zeros(np.shape(seen), np.float32))
        else:
            want = _clean_result(arg, seen)
    except (ValueError, TypeError, RuntimeError) as e:  # the values themselves are refused
        return "different", f"accepted values the plain call refuses ({e})"
    tol = ROUNDED.get(name) if cls == "dtype" and arg.role in ("in", "t_in", "out",
                                                                "out_grad") else None
    diff = [n for n in want if not (np.array_equal(got[n], want[n]) if tol is None
                                    else _close(got[n], want[n], tol))]
    return (SAME, "") if not diff else ("different", f"results differ: {diff}")


def _alias_outcome(arg, name):
    p = _problem()
    shapes = dict(zip(LORA_GRAD_NAMES, (a.shape for a in p.lora)))
    if arg.role == "out_grad":
        g = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        target = arg.name.split("'")[1]
        if name == "another_grads_out":  # overlapping views of one buffer (aligned)
            other = next(n for n in shapes if n != target)
            so, st = int(np.prod(shapes[other])), int(np.prod(shapes[target]))
            buf = np.zeros(so + st + 16, np.float32)
            g[other] = buf[:so].reshape(shapes[other])
            g[target] = buf[16:16 + st].reshape(shapes[target])
        m = p.wrapper(threads=1)
        if name == "the_registered_lora":
            src = LORA_NAMES[LORA_GRAD_NAMES.index(target)]
            g[target] = getattr(p, "lora")[LORA_NAMES.index(src)]
        m.forward_sft(p.x, p.ids, p.w)
        try:
            m.backward(p.dO, grads_out=g)
        except ValueError as e:
            return REFUSED, f"ValueError: {e}"
        return "different", "accepted overlapping gradient outputs"
    # out aliasing an input: hidden_states for forward's out, grad_output for backward's
    m = p.wrapper(threads=1)
    want = p.run(p.wrapper(threads=1))
    x, dO = p.x.copy(), p.dO.copy()
    try:
        if arg.name == "out":
            o = np.array(m.forward_sft(x, p.ids, p.w, out=x))
            dx, g = m.backward(p.dO)
        else:
            o = np.array(m.forward_sft(p.x, p.ids, p.w))
            dx, g = m.backward(dO, grad_input_out=dO)
    except (ValueError, RuntimeError) as e:
        return REFUSED, f"{type(e).__name__}: {e}"
    got = _results(o, dx, g)
    diff = [n for n in want if not np.array_equal(got[n], want[n])]
    return (SAME, "") if not diff else ("different", f"results differ: {diff}")


def _mentions(detail, arg):
    base = arg.name.split("[")[0]
    key = arg.name.split("'")[1] if "'" in arg.name else base
    return base in detail or key in detail


def judge(dtype, arg, cls, name, make):
    """(verdict, detail): ok; silent (accepted with another result, or
    accepted what must be refused); unnamed (refused, the message does not
    name the argument); refused_valid (refused what must be accepted);
    error (the call failed some other way)."""
    want = expect(arg.role, cls, name, dtype)
    try:
        got, detail = _outcome(arg, cls, name, make)
    except Exception as e:  # noqa: BLE001 - e.g. an accepted input broke a later step
        return "error", f"{type(e).__name__}: {e}"
    if got == "different" or (want == REFUSED and got == SAME):
        return "silent", detail or "accepted"
    if want == SAME and got == REFUSED:
        return "refused_valid", detail
    if got == REFUSED and not _mentions(detail, arg):
        return "unnamed", f"the message does not name {arg.name}: {detail}"
    return "ok", got


@pytest.mark.parametrize("dtype,arg,cls,name,make", CELLS,
                         ids=[f"{c[0]}-{c[1].call}-{c[1].name}-{c[2]}-{c[3]}" for c in CELLS])
def test_cell(dtype, arg, cls, name, make):
    verdict, detail = judge(dtype, arg, cls, name, make)
    assert verdict == "ok", f"{verdict}: {detail}"


VERDICTS = ("ok", "silent", "unnamed", "refused_valid", "error")


def counts():
    """Cells by class and verdict, and by class and outcome (for
    docs/reliability.md)."""
    c = collections.Counter()
    for dtype, arg, cls, name, make in CELLS:
        verdict, detail = judge(dtype, arg, cls, name, make)
        c[(cls, verdict)] += 1
        c[(cls, detail if verdict == "ok" else "")] += 1
    return c


if __name__ == "__main__":
    c = counts()
    print("| class | cells | accepted, same results | refused, argument named | "
          + " | ".join(VERDICTS[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(VERDICTS) - 1))
    for cls in ("layout", "dtype", "value", "size", "alias"):
        n = sum(c[(cls, v)] for v in VERDICTS)
        print(f"| {cls} | {n} | {c[(cls, SAME)]} | {c[(cls, REFUSED)]} | "
              + " | ".join(str(c[(cls, v)]) for v in VERDICTS[1:]) + " |")
    print("| all | " + str(sum(c[(k, v)] for k in ("layout", "dtype", "value", "size", "alias")
                               for v in VERDICTS)) + " | | | "
          + " | ".join(str(sum(c[(k, v)] for k in ("layout", "dtype", "value", "size", "alias")))
                       for v in VERDICTS[1:]) + " |")
