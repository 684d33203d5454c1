"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors).

Two layouts:

* per-expert ("2D"), written by :func:`save_adapter`: one LoRA per expert
  projection, as PEFT saves LoRA on ``nn.Linear`` experts (transformers 4.x
  ModuleList experts; PEFT >= 0.18 converts it when loading into a
  transformers-5 fused model)::

      base_model.model.{module}.lora_A.weight   [r, in]
      base_model.model.{module}.lora_B.weight   [out, r]

  where module is, by default, ``model.layers.{layer}.mlp.experts.{expert}.{proj}``
  and proj is gate_proj / up_proj / down_proj (Mixtral: pass
  ``proj_names=("w1", "w3", "w2")`` and ``block="block_sparse_moe"``).

* fused-expert ("3D", PEFT ``target_parameters``), written by
  :func:`export_peft_fused`: LoRA on the stacked parameters
  ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] of
  transformers-5 MoE models (PEFT's ``lora.ParamWrapper``)::

      base_model.model.{experts}.base_layer.lora_A.weight  [E*2r, H]   gate_up_proj (inner wrapper)
      base_model.model.{experts}.base_layer.lora_B.weight  [2I, 2r*E]
      base_model.model.{experts}.lora_A.weight             [E*r, I]    down_proj (outer wrapper)
      base_model.model.{experts}.lora_B.weight             [H, r*E]

  A is expert-major (row e*rank + j), B is rank-major (column j*E + e): PEFT
  reads A as ``reshape(E, rank, in)`` and B as ``reshape(out, rank, E)``.
  Gate and up become one rank-2r adapter whose B is block-diagonal per expert
  (A = [A_gate; A_up], B = [[B_gate, 0], [0, B_up]]), which is exactly
  gate/up LoRA side by side; its alpha is 2*alpha (sqrt(2)*alpha with rsLoRA)
  so that its scaling equals the rank-r one.  Down stays rank r.

Writes are atomic: the files are written and fsynced in a temporary
directory next to the target, then renamed into place (see
:func:`_commit`), with the modes open() and mkdir() would have given them
(0o666 / 0o777 less the umask, or the replaced entry's mode), not the 0600 /
0700 of the temporary files.  :func:`load_adapter` reads either layout back and checks
dtypes, shapes, rank and (optionally) scaling against the layer, listing
every mismatch.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile

import numpy as np

PROJS = ("gate", "up", "down")
NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


# ---------------------------------------------------------------------------
# atomic directory writes
# ---------------------------------------------------------------------------
def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 with
    RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _commit(tmp: str, path: str) -> None:
    """Move the finished adapter directory `tmp` to `path`.

    - `path` absent (or an empty directory): one rename; atomic.
    - `path` an adapter directory holding nothing but adapter_config.json and
      adapter_model.safetensors: the two directories are exchanged in one
      atomic step (Linux); `tmp` then holds the old adapter and is removed.
    - otherwise (other files live in `path`, or no atomic exchange): each file
      is renamed over its old version, weights first and config last; each
      rename is atomic, and everything slow (writing, fsync) happened before
      the first one.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.replace(tmp, path)
        _fsync_path(parent)
        return
    except OSError:
        if not os.path.isdir(path):
            raise
    if set(os.listdir(path)) <= {CONFIG, WEIGHTS} and _exchange(tmp, path):
        _fsync_path(parent)
        return
    for name in (WEIGHTS, CONFIG):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    _fsync_path(path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it
    (/proc/self/status); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _set_mode_like_open(tmp: str, target: str, directory: bool = False) -> None:
    """Give `tmp` (made by mkdtemp: 0700, or mkstemp or a library writing
    through one: 0600) the mode open() / mkdir() would have given `target`:
    the mode of `target` where it exists already (it is about to be
    replaced), else 0o666 (files) or 0o777 (directories) less the umask.
    Called before the rename, so the file is never visible with a mode
    colleagues on a shared machine cannot read."""
    try:
        st = os.stat(target)
        if stat.S_ISDIR(st.st_mode) == directory:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            return
    except OSError:
        pass
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())


def _write_failed(target: str, e: BaseException) -> OSError:
    """An I/O failure while writing `target`, as an OSError that names it
    (safetensors raises its own SafetensorError, and a failed write() of a
    full disk names no file)."""
    m = re.search(r"os error (\d+)", str(e))
    code = getattr(e, "errno", None) or (int(m.group(1)) if m else None)
    why = os.strerror(code) if code else str(e)
    err = OSError(code, f"{target}: cannot write it ({why}; the disk full, a file-size "
                        "limit, or no permission?)")
    err.filename = target
    return err


def save_safetensors(tensors: dict, tmp: str, target: str, metadata: dict | None = None,
                     save_file=None) -> None:
    """save_file(tensors, tmp) (default safetensors.numpy's; torch tensors:
    safetensors.torch's), its failures an OSError naming `target` (the file
    being written through `tmp`)."""
    if save_file is None:
        from safetensors.numpy import save_file
    try:
        save_file(tensors, tmp, metadata=metadata)
    except OSError as e:
        raise _write_failed(target, e) from None
    except Exception as e:  # noqa: BLE001 - SafetensorError (no public class to name)
        if "I/O error" not in str(e) and "os error" not in str(e):
            raise
        raise _write_failed(target, e) from None


def write_file_atomically(target, write) -> str:
    """Write the file `target` by write(tmp), into a temporary file next to
    it; given open()'s mode, fsynced and renamed over `target`: never a
    partial file there, whatever fails (the temporary is removed).  Every
    failure is an OSError naming `target`.  Returns target's real path."""
    target = os.path.realpath(os.fspath(target))
    if os.path.isdir(target):
        raise IsADirectoryError(f"{target}: is a directory; give a file name")
    parent = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    except OSError as e:
        err = type(e)(e.errno, f"{target}: cannot create a file in {parent!r} ({e.strerror})")
        err.filename = target
        raise err from None
    os.close(fd)
    try:
        try:
            write(tmp)
            _set_mode_like_open(tmp, target)  # mkstemp / safetensors create 0600
            _fsync_path(tmp)
        except OSError as e:
            if e.filename == target:
                raise
            raise _write_failed(target, e) from None
        os.replace(tmp, target)
        _fsync_path(parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return target


def _write_adapter(path, tensors: dict, config: dict, metadata: dict | None = None) -> None:
    """Write an adapter directory atomically: never a partial file or a
    half-updated directory at `path`, whatever fails mid-save.  `metadata`
    (str -> str) goes into the safetensors header next to format=pt: PEFT,
    vLLM and SGLang ignore it (ktsft keeps training-only values there)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path) or \
            os.fspath(path) in (".", os.curdir):
        raise ValueError(f"path: an adapter directory to write, got {path!r} (an empty path or "
                         "'.' would write into, and could replace, the current directory)")
    path = os.path.realpath(os.fspath(path))  # a symlinked adapter directory: write where it points
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: exists and is not a directory (an adapter is a directory)")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    try:
        wpath = os.path.join(tmp, WEIGHTS)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["format"] = "pt"
        save_safetensors(tensors, wpath, os.path.join(path, WEIGHTS), meta)
        _fsync_path(wpath)
        cpath = os.path.join(tmp, CONFIG)
        try:
            with open(cpath, "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _write_failed(os.path.join(path, CONFIG), e) from None
        for name in (WEIGHTS, CONFIG):  # safetensors writes 0600, mkdtemp makes 0700
            _set_mode_like_open(os.path.join(tmp, name), os.path.join(path, name))
        _set_mode_like_open(tmp, path, directory=True)
        _fsync_path(tmp)
        _commit(tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
from .schema import scaling as _scaling  # noqa: E402 - one definition


def _dims_of(layers: dict, r: int):
    """(E, H, I) of every layer's six matrices as numpy float32, checked
    against each other and r; ValueError lists every mismatch."""
    from ._arrays import as_numpy

    out, problems, dims = {}, [], None
    for layer, mats in layers.items():
        missing = [n for n in NAMES if n not in mats]
        if missing:
            raise KeyError(f"layer {layer}: missing LoRA matrices {missing} (need {list(NAMES)})")
        arr = {n: np.asarray(as_numpy(mats[n], n), np.float32) for n in NAMES}
        bad = [f"{n} has {a.ndim} dims" for n, a in arr.items() if a.ndim != 3]
        if bad:
            raise ValueError(f"layer {layer}: LoRA matrices must be [E, r, in] / [E, out, r]: "
                             + "; ".join(bad))
        E, _, H = arr["gate_lora_a"].shape
        I = arr["gate_lora_b"].shape[1]
        want = {"gate_lora_a": (E, r, H), "gate_lora_b": (E, I, r), "up_lora_a": (E, r, H),
                "up_lora_b": (E, I, r), "down_lora_a": (E, r, I), "down_lora_b": (E, H, r)}
        for n in NAMES:
            if arr[n].shape != want[n]:
                problems.append(f"layer {layer} {n}: shape {list(arr[n].shape)}, expected "
                                f"{list(want[n])} (E={E}, r={r}, H={H}, I={I})")
        if dims is None:
            dims = (E, H, I)
        elif dims != (E, H, I):
            problems.append(f"layer {layer}: (E, H, I) = {(E, H, I)} differs from {dims}")
        out[layer] = arr
    if problems:
        raise ValueError("LoRA matrices do not match: " + "; ".join(problems))
    return out


def _check_dtype(problems, key, t):
    if t.dtype.name not in _FLOAT_DTYPES:
        problems.append(f"{key}: dtype {t.dtype.name}, expected a float type ({', '.join(_FLOAT_DTYPES)})")
        return False
    return True


def _pattern_hits(patterns, names):
    """The (pattern, name) pairs where PEFT's rank/alpha_pattern matching
    (peft.utils.other.get_pattern_key) would apply `pattern` to `name`."""
    return [(p, n) for p in (patterns or {}) for n in names if re.match(rf"(.*\.)?({p})$", n)]


def _check_expect(problems, where, *, r_file, scaling_file, H, I, r, scaling, hidden_size,
                  intermediate_size):
    if r is not None and int(r) != r_file:
        problems.append(f"{where}: rank r={r_file}, the layer has r={int(r)}")
    if hidden_size is not None and H is not None and int(hidden_size) != H:
        problems.append(f"{where}: hidden_size {H}, the layer has {int(hidden_size)}")
    if intermediate_size is not None and I is not None and int(intermediate_size) != I:
        problems.append(f"{where}: moe_intermediate_size {I}, the layer has {int(intermediate_size)}")
    if scaling is not None and not math.isclose(float(scaling), scaling_file, rel_tol=1e-6):
        problems.append(f"{where}: LoRA scaling {scaling_file:g} (lora_alpha/r or lora_alpha/sqrt(r) "
                        f"with use_rslora), the layer scales by {float(scaling):g}")


def _raise(problems, path, layer):
    if problems:
        raise ValueError(f"{path}: adapter does not match layer {layer}:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------
# config fields every reader accepts
# ---------------------------------------------------------------------------
#: safetensors metadata keys (PEFT, vLLM and SGLang ignore the header's metadata)
META_DROPOUT = "ktsft.lora_dropout"    # the lora_dropout the adapter was trained with
META_RSLORA = "ktsft.use_rslora"       # "true": trained with rsLoRA (alpha / sqrt(r))
META_ALPHA = "ktsft.lora_alpha"        # the rsLoRA alpha, before folding into lora_alpha


def _portable_hyper(r, lora_alpha, use_rslora, lora_dropout):
    """(adapter_config fields, safetensors metadata) of a per-expert adapter.

    lora_dropout is written as 0.0 (training-only: the adapter's function
    does not depend on it, and PEFT's ParamWrapper -- what PEFT turns a
    per-expert adapter into on transformers-5 fused experts -- refuses any
    other value); the value trained with goes into the metadata.

    rsLoRA (alpha / sqrt(r)) is written as plain LoRA with lora_alpha =
    alpha * sqrt(r), the same scaling: PEFT's per-expert -> fused conversion
    doubles alpha with the rank (exact for alpha / r only), and vLLM and
    SGLang read alpha / r too.  ktsft scales rsLoRA by exactly this
    (alpha * sqrt(r)) / r, so the written scaling is bitwise ktsft's."""
    from .validation import check_dropout

    p = check_dropout(lora_dropout, "lora_dropout")
    r, alpha = int(r), float(lora_alpha)
    meta = {META_DROPOUT: repr(p)}
    if use_rslora:
        meta[META_RSLORA], meta[META_ALPHA] = "true", repr(alpha)
        alpha = alpha * math.sqrt(r)
    return {"r": r, "lora_alpha": alpha, "use_rslora": False, "lora_dropout": 0.0}, meta


def _base_config(base_model_name_or_path):
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path, "revision": None,
            "modules_to_save": None}


def _targeted(config, name, layer) -> bool:
    """Whether PEFT would put a LoRA on module `name` (no base_model.model.
    prefix) of layer `layer` under `config` (peft.tuners.tuners_utils.
    check_target_module_exists: exclude_modules, target_modules as a list
    or a regex, layers_to_transform)."""
    def hit(spec):
        if not spec:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in spec)

    if hit(config.get("exclude_modules")):
        return False
    tm = config.get("target_modules")
    if not hit(tm):
        return False
    ltt = config.get("layers_to_transform")
    if isinstance(tm, str) or ltt is None or ltt == []:
        return True
    return int(layer) in ([ltt] if isinstance(ltt, int) else [int(x) for x in ltt])


def _init_a(shape, seed) -> np.ndarray:
    """PEFT's init of a new LoRA A (kaiming_uniform(a=sqrt(5)): uniform in
    +-1/sqrt(in_features)), seeded, for projections an adapter lacks."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(shape[-1])
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _absent(proj, E, r, H, I, layer):
    """LoRA matrices of a projection an adapter does not target: B = 0 (the
    projection computes its base weights), A initialised as PEFT would, so
    it can still train."""
    fan_in, out = (I, H) if proj == "down" else (H, I)
    return {f"{proj}_lora_a": _init_a((E, r, fan_in), (0x6b74, int(layer), PROJS.index(proj))),
            f"{proj}_lora_b": np.zeros((E, out, r), np.float32)}


# ---------------------------------------------------------------------------
# per-expert ("2D") layout
# ---------------------------------------------------------------------------
_KNOWN_PROJ_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _module(layer, expert, proj, block, proj_names, model_prefix):
    name = proj_names[PROJS.index(proj)]
    return f"{model_prefix}layers.{layer}.{block}.experts.{expert}.{name}"


def _experts_module(layer, block, model_prefix):
    return f"{model_prefix}layers.{layer}.{block}.experts"


def _per_expert_tensors(arrs, experts_path, proj_names, dtype, expert_offset=0):
    """{key: [r, in] / [out, r]} of the per-expert layout; experts_path(layer)
    is the experts module's name (no base_model.model. prefix)."""
    tensors = {}
    for layer, mats in arrs.items():
        off = expert_offset.get(layer, 0) if isinstance(expert_offset, dict) else expert_offset
        off = int(off)
        if off < 0:
            raise ValueError(f"expert_offset: {off} for layer {layer} is negative")
        mod = experts_path(layer)
        for proj in PROJS:
            name = proj_names[PROJS.index(proj)]
            A, B = mats[f"{proj}_lora_a"], mats[f"{proj}_lora_b"]
            for e in range(A.shape[0]):
                key = f"base_model.model.{mod}.{off + e}.{name}"
                tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(A[e], dtype)
                tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(B[e], dtype)
    return tensors


def save_adapter(path, layers: dict, r: int, lora_alpha: float, use_rslora: bool = False,
                 base_model_name_or_path: str | None = None, block: str = "mlp",
                 proj_names=("gate_proj", "up_proj", "down_proj"), model_prefix: str = "model.",
                 dtype=np.float32, lora_dropout: float = 0.0, expert_offset=0,
                 extra_config: dict | None = None) -> None:
    """Write `layers` = {layer_idx: {"gate_lora_a": [E, r, H], ...}} (the six
    LoRA matrices, numpy or torch) as a per-expert PEFT adapter directory,
    atomically (a failure mid-save leaves `path` as it was).

    The config is one PEFT (nn.Linear experts, and its conversion to
    transformers-5 fused experts of Qwen3-MoE / OLMoE / Mixtral / ...),
    vLLM and SGLang all read: lora_dropout is written as 0.0 and the
    training value kept in the safetensors metadata (``ktsft.lora_dropout``);
    use_rslora=True is written as plain LoRA with lora_alpha = alpha *
    sqrt(r), the same scaling (metadata ``ktsft.use_rslora``,
    ``ktsft.lora_alpha``).  Not for transformers-5 Qwen2-MoE with PEFT:
    PEFT converts no per-expert adapter for it (see
    ktsft.integrations.transformers.export_adapter, which checks).

    ``expert_offset`` (an int, or {layer_idx: int}) numbers the experts from
    that global id: an expert-parallel rank writes its slice of the layer
    (ktsft.distributed).  ``extra_config`` entries are added to the config."""
    r = int(r)
    arrs = _dims_of(layers, r)
    hyper, meta = _portable_hyper(r, lora_alpha, use_rslora, lora_dropout)
    tensors = _per_expert_tensors(arrs, lambda L: _experts_module(L, block, model_prefix),
                                  proj_names, dtype, expert_offset)
    config = _base_config(base_model_name_or_path)
    config.update(hyper)
    config.update({"target_modules": list(proj_names),
                   "layers_to_transform": sorted(int(x) for x in layers),
                   "layers_pattern": "layers"})
    config.update(extra_config or {})
    _write_adapter(path, tensors, config, meta)


def model_layers(model) -> tuple[dict, int, float, bool]:
    """(layers, r, lora_alpha, use_rslora) of every ktsft.torch.LoRAExperts in
    `model` (e.g. after ktsft.integrations.transformers.apply_lora_experts),
    keyed by layer index: the arguments of save_adapter / export_peft_fused.
    lora_dropout is not part of the tuple: pass it to those functions
    (``lora_dropout=module.lora_dropout``) to record it in the metadata.
    ktsft.integrations.transformers.export_adapter does all of this.  (Any
    module with an ``adapter_layer()`` counts: this module imports no
    front end.)"""
    mods = [m for m in model.modules() if callable(getattr(m, "adapter_layer", None))]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no ktsft LoRAExperts module")
    got = [m.adapter_layer() for m in mods]
    hyper = {(r, alpha, rslora) for _, _, r, alpha, rslora, _ in got}
    if len(hyper) > 1:
        raise ValueError(f"LoRAExperts modules differ in (r, alpha, use_rslora): {sorted(hyper)}; "
                         "one adapter config holds one")
    layers = {}
    for L, mats, *_ in got:
        if L in layers:
            raise ValueError(f"two LoRAExperts modules have layer_idx {L}")
        layers[L] = mats
    r, alpha, rslora = hyper.pop()
    return dict(sorted(layers.items())), r, alpha, rslora


class AdapterIO:
    """``save_adapter`` / ``export_peft_fused`` / ``load_adapter`` of one
    layer: the one implementation the front ends share (SFTMoEWrapper,
    ktsft.torch.LoRAExperts, the expert-parallel layer).  A front end
    provides

    - ``adapter_layer()`` -> (layer_idx, {name: matrix} in LORA_NAMES order,
      r, lora_alpha, use_rslora, lora_dropout): what is written;
    - ``_adapter_expect()`` -> (layer_idx, keyword arguments of
      load_adapter describing the layer: num_experts, hidden_size,
      intermediate_size, r, scaling, and experts where it holds a subset);
    - ``_adapter_store(mats)``: the loaded float32 matrices, written in place
      (validated whole before anything is written).
    """

    def save_adapter(self, path, **kw) -> None:
        """This layer's LoRA as a per-expert PEFT adapter directory (its
        lora_dropout goes into the safetensors metadata; rsLoRA is written
        as plain LoRA of the same scaling).  For a whole model:
        ktsft.integrations.transformers.export_adapter."""
        L, mats, r, alpha, rslora, p = self.adapter_layer()
        kw.setdefault("lora_dropout", p)
        save_adapter(path, {L: mats}, r, alpha, use_rslora=rslora, **kw)

    def export_peft_fused(self, path, **kw) -> None:
        """This layer's LoRA in PEFT's fused-expert (target_parameters)
        layout (lora_dropout 0.0 in the config, its value in the metadata)."""
        L, mats, r, alpha, rslora, p = self.adapter_layer()
        kw.setdefault("lora_dropout", p)
        export_peft_fused(path, {L: mats}, r, alpha, use_rslora=rslora, **kw)

    def load_adapter(self, path, **kw) -> dict:
        """Read this layer's LoRA from a PEFT adapter directory (either
        layout) into the layer, in place; returns the adapter's config.  The
        layer's own lora_dropout is kept (a training choice, not part of
        the weights); the adapter's is config["lora_dropout"].  Projections
        the adapter does not target get B = 0 (see load_adapter)."""
        from .validation import check_finite

        L, expect = self._adapter_expect()
        config, mats = load_adapter(path, L, **expect, **kw)
        for n, a in mats.items():  # all checked before anything is written
            check_finite(a, f"adapter {os.fspath(path)!r}: {n} of layer {L}")
        self._adapter_store(mats)
        return config


def _read(path):
    config, tensors, _ = _read_all(path)
    return config, tensors


def _check_config_types(config: dict, cpath: str) -> None:
    """The adapter_config.json fields ktsft reads, of the types PEFT writes."""
    def bad(key, want):
        raise ValueError(f"{cpath!r}: {key} must be {want}, got {config[key]!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if "r" in config and not (is_int(config["r"]) and config["r"] > 0):
        bad("r", "a positive integer")
    for key in ("lora_alpha", "lora_dropout"):
        v = config.get(key)
        if key in config and v is not None and (isinstance(v, bool) or
                                                not isinstance(v, (int, float))):
            bad(key, "a number")
    for key in ("target_modules", "target_parameters", "exclude_modules"):
        v = config.get(key)
        if v is not None and not (isinstance(v, str) or (
                isinstance(v, list) and all(isinstance(x, str) for x in v))):
            bad(key, "a string or a list of strings")
    v = config.get("layers_to_transform")
    if v is not None and not (is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))):
        bad("layers_to_transform", "an integer or a list of integers")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            bad(key, "an object")


def _read_all(path):
    """(config, tensors, safetensors metadata) of an adapter directory."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = os.fspath(path)
    cpath, wpath = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path}: not a PEFT adapter directory (no {os.path.basename(p)})")
    try:
        with open(cpath) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cpath!r}: not a readable adapter_config.json: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cpath!r}: adapter_config.json must hold a JSON object, got "
                         f"{type(config).__name__}")
    _check_config_types(config, cpath)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}, only LORA adapters are read")
    for k in ("use_dora", "lora_bias"):
        if config.get(k):
            raise ValueError(f"{path}: {k}=true is not plain LoRA; ktsft cannot represent it")
    try:
        with safe_open(wpath, framework="numpy") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(wpath)
    except Exception as e:  # noqa: BLE001 - safetensors' parse errors: named by the file
        raise ValueError(f"{wpath!r}: not a readable safetensors file (corrupt or truncated?): "
                         f"{type(e).__name__}: {e}") from None
    return config, tensors, meta


def _proj_names(given, config, tensors, prefix):
    """The (gate, up, down) module names of a per-expert adapter: given, or
    the known triple (gate_proj/up_proj/down_proj, w1/w3/w2) its keys and
    target_modules use, or a 3-name target_modules list as it is."""
    if given:
        given = tuple(given)
        if len(given) != 3:
            raise ValueError(f"proj_names {given}: need (gate, up, down)")
        return given
    tm = config.get("target_modules")
    tm = [] if tm is None or isinstance(tm, str) else list(tm)
    cands = list(_KNOWN_PROJ_NAMES)
    if len(tm) == 3 and tuple(tm) not in cands and not set(tm) & {n for c in cands for n in c}:
        cands.insert(0, tuple(tm))
    pat = re.compile(re.escape(prefix) + r"\d+\.([^.]+)\.lora_[AB]\.weight$")
    present = {m.group(1) for k in tensors for m in [pat.match(k)] if m}
    return max(cands, key=lambda c: (len(present & set(c)), len(set(tm) & set(c))))


def load_adapter(path, layer: int, num_experts: int, block: str = "mlp", proj_names=None,
                 model_prefix: str = "model.", *, hidden_size: int | None = None,
                 intermediate_size: int | None = None, r: int | None = None,
                 scaling: float | None = None, experts=None) -> tuple[dict, dict]:
    """(config, {"gate_lora_a": [E, r, H] float32, ...}) for one layer of a
    PEFT adapter directory, per-expert or fused (export_peft_fused) layout.

    ``experts`` (global expert ids in [0, num_experts)) reads only those
    experts, stacked in that order; the adapter may then hold just them (an
    expert-parallel shard, ktsft.distributed) or the whole layer.

    Adapters on a subset of the projections load (PEFT with
    ``target_modules=["down_proj"]``, ``target_parameters=[...down_proj]``,
    or gate/up only): a projection the config does not target gets B = 0
    (it computes its base weights, as in PEFT) and a PEFT-style random A
    (seeded), so it can still train.  A projection the config targets but
    the file lacks is an error.

    Checks the tensors' dtypes (float), shapes (lora_A [r, in], lora_B
    [out, r], consistent over experts and projections), the expert count and,
    where given, hidden_size, intermediate_size, r and the LoRA scaling
    against the layer; every mismatch is listed in one ValueError.  Missing
    tensors raise KeyError naming them.  The returned config is the file's,
    except lora_dropout: the training value where ktsft recorded it in the
    metadata (the file says 0.0, see save_adapter)."""
    sel = _expert_selection(experts, num_experts)
    config, tensors, meta = _read_all(path)
    if META_DROPOUT in meta:
        config["lora_dropout"] = float(meta[META_DROPOUT])
    expect = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, r=r, scaling=scaling)
    mod = _experts_module(layer, block, model_prefix)
    pre = f"base_model.model.{mod}."
    if config.get("target_parameters") and (f"{pre}lora_A.weight" in tensors
                                            or f"{pre}base_layer.lora_A.weight" in tensors):
        mats = _load_fused(path, config, tensors, layer, num_experts, mod, **expect)
        if experts is not None:
            mats = {n: np.ascontiguousarray(a[sel]) for n, a in mats.items()}
        return config, mats

    proj_names = _proj_names(proj_names, config, tensors, pre)
    r_file = int(config.get("r", 0))
    alpha = float(config.get("lora_alpha", r_file))
    rslora = bool(config.get("use_rslora", False))
    problems = []
    if r_file <= 0:
        problems.append(f"config r={config.get('r')!r} is not a positive rank")
    names = [_module(layer, e, p, block, proj_names, model_prefix) for e in sel for p in PROJS]
    for what in ("rank_pattern", "alpha_pattern"):
        hits = _pattern_hits(config.get(what), names)
        if hits:
            problems.append(f"{what} {hits[0][0]!r} gives {hits[0][1]} its own rank/alpha; ktsft "
                            "has one rank and one scaling per layer")
    _raise(problems, path, layer)

    pat = re.compile(re.escape(pre) + r"(\d+)\.(" + "|".join(map(re.escape, proj_names))
                     + r")\.lora_[AB]\.weight$")
    present = [k for k in tensors if pat.match(k)]
    extra = sorted({int(pat.match(k).group(1)) for k in present} - set(range(num_experts)))
    in_file = {pat.match(k).group(2) for k in present}
    # projections the file lacks and the config does not target: zero LoRA
    absent = [p for p in PROJS if proj_names[PROJS.index(p)] not in in_file and in_file
              and not _targeted(config, _module(layer, 0, p, block, proj_names, model_prefix), layer)]
    loaded = [p for p in PROJS if p not in absent]
    keys = {(proj, ab, e): (f"base_model.model.{_module(layer, e, proj, block, proj_names, model_prefix)}"
                            f".lora_{ab}.weight")
            for proj in loaded for ab in ("A", "B") for e in sel}
    missing = [k for k in keys.values() if k not in tensors]
    if missing:
        near = sorted(k for k in tensors if f"layers.{layer}." in k)[:6]
        have = sorted({int(pat.match(k).group(1)) for k in present})
        raise KeyError(f"{path}: adapter has no {missing[0]!r}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                       + (f"; it has experts {have[0]}..{have[-1]} of layer {layer}, the layer has "
                          f"{num_experts}" if have else f"; keys of layer {layer}: "
                          f"{near or sorted(tensors)[:6]}"))
    out = {}
    dims = {}  # (proj, "in"/"out") -> size seen at the first expert
    for proj in loaded:
        for ab in ("A", "B"):
            mats = []
            for e in sel:
                key = keys[(proj, ab, e)]
                t = tensors[key]
                if not _check_dtype(problems, key, t):
                    continue
                if t.ndim != 2:
                    problems.append(f"{key}: {t.ndim} dims, expected 2")
                    continue
                rank = t.shape[0] if ab == "A" else t.shape[1]
                feat = t.shape[1] if ab == "A" else t.shape[0]
                side = "in" if ab == "A" else "out"
                if rank != r_file:
                    problems.append(f"{key}: shape {list(t.shape)} has rank {rank}, config r={r_file}")
                    continue
                ref = dims.setdefault((proj, side), feat)
                if feat != ref:
                    problems.append(f"{key}: shape {list(t.shape)}, expert 0 has {side}_features={ref}")
                    continue
                mats.append(np.asarray(t, np.float32))
            if len(mats) == len(sel):
                out[f"{proj}_lora_{ab.lower()}"] = np.stack(mats)
    if extra:
        problems.append(f"the adapter has experts {extra[:4]}{'...' if len(extra) > 4 else ''} in "
                        f"layer {layer}; the layer has {num_experts}")
    # hidden size: gate/up in, down out; intermediate: gate/up out, down in
    h_src = [s for s in (("gate", "in"), ("up", "in"), ("down", "out")) if s in dims]
    i_src = [s for s in (("gate", "out"), ("up", "out"), ("down", "in")) if s in dims]
    H = dims[h_src[0]] if h_src else None
    I = dims[i_src[0]] if i_src else None
    for srcs, want in ((h_src, H), (i_src, I)):
        for proj, side in srcs[1:]:
            got = dims[(proj, side)]
            if got != want:
                problems.append(f"{proj_names[PROJS.index(proj)]}: {side}_features {got}, but "
                                f"{srcs[0][0]} gives {want} (gate/up in = down out = hidden, gate/up "
                                "out = down in = intermediate)")
    _check_expect(problems, "adapter", r_file=r_file, scaling_file=_scaling(alpha, r_file, rslora),
                  H=H, I=I, **expect)
    _raise(problems, path, layer)
    for proj in absent:
        out.update(_absent(proj, len(sel), r_file, H, I, layer))
    return config, out


def _expert_selection(experts, num_experts) -> list:
    """The expert ids load_adapter reads: all, or the given distinct ids."""
    n = int(num_experts)
    if experts is None:
        return list(range(n))
    if isinstance(experts, (str, bytes)):
        raise TypeError(f"experts must be a sequence of expert ids, got the string {experts!r}")
    try:
        sel = [int(e) for e in experts]
    except (TypeError, ValueError):
        raise TypeError(f"experts must be a sequence of expert ids, got {experts!r}") from None
    bad = [e for e in sel if not 0 <= e < n]
    if bad or not sel or len(set(sel)) != len(sel):
        raise ValueError(f"experts: need distinct ids in [0, {n}) (num_experts={n}), got "
                         f"{sel[:8]}{'...' if len(sel) > 8 else ''}")
    return sel


# ---------------------------------------------------------------------------
# fused-expert ("3D", target_parameters) layout
# ---------------------------------------------------------------------------
def fuse_layer(mats: dict) -> dict:
    """One layer's six LoRA matrices ([E, r, in] / [E, out, r]) as PEFT's
    ParamWrapper tensors: {"gate_up_A": [E*2r, H], "gate_up_B": [2I, 2r*E],
    "down_A": [E*r, I], "down_B": [H, r*E]} (float32)."""
    ga, gb, ua, ub, da, db = (np.asarray(mats[n], np.float32) for n in NAMES)
    E, r, H = ga.shape
    I = gb.shape[1]
    A_gu = np.concatenate([ga, ua], axis=1).reshape(E * 2 * r, H)   # expert-major
    Bbd = np.zeros((E, 2 * I, 2 * r), np.float32)                    # block-diagonal per expert
    Bbd[:, :I, :r] = gb
    Bbd[:, I:, r:] = ub
    B_gu = Bbd.transpose(1, 2, 0).reshape(2 * I, 2 * r * E)          # rank-major
    return {"gate_up_A": A_gu, "gate_up_B": np.ascontiguousarray(B_gu),
            "down_A": da.reshape(E * r, I),
            "down_B": np.ascontiguousarray(db.transpose(1, 2, 0).reshape(H, r * E))}


def _unfuse_gate_up(A_gu, B_gu, E, r, where=""):
    A_gu, B_gu = np.asarray(A_gu, np.float32), np.asarray(B_gu, np.float32)
    H, I2 = A_gu.shape[1], B_gu.shape[0]
    I = I2 // 2
    A = A_gu.reshape(E, 2 * r, H)
    Bbd = B_gu.reshape(I2, 2 * r, E).transpose(2, 0, 1)               # [E, 2I, 2r]
    off = max(float(np.abs(Bbd[:, :I, r:]).max(initial=0.0)), float(np.abs(Bbd[:, I:, :r]).max(initial=0.0)))
    if off != 0.0:
        raise ValueError(f"{where}gate_up_proj lora_B is not block-diagonal (largest off-diagonal "
                         f"entry {off:.3g}): an adapter trained on the fused gate_up_proj cannot be "
                         "split into rank-r gate and up LoRA")
    return {"gate_lora_a": np.ascontiguousarray(A[:, :r]), "gate_lora_b": np.ascontiguousarray(Bbd[:, :I, :r]),
            "up_lora_a": np.ascontiguousarray(A[:, r:]), "up_lora_b": np.ascontiguousarray(Bbd[:, I:, r:])}


def _unfuse_down(A_d, B_d, E, r):
    A_d, B_d = np.asarray(A_d, np.float32), np.asarray(B_d, np.float32)
    return {"down_lora_a": np.ascontiguousarray(A_d.reshape(E, r, A_d.shape[1])),
            "down_lora_b": np.ascontiguousarray(B_d.reshape(B_d.shape[0], r, E).transpose(2, 0, 1))}


def unfuse_layer(fused: dict, num_experts: int, r: int, where: str = "") -> dict:
    """The inverse of fuse_layer; ValueError if gate_up's B is not
    block-diagonal (a LoRA trained fused cannot be split into rank-r gate
    and up LoRA)."""
    E = int(num_experts)
    out = _unfuse_gate_up(fused["gate_up_A"], fused["gate_up_B"], E, r, where)
    out.update(_unfuse_down(fused["down_A"], fused["down_B"], E, r))
    return out


def _fused_tensors(arrs, experts_path, dtype):
    tensors = {}
    for layer, mats in arrs.items():
        mod = experts_path(layer)
        f = fuse_layer(mats)
        # PEFT nests one ParamWrapper per parameter, in the module's parameter order:
        # gate_up_proj (registered first) inside, down_proj outside.
        tensors[f"base_model.model.{mod}.base_layer.lora_A.weight"] = f["gate_up_A"].astype(dtype)
        tensors[f"base_model.model.{mod}.base_layer.lora_B.weight"] = f["gate_up_B"].astype(dtype)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = f["down_A"].astype(dtype)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = f["down_B"].astype(dtype)
    return tensors


def _fused_hyper(r, lora_alpha, use_rslora, lora_dropout, gate_up_name="gate_up_proj"):
    """(config fields, metadata) of the fused layout: gate_up_proj rank 2r
    and alpha 2*alpha (sqrt(2)*alpha with rsLoRA) through rank_pattern /
    alpha_pattern; lora_dropout 0.0 in the config (PEFT's ParamWrapper
    refuses any other), the training value in the metadata."""
    from .validation import check_dropout

    p = check_dropout(lora_dropout, "lora_dropout")
    r = int(r)
    alpha_gu = float(lora_alpha) * (math.sqrt(2.0) if use_rslora else 2.0)
    pat = re.escape(gate_up_name)
    return ({"r": r, "lora_alpha": float(lora_alpha), "rank_pattern": {pat: 2 * r},
             "alpha_pattern": {pat: alpha_gu}, "use_rslora": bool(use_rslora), "lora_dropout": 0.0},
            {META_DROPOUT: repr(p)})


def export_peft_fused(path, layers: dict, r: int, lora_alpha: float, use_rslora: bool = False,
                      base_model_name_or_path: str | None = None, block: str = "mlp",
                      model_prefix: str = "model.", gate_up_name: str = "gate_up_proj",
                      down_name: str = "down_proj", dtype=np.float32,
                      lora_dropout: float = 0.0) -> None:
    """Write `layers` = {layer_idx: {"gate_lora_a": [E, r, H], ...}} as a PEFT
    adapter on transformers-5 fused experts (``LoraConfig(target_parameters=
    [...experts.gate_up_proj, ...experts.down_proj])``), atomically.

    Exact: gate_up_proj gets rank 2r with A = [A_gate; A_up] and B =
    blockdiag(B_gate, B_up) per expert, and lora_alpha 2*alpha (sqrt(2)*alpha
    with rsLoRA) through rank_pattern / alpha_pattern, so PEFT's delta is
    scaling * [B_gate A_gate; B_up A_up] -- ktsft's.  down_proj keeps rank r
    and alpha.  The same tensors serve experts stored transposed
    (``is_transposed``: [E, H, 2I] / [E, I, H]); gate rows must come first in
    gate_up_proj (not interleaved).  lora_dropout is written as 0.0 (PEFT's
    ParamWrapper refuses any other value; dropout does not change the
    adapter's function) and the training value kept in the safetensors
    metadata (``ktsft.lora_dropout``; load_adapter returns it)."""
    r = int(r)
    arrs = _dims_of(layers, r)
    experts_path = lambda L: _experts_module(L, block, model_prefix)  # noqa: E731
    tensors = _fused_tensors(arrs, experts_path, dtype)
    targets = [f"{experts_path(L)}.{n}" for L in arrs for n in (gate_up_name, down_name)]
    hyper, meta = _fused_hyper(r, lora_alpha, use_rslora, lora_dropout, gate_up_name)
    config = _base_config(base_model_name_or_path)
    config.update(hyper)
    config.update({"target_modules": [], "target_parameters": targets})
    _write_adapter(path, tensors, config, meta)


def _load_fused(path, config, tensors, layer, num_experts, mod, *, hidden_size, intermediate_size,
                r, scaling):
    r_file = int(config.get("r", 0))
    alpha = float(config.get("lora_alpha", r_file))
    rslora = bool(config.get("use_rslora", False))
    E = int(num_experts)
    problems = []
    targets = list(config.get("target_parameters") or [])
    gu_name = next((t.rsplit(".", 1)[-1] for t in targets if t.endswith("gate_up_proj")),
                   "gate_up_proj")
    dn_name = "down_proj"

    def targeted(pname):  # PEFT's matching of target_parameters
        key = f"{mod}.{pname}"
        return any(key == t or key.endswith(f".{t}") for t in targets)

    has_gu, has_dn = targeted(gu_name), targeted(dn_name)
    if not (has_gu or has_dn):
        raise KeyError(f"{path}: target_parameters {targets[:4]} name neither {mod}.{gu_name} nor "
                       f"{mod}.{dn_name}")

    def pattern(what, name, default):
        hits = _pattern_hits(config.get(what), [f"{mod}.{name}"])
        return type(default)(config[what][hits[0][0]]) if hits else default

    r_gu, a_gu = pattern("rank_pattern", gu_name, r_file), pattern("alpha_pattern", gu_name, alpha)
    r_d, a_d = pattern("rank_pattern", dn_name, r_file), pattern("alpha_pattern", dn_name, alpha)
    s_gu, s_d = _scaling(a_gu, r_gu, rslora), _scaling(a_d, r_d, rslora)
    if has_gu and has_dn:
        if r_gu != 2 * r_d:
            problems.append(f"gate_up_proj rank {r_gu}, expected 2*r = {2 * r_d} (gate and up side by "
                            "side)")
        elif not math.isclose(s_gu, s_d, rel_tol=1e-6):
            problems.append(f"gate_up_proj scales by {s_gu:g} but down_proj by {s_d:g}; ktsft has one "
                            "scaling per layer")
    elif has_gu and r_gu % 2:
        problems.append(f"gate_up_proj rank {r_gu} is odd: ktsft reads it as gate and up LoRA of "
                        "rank r side by side (rank 2r)")
    rk = r_d if has_dn else r_gu // 2
    s_file = s_d if has_dn else s_gu
    # PEFT nests one ParamWrapper per targeted parameter: gate_up_proj inside
    # (base_layer.) when both are targeted, a single one outside
    keys = {}
    if has_gu:
        p = "base_layer." if has_dn else ""
        keys.update(gate_up_A=f"base_model.model.{mod}.{p}lora_A.weight",
                    gate_up_B=f"base_model.model.{mod}.{p}lora_B.weight")
    if has_dn:
        keys.update(down_A=f"base_model.model.{mod}.lora_A.weight",
                    down_B=f"base_model.model.{mod}.lora_B.weight")
    missing = [k for k in keys.values() if k not in tensors]
    if missing:
        raise KeyError(f"{path}: fused adapter has no {missing[0]!r}")
    t = {n: tensors[k] for n, k in keys.items()}
    for n, k in keys.items():
        _check_dtype(problems, k, t[n])
        if t[n].ndim != 2:
            problems.append(f"{k}: {t[n].ndim} dims, expected 2")
    _raise(problems, path, layer)
    H = t["gate_up_A"].shape[1] if has_gu else t["down_B"].shape[0]
    I = t["down_A"].shape[1] if has_dn else t["gate_up_B"].shape[0] // 2
    want = {"gate_up_A": (E * r_gu, H), "gate_up_B": (2 * I, r_gu * E), "down_A": (E * r_d, I),
            "down_B": (H, r_d * E)}
    for n, k in keys.items():
        if tuple(t[n].shape) != want[n]:
            problems.append(f"{k}: shape {list(t[n].shape)}, expected {list(want[n])} (experts={E}, "
                            f"rank={r_gu if n.startswith('gate_up') else r_d}, H={H}, I={I})")
    _check_expect(problems, "adapter", r_file=rk, scaling_file=s_file, H=H, I=I,
                  hidden_size=hidden_size, intermediate_size=intermediate_size, r=r, scaling=scaling)
    _raise(problems, path, layer)
    where = f"{path}: layer {layer}: "
    out = {}
    if has_gu:
        out.update(_unfuse_gate_up(t["gate_up_A"], t["gate_up_B"], E, rk, where))
    else:
        out.update(_absent("gate", E, rk, H, I, layer))
        out.update(_absent("up", E, rk, H, I, layer))
    if has_dn:
        out.update(_unfuse_down(t["down_A"], t["down_B"], E, rk))
    else:
        out.update(_absent("down", E, rk, H, I, layer))
    return out
