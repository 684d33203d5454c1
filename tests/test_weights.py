"""Weights from disk: Hugging Face checkpoint layouts, shards, fp8, the
expert map, and clear errors."""
import json

import ml_dtypes
import numpy as np
import pytest

import ktsft
from conftest import Problem

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

L = 3  # layer index used in the fake checkpoints


def per_expert(p, dtype=torch.bfloat16, prefix="model.", mixtral=False):
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if mixtral else "mlp"
    t = {}
    for e in range(p.E):
        for n, arr in zip(names, (p.gate_proj, p.up_proj, p.down_proj)):
            t[f"{prefix}layers.{L}.{block}.experts.{e}.{n}.weight"] = torch.from_numpy(arr[e]).to(dtype)
    t[f"{prefix}layers.{L}.mlp.gate.weight"] = torch.zeros(p.E, p.H)  # the router: ignored
    t[f"{prefix}layers.{L + 1}.mlp.experts.0.gate_proj.weight"] = torch.zeros(1)  # other layer
    return t


def fused(p, dtype=torch.bfloat16):
    gu = np.concatenate([p.gate_proj, p.up_proj], axis=1)  # [E, 2I, H], gate first
    return {f"model.layers.{L}.mlp.experts.gate_up_proj": torch.from_numpy(gu).to(dtype),
            f"model.layers.{L}.mlp.experts.down_proj": torch.from_numpy(p.down_proj).to(dtype)}


def from_path(p, path, dtype="bf16", p2l=None, **kw):
    m = ktsft.SFTMoEWrapper(L, p.E, p.k, p.H, p.I, lora_rank=p.r, lora_alpha=p.alpha,
                            dtype=dtype, weight_path=str(path), cpuinfer_threads=2)
    m.load_weights(p2l, **kw)
    m.init_lora_weights(*p.lora)
    return m


@pytest.fixture
def problem():
    p = Problem(T=9, H=40, I=24, E=5, k=2, r=3, seed=21)
    # bf16-exact weights: every on-disk dtype then holds the same values
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(p, n, getattr(p, n).astype(ml_dtypes.bfloat16).astype(np.float32))
    return p


@pytest.mark.parametrize("layout", ["per-expert", "mixtral", "fused"])
def test_layouts_match_arrays(problem, tmp_path, layout):
    p = problem
    want = p.run(p.wrapper(dtype="bf16"))
    tensors = {"per-expert": per_expert(p), "mixtral": per_expert(p, mixtral=True),
               "fused": fused(p)}[layout]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for path in (tmp_path, tmp_path / "model.safetensors"):
        got = p.run(from_path(p, path))
        for n in want:
            assert np.array_equal(got[n], want[n]), (layout, n)


def test_sharded_checkpoint_and_prefix(problem, tmp_path):
    p = problem
    t = per_expert(p, torch.float32, prefix="language_model.model.")
    keys = sorted(t)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    wm = {}
    for fname, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(tmp_path / fname))
        wm.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    got = p.run(from_path(p, tmp_path, dtype="fp32", key_prefix="language_model.model."))
    want = p.run(p.wrapper(dtype="fp32"))
    for n in want:
        assert np.array_equal(got[n], want[n]), n
    with pytest.raises(KeyError, match="layers.3"):
        from_path(p, tmp_path, dtype="fp32")  # default prefix "model." finds nothing


def test_fp8_block_scaled_weights(problem, tmp_path):
    p = problem
    t = {}
    deq = {}
    for e in range(p.E):
        for n in ("gate_proj", "up_proj", "down_proj"):
            w = torch.from_numpy(getattr(p, n)[e])
            out, inp = w.shape
            scale = torch.rand((out + 127) // 128, (inp + 127) // 128) + 0.5
            s_full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
            q = (w / s_full).to(torch.float8_e4m3fn)
            key = f"model.layers.{L}.mlp.experts.{e}.{n}.weight"
            t[key], t[key + "_scale_inv"] = q, scale
            deq.setdefault(n, []).append((q.float() * s_full).numpy())
    save_file(t, str(tmp_path / "model.safetensors"))
    for n in deq:  # the reference: the dequantized weights
        setattr(p, n, np.stack(deq[n]).astype(np.float32))
    got = p.run(from_path(p, tmp_path, dtype="fp32"))
    want = p.run(p.wrapper(dtype="fp32"))
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_physical_map_with_files(problem, tmp_path):
    p = problem
    save_file(per_expert(p), str(tmp_path / "model.safetensors"))
    want = p.run(from_path(p, tmp_path))
    got = p.run(from_path(p, tmp_path, p2l=np.array([2, 0, 4, 1, 3])))
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_shape_mismatch_and_missing_path(problem, tmp_path):
    p = problem
    save_file(per_expert(p), str(tmp_path / "model.safetensors"))
    m = ktsft.SFTMoEWrapper(L, p.E, p.k, p.H + 1, p.I, weight_path=str(tmp_path))
    with pytest.raises(ValueError, match="gate_proj has shape"):
        m.load_weights()
    m = ktsft.SFTMoEWrapper(L, p.E, p.k, p.H, p.I, weight_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        m.load_weights()


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_PEAK_WHILE_LOADING = """
import gc, sys, threading
sys.path.insert(0, {tests!r})
import ktsft
import test_weights as tw
from conftest import Problem
from safetensors.torch import save_file

p = Problem(T=4, H=512, I=256, E=32, k=2, r=2, seed=3)
save_file(tw.fused(p, tw.torch.float32), {path!r})
m = ktsft.SFTMoEWrapper(tw.L, p.E, p.k, p.H, p.I, dtype="bf16", weight_path={root!r})
del p
gc.collect()
before = tw._status_kb("RssAnon")
peak = [before]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], tw._status_kb("RssAnon"))
        done.wait(0.0005)

th = threading.Thread(target=sample)
th.start()
try:
    m.load_weights()
finally:
    done.set()
    th.join()
print("grown", peak[0] - before)
"""


def test_reading_holds_one_expert_of_temporaries(tmp_path):
    """Peak anonymous memory while loading (sampled; mapped file pages are
    page cache, not held memory): the layer's own bf16 storage plus about
    one expert of temporaries, never a second copy of the layer.  Measured
    in a fresh interpreter: in the suite's process, threads other tests
    left behind can allocate during the sampled window."""
    import os

    from conftest import run_python

    tests = os.path.dirname(os.path.abspath(__file__))
    code = _PEAK_WHILE_LOADING.format(tests=tests, path=str(tmp_path / "model.safetensors"),
                                      root=str(tmp_path))
    r = run_python(["-c", code], 120)
    assert r.returncode == 0, r.stdout + r.stderr
    grown = int(r.stdout.split("grown", 1)[1].split()[0])
    E, H, I = 32, 512, 256
    layer_fp32 = 3 * E * H * I * 4
    layer_bf16 = layer_fp32 // 2
    expert_fp32 = layer_fp32 // E
    assert grown < layer_bf16 + 4 * expert_fp32 + (4 << 20), (grown, layer_bf16, expert_fp32)


def _crafted(tmp_path, dtype, edit):
    """A save_weights file of `dtype`, with one tensor replaced by edit()."""
    import safetensors.numpy as stn

    p = Problem(T=4, H=64, I=32, E=3, k=2, r=2, seed=5)
    m = p.wrapper(dtype=dtype)
    path = str(tmp_path / f"layer_{dtype}.safetensors")
    m.save_weights(path)
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    stn.save_file(tensors, path, metadata=meta)
    return p, path


@pytest.mark.parametrize("dtype, name, make, match", [
    ("bf16", "down_proj", lambda a: a[:, :, :-1].copy(), "down_proj is U16 of shape"),
    ("fp32", "gate_proj", lambda a: a[:, :, :-2].copy(), "gate_proj is F32 of shape"),
    ("fp32", "up_proj", lambda a: a.astype(np.float16), "up_proj is F16 of shape"),
    ("int8", "down_proj_scale", lambda a: a[:, :-1].copy(), "down_proj_scale is F32 of shape"),
    ("int8", "gate_proj", lambda a: a.astype(np.int16), "gate_proj is I16"),
    ("int8", "up_proj_scale", None, "no tensor 'up_proj_scale'"),
])
def test_crafted_layer_files_are_refused(tmp_path, dtype, name, make, match):
    """A save_weights file whose tensors do not have this layer's exact
    shapes and dtypes (shape[:2] alone used to be compared: a shorter last
    dimension was read out of bounds) raises naming the file and tensor,
    and the layer keeps no weights."""
    def edit(t):
        if make is None:
            del t[name]
        else:
            t[name] = make(t[name])

    p, path = _crafted(tmp_path, dtype, edit)
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, dtype=dtype, weight_path=path)
    with pytest.raises(ValueError, match=match) as e:
        m.load_weights()
    assert path in str(e.value)
    assert m.stored_weights() is None


def test_layer_file_values_are_checked_finite(tmp_path):
    def edit(t):
        a = t["up_proj"].view(np.uint16).copy()
        a[1, 2, 3] = 0x7FC0  # a bf16 NaN
        t["up_proj"] = a

    p, path = _crafted(tmp_path, "bf16", edit)
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, dtype="bf16", weight_path=path)
    with pytest.raises(ValueError, match="up_proj of expert 1.*non-finite"):
        m.load_weights()


def test_every_experts_shape_and_dtype_are_checked(tmp_path):
    """A checkpoint whose later expert has another shape (only expert 0's
    used to be compared: it was broadcast), or integer weights (cast to
    garbage), raises naming the file, the tensor and the expert."""
    import torch
    from safetensors.torch import save_file as save_torch

    E, H, I = 3, 32, 16
    g = torch.Generator().manual_seed(0)
    t = {}
    for e in range(E):
        for n, s in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(s, generator=g)
    bad = dict(t)
    bad["model.layers.0.mlp.experts.2.up_proj.weight"] = torch.randn(I, 1, generator=g)
    save_torch(bad, str(tmp_path / "model.safetensors"))
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="fp32", weight_path=str(tmp_path))
    with pytest.raises(ValueError, match="up_proj of expert 2 has shape"):
        m.load_weights()
    ints = {k: (v * 100).to(torch.int8) for k, v in t.items()}
    save_torch(ints, str(tmp_path / "model.safetensors"))
    m = ktsft.SFTMoEWrapper(0, E, 2, H, I, dtype="fp32", weight_path=str(tmp_path))
    with pytest.raises(TypeError, match="int8: ktsft reads floating-point weights"):
        m.load_weights()
