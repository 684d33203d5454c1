"""Reading one layer's frozen expert weights from weight_path.

Formats:
- a directory with gate_proj.npy, up_proj.npy, down_proj.npy ([E, I, H],
  [E, I, H], [E, H, I]; memory-mapped);
- a .safetensors file with the keys gate_proj, up_proj, down_proj (same shapes);
- a Hugging Face checkpoint: one .safetensors file, or a directory of shards
  with model.safetensors.index.json; only this layer's tensors are read, one
  expert at a time.  Key layouts (after a prefix, default "model."):
    layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight       (Qwen2/3-MoE, OLMoE, DeepSeek)
    layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight   (Mixtral)
    layers.{L}.mlp.experts.gate_up_proj [E, 2I, H] (gate first) and
    layers.{L}.mlp.experts.down_proj [E, H, I]                  (transformers 5, fused)
  bf16, fp16 and fp32 tensors; DeepSeek-style fp8 e4m3 weights with a
  `weight_scale_inv` of 128x128 blocks are dequantized at load.

Experts in files are in logical order.  `expert_source(...)` returns an
object whose `expert(e)` gives one expert's (gate [I, H], up [I, H],
down [H, I]) as float arrays, so a caller fills its own storage without
holding more than one expert of temporaries.
"""
from __future__ import annotations

import json
import os

import numpy as np

NAMES = ("gate_proj", "up_proj", "down_proj")
FP8_BLOCK = 128


def _unreadable(path, e, what="a safetensors file"):
    """The error for a file that cannot be parsed: its path, what it should
    be, and the parser's words."""
    return ValueError(f"{os.fspath(path)!r}: not a readable {what} (corrupt or truncated?): "
                      f"{type(e).__name__}: {e}")


def open_safetensors(path, framework="numpy"):
    """safe_open, with a parse failure named by the file."""
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(path), framework=framework)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: named by the file
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e) from None


def _safe_open(path):
    """safetensors reader; torch's framework when torch is installed (it
    also reads fp8), else numpy (bf16 through ml_dtypes)."""
    try:
        import torch  # noqa: F401

        return open_safetensors(path, "pt"), "pt"
    except ImportError:
        return open_safetensors(path, "numpy"), "numpy"


def _load_npy(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e, "npy file") from None


def _to_numpy(t, fw):
    if fw == "numpy":
        return np.asarray(t)
    import torch

    if t.dtype in (torch.bfloat16, torch.float16) or "float8" in str(t.dtype):
        return t.float().numpy()
    return t.numpy()


class _Stacked:
    """Stacked [E, ...] arrays: npy memory maps, or the gate_proj / up_proj /
    down_proj tensors of a safetensors file read one expert slice at a time."""

    def __init__(self, arrays=None, path=None):
        self.arrays, self.path = arrays, path
        if path is not None:
            self.f, self.fw = _safe_open(path)

    def shapes(self):
        if self.arrays is not None:
            return {n: tuple(a.shape) for n, a in self.arrays.items()}
        return {n: tuple(self.f.get_slice(n).get_shape()) for n in NAMES}

    def expert(self, e):
        if self.arrays is not None:
            return tuple(np.asarray(self.arrays[n][e]) for n in NAMES)
        return tuple(_to_numpy(self.f.get_slice(n)[e], self.fw) for n in NAMES)


class _Checkpoint:
    """A Hugging Face checkpoint: tensors of one layer, read per expert."""

    def __init__(self, files: dict, layer: int, prefix: str):
        self.files = files          # key -> file path
        self.layer = layer
        self.prefix = prefix
        self.handles = {}
        keys = set(files)
        base = f"{prefix}layers.{layer}."
        per = base + "mlp.experts.{e}.{p}.weight"
        mix = base + "block_sparse_moe.experts.{e}.{p}.weight"
        if per.format(e=0, p="gate_proj") in keys:
            self.kind, self.pattern, self.parts = "per-expert", per, ("gate_proj", "up_proj", "down_proj")
        elif mix.format(e=0, p="w1") in keys:
            self.kind, self.pattern, self.parts = "mixtral", mix, ("w1", "w3", "w2")
        elif base + "mlp.experts.gate_up_proj" in keys:
            self.kind = "fused"
        else:
            near = sorted(k for k in keys if k.startswith(base))[:12]
            raise KeyError(
                f"no routed-expert weights of layer {layer} with prefix {prefix!r}; looked for "
                f"{per.format(e=0, p='gate_proj')!r}, {mix.format(e=0, p='w1')!r} and "
                f"{base + 'mlp.experts.gate_up_proj'!r}; keys of that layer found: "
                f"{near or sorted(keys)[:12]}")
        if self.kind == "fused":
            self.gate_up = base + "mlp.experts.gate_up_proj"
            self.down = base + "mlp.experts.down_proj"
            self.num_experts = self._slice(self.gate_up).get_shape()[0]
        else:
            e = 0
            while self.pattern.format(e=e, p=self.parts[0]) in keys:
                e += 1
            self.num_experts = e

    def _reader(self, key):
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = _safe_open(path)
        return self.handles[path]

    def _slice(self, key):
        f, _ = self._reader(key)
        return f.get_slice(key)

    def _tensor(self, key):
        f, fw = self._reader(key)
        a = _to_numpy(f.get_tensor(key), fw)
        scale_key = key + "_scale_inv"
        if scale_key in self.files:  # fp8 with 128x128 block scales
            s = _to_numpy(self._reader(scale_key)[0].get_tensor(scale_key), self._reader(scale_key)[1])
            a = _dequant_blocks(a, s)
        return a

    def shapes(self):
        if self.kind == "fused":
            E, I2, H = self._slice(self.gate_up).get_shape()
            return {"gate_proj": (E, I2 // 2, H), "up_proj": (E, I2 // 2, H),
                    "down_proj": tuple(self._slice(self.down).get_shape())}
        E = self.num_experts
        return {n: (E, *self._slice(self.pattern.format(e=0, p=p)).get_shape())
                for n, p in zip(NAMES, self.parts)}

    def expert(self, e):
        if self.kind == "fused":
            f, fw = self._reader(self.gate_up)
            gu = _to_numpy(f.get_slice(self.gate_up)[e], fw)
            I = gu.shape[0] // 2
            fd, fwd = self._reader(self.down)
            return gu[:I], gu[I:], _to_numpy(fd.get_slice(self.down)[e], fwd)
        return tuple(self._tensor(self.pattern.format(e=e, p=p)) for p in self.parts)


def _dequant_blocks(w, scale_inv):
    """fp8 weight [out, in] times its per-128x128-block scale, float32.
    Each band of 128 rows is scaled in place by its row of block scales
    broadcast over 128 columns: no full-size scale matrix (np.repeat of the
    scales to [out, in] cost 3x the multiply and a second weight-sized
    buffer)."""
    a = np.array(w, np.float32)  # a fresh float32 copy, scaled in place
    out, inp = a.shape
    s = np.asarray(scale_inv, np.float32)
    nb = -(-inp // FP8_BLOCK)
    full = inp // FP8_BLOCK
    for i in range(0, out, FP8_BLOCK):
        band = a[i:i + FP8_BLOCK]
        row = s[i // FP8_BLOCK, :nb]
        if full:
            band[:, :full * FP8_BLOCK].reshape(band.shape[0], full, FP8_BLOCK)[...] *= \
                row[:full, None]
        if full < nb:  # ragged last block of columns
            band[:, full * FP8_BLOCK:] *= row[full]
    return a


INDEX = "model.safetensors.index.json"


def read_index(index: str) -> dict:
    """key -> shard file of a sharded checkpoint's index, checked: JSON
    with a non-empty 'weight_map' of tensor name -> shard file name, every
    shard a file next to the index.  Raises ValueError / FileNotFoundError
    naming the index and what is wrong."""
    what = f"{index!r}: expected a safetensors index, a JSON object with a 'weight_map' of " \
           "tensor name -> shard file"
    try:
        with open(index, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}; it is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}; it is not valid JSON ({e.msg}, line {e.lineno} column "
                         f"{e.colno}: truncated or corrupt?)") from None
    if not isinstance(doc, dict) or "weight_map" not in doc:
        got = f"keys {sorted(doc)[:8]}" if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{what}; found {got}")
    wm = doc["weight_map"]
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{what}; its weight_map is "
                         f"{'empty' if isinstance(wm, dict) else type(wm).__name__}")
    bad = [(k, v) for k, v in wm.items() if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{what}; {bad[0][0]!r} maps to {bad[0][1]!r}, not a file name"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    where = os.path.dirname(index)
    files = {k: os.path.join(where, v) for k, v in wm.items()}
    for f in sorted(set(files.values())):
        if not os.path.isfile(f):
            n = sum(v == f for v in files.values())
            raise FileNotFoundError(f"{index!r} names the shard {os.path.relpath(f, where)!r} "
                                    f"(for {n} tensors), which is not a file in {where!r}: "
                                    "an incomplete download?")
    return files


def _checkpoint_files(path: str) -> dict:
    """key -> file for a safetensors file or a sharded checkpoint directory."""
    if os.path.isfile(path):
        f, _ = _safe_open(path)
        return {k: path for k in f.keys()}
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        return read_index(index)
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return _checkpoint_files(single)
    raise FileNotFoundError(f"weight_path {path!r}: no gate_proj.npy/up_proj.npy/down_proj.npy, "
                            f"model.safetensors or {INDEX}; found "
                            f"{sorted(os.listdir(path))[:20]}")


def expert_source(weight_path, layer_idx: int = 0, key_prefix: str | None = None):
    """An object with .shapes() and .expert(e) for the given weight_path."""
    if weight_path is None:
        raise ValueError("load_weights: no arrays given and weight_path is None")
    path = os.fspath(weight_path)
    if os.path.isdir(path) and all(os.path.isfile(os.path.join(path, n + ".npy")) for n in NAMES):
        return _Stacked(arrays={n: _load_npy(os.path.join(path, n + ".npy")) for n in NAMES})
    if not os.path.exists(path):
        raise FileNotFoundError(f"weight_path {path!r} does not exist")
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise FileNotFoundError(f"weight_path {path!r} is neither a directory nor a .safetensors file")
    files = _checkpoint_files(path)
    if all(n in files for n in NAMES):  # ktsft's own single-layer file
        return _Stacked(path=path)
    return _Checkpoint(files, layer_idx, "model." if key_prefix is None else key_prefix)


def check_source_shapes(src, want: dict, weight_path, where: str = "",
                        sizes: str = "num_experts, hidden_size, moe_intermediate_size") -> None:
    """Raise unless an expert source's gate/up/down arrays have the shapes
    `want` ({name: (E, out, in)}) that the layer being loaded needs."""
    got = src.shapes()
    for n in NAMES:
        if tuple(got[n]) != want[n]:
            raise ValueError(f"weight_path {weight_path!r}: {where}{n} has shape {tuple(got[n])}, "
                             f"this layer needs {want[n]} ({sizes})")


def check_expert(ws, want: dict, weight_path, e: int, where: str = "") -> tuple:
    """One expert's (gate, up, down) as read from a source, checked: each of
    the layer's [out, in] shape (a checkpoint's later experts are not
    trusted to match its first), floating point (an integer or bool tensor,
    e.g. a bitsandbytes int8 checkpoint, would be cast to garbage), and
    finite.  Returns them as numpy arrays."""
    from . import validation as V

    out = []
    for n, w in zip(NAMES, ws):
        a = np.asarray(w)
        what = f"weight_path {weight_path!r}: {where}{n} of expert {e}"
        if a.dtype.kind in "iub":
            raise TypeError(f"{what} is {a.dtype}: ktsft reads floating-point weights (bf16, fp16, "
                            "fp32, fp8 with its scales); dequantize an integer-quantized checkpoint "
                            "first, or load the float one with dtype='int8'/'int4'")
        if tuple(a.shape) != tuple(want[n][1:]):
            raise ValueError(f"{what} has shape {tuple(a.shape)}, this layer needs "
                             f"{tuple(want[n][1:])}")
        V.check_finite(a, what)
        out.append(a)
    return tuple(out)


KTSFT_FORMAT = "ktsft-layer-v1"


def save_layer(path, arrays, scales, dtype: str, group: int, slot) -> None:
    """Write a layer's stored base weights (logical expert order) as one
    safetensors file that expert_source() reads back without converting:
    quantized layers are reloaded as they are, never quantized twice.
    The file is written next to `path` and renamed into place."""
    order = np.asarray(slot)  # slot[logical] = physical: logical order = arrays[slot]
    tensors = {}
    for n, a in zip(NAMES, arrays):
        a = np.ascontiguousarray(a[order])
        tensors[n] = a.view(np.uint16) if a.dtype.name == "bfloat16" else a
    if scales is not None:
        for n, sc in zip(NAMES, scales):
            tensors[n + "_scale"] = np.ascontiguousarray(sc[order])
    meta = {"format": KTSFT_FORMAT, "dtype": dtype, "quant_group": str(group)}
    from .adapters import save_safetensors, write_file_atomically

    path = os.fspath(path)
    write_file_atomically(path, lambda tmp: save_safetensors(tensors, tmp, path, meta))


class _KtsftLayer:
    """A file written by save_layer: stored arrays, read one expert at a time."""

    def __init__(self, path, meta):
        self.f = open_safetensors(path)
        self.dtype = meta["dtype"]
        self.group = int(meta.get("quant_group", "0"))

    def stored_shapes(self):
        return {n: tuple(self.f.get_slice(n).get_shape()) for n in NAMES}

    def stored_layout(self):
        """{name: (shape, safetensors dtype)} of every tensor in the file."""
        return {n: (tuple(self.f.get_slice(n).get_shape()), self.f.get_slice(n).get_dtype())
                for n in self.f.keys()}

    def stored_expert(self, e):
        """(arrays, scales or None) of logical expert e, as stored."""
        import ml_dtypes

        arrs = []
        for n in NAMES:
            a = self.f.get_slice(n)[e]
            arrs.append(a.view(ml_dtypes.bfloat16) if self.dtype == "bf16" else a)
        scales = None
        if self.dtype in ("int8", "int4"):
            scales = [self.f.get_slice(n + "_scale")[e] for n in NAMES]
        return arrs, scales


def ktsft_layer(path):
    """The save_layer file at `path`, or None if it is not one."""
    if path is None:
        return None
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return None
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    return _KtsftLayer(path, meta) if meta.get("format") == KTSFT_FORMAT else None
