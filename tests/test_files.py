"""Files ktsft writes: modes per the umask (as open() / mkdir() give them,
not the 0600 / 0700 of the temporary files the atomic writes go through),
and ktsft-format LoRA files reloaded only into a model of the same r,
lora_alpha and use_rslora."""
import os
import stat

import numpy as np
import pytest

from conftest import Problem


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _assert_tree(root, u):
    """Every directory 0o777 & ~u, every file 0o666 & ~u, no temporaries."""
    assert _mode(root) == 0o777 & ~u, oct(_mode(root))
    names = os.listdir(root)
    assert names and not [n for n in names if ".tmp-" in n], names
    for n in names:
        p = os.path.join(root, n)
        want = (0o777 if os.path.isdir(p) else 0o666) & ~u
        assert _mode(p) == want, (n, oct(_mode(p)), oct(want))


def test_umask_is_read_without_changing_it(umask):
    from ktsft.adapters import _umask

    assert _umask() == umask
    assert os.umask(umask) == umask  # unchanged


def test_save_adapter_and_export_peft_fused_modes(tmp_path, umask):
    p = Problem(T=6, H=24, I=16, E=4, k=2, r=3, seed=31)
    m = p.wrapper(dtype="fp32")
    m.save_adapter(tmp_path / "ad")
    _assert_tree(tmp_path / "ad", umask)
    m.save_adapter(tmp_path / "ad")  # over an existing adapter (directory exchange)
    _assert_tree(tmp_path / "ad", umask)
    m.export_peft_fused(tmp_path / "fused")
    _assert_tree(tmp_path / "fused", umask)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_existing_modes_are_kept(tmp_path, umask):
    """Saving over an existing adapter keeps the modes its owner chose, as
    open() on an existing file does."""
    p = Problem(T=6, H=24, I=16, E=4, k=2, r=3, seed=31)
    m = p.wrapper(dtype="fp32")
    d = tmp_path / "ad"
    m.save_adapter(d)
    os.chmod(d, 0o750)
    os.chmod(d / "adapter_model.safetensors", 0o640)
    (d / "README.md").write_text("other files: per-file renames into the directory\n")
    m.save_adapter(d)
    assert _mode(d) == 0o750
    assert _mode(d / "adapter_model.safetensors") == 0o640
    assert _mode(d / "adapter_config.json") == 0o666 & ~umask


def test_save_weights_mode(tmp_path, umask):
    p = Problem(T=6, H=24, I=16, E=4, k=2, r=3, seed=31)
    m = p.wrapper(dtype="bf16")
    f = tmp_path / "layer.safetensors"
    m.save_weights(f)
    assert _mode(f) == 0o666 & ~umask
    os.chmod(f, 0o640)
    m.save_weights(f)  # replaces it, keeping its mode
    assert _mode(f) == 0o640
    assert os.listdir(tmp_path) == ["layer.safetensors"]


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import build, tokens  # noqa: E402
from ktsft.integrations.transformers import (  # noqa: E402
    apply_lora_experts, export_adapter, load_lora_experts, load_lora_state_dict, lora_state_dict,
    save_lora_experts)


def _patched(r=4, alpha=8.0, use_rslora=False, E=8, seed=0):
    model = apply_lora_experts(build("qwen3_moe", seed=seed, E=E), r=r, alpha=alpha,
                               use_rslora=use_rslora, dtype="fp32", threads=1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            v.copy_(0.3 * torch.randn(v.shape, generator=g))
    return model


def test_save_lora_experts_and_export_adapter_modes(tmp_path, umask):
    model = _patched()
    f = tmp_path / "lora.safetensors"
    assert save_lora_experts(model, f) == str(f)
    assert _mode(f) == 0o666 & ~umask
    save_lora_experts(model, f)  # replaces it, keeping its mode
    assert _mode(f) == 0o666 & ~umask
    os.chmod(f, 0o640)
    save_lora_experts(model, f)
    assert _mode(f) == 0o640
    export_adapter(model, tmp_path / "peft", peft_check=False)
    _assert_tree(tmp_path / "peft", umask)
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors", "peft"]  # no temporaries


def test_load_lora_experts_round_trip(tmp_path):
    model = _patched(use_rslora=True)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    path = save_lora_experts(model, tmp_path / "l.safetensors", metadata={"step": 7})
    fresh = apply_lora_experts(build("qwen3_moe", seed=0), r=4, alpha=8.0, use_rslora=True,
                               dtype="fp32", threads=1)
    meta = load_lora_experts(fresh, path)
    assert meta["r"] == "4" and meta["step"] == "7" and meta["lora_dropout"] == "0.0"
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    # load_lora_state_dict given the path does the same (checked) load
    again = apply_lora_experts(build("qwen3_moe", seed=0), r=4, alpha=8.0, use_rslora=True,
                               dtype="fp32", threads=1)
    load_lora_state_dict(again, path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


@pytest.mark.parametrize("field, kw, text", [
    ("r", dict(r=8), "r is 4 in the file but 8 in the model"),
    ("lora_alpha", dict(alpha=16.0), "lora_alpha is 8.0 in the file but 16.0 in the model"),
    ("use_rslora", dict(use_rslora=True), "use_rslora is False in the file but True in the model"),
])
def test_load_lora_experts_refuses_other_hyperparameters(tmp_path, field, kw, text):
    path = save_lora_experts(_patched(), tmp_path / "l.safetensors")
    other = apply_lora_experts(build("qwen3_moe"), **{**dict(r=4, alpha=8.0), **kw},
                               dtype="fp32", threads=1)
    before = {k: v.clone() for k, v in lora_state_dict(other).items()}
    for load in (load_lora_experts, load_lora_state_dict):
        with pytest.raises(ValueError) as e:
            load(other, path)
        msg = str(e.value)
        assert str(path) in msg and text in msg, msg
        assert "model.layers.0.mlp.experts" in msg  # which module
    for k, v in lora_state_dict(other).items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_load_lora_experts_other_shapes_and_formats(tmp_path):
    path = save_lora_experts(_patched(), tmp_path / "l.safetensors")
    other = apply_lora_experts(build("qwen3_moe", E=4), r=4, alpha=8.0, dtype="fp32", threads=1)
    with pytest.raises(ValueError, match=r"l\.safetensors: LoRA tensor "
                                         r"'model\.layers\.0\.mlp\.experts\.gate_lora_a' has "
                                         r"shape \(8, 4, 48\), the model's is \(4, 4, 48\)"):
        load_lora_experts(other, path)
    # a dict with a wrong shape: the key and both shapes, not a bare size error
    sd = {k: v[:2] for k, v in lora_state_dict(_patched()).items()}
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state_dict(_patched(), sd)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ktsft-format LoRA file"):
        load_lora_experts(other, tmp_path / "other.safetensors")
    export_adapter(_patched(), tmp_path / "peft", peft_check=False)
    with pytest.raises(ValueError, match="PEFT adapter directory"):
        load_lora_experts(other, tmp_path / "peft")


@pytest.mark.parametrize("kind", ["layer_file", "stacked_npy", "adapter_weights", "adapter_config"])
def test_corrupt_files_are_named(tmp_path, kind):
    """Truncated or garbage files raise naming the file and what it should
    be, not the parser's bare words."""
    import ktsft
    from conftest import Problem

    p = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1)
    m = p.wrapper()
    if kind == "layer_file":
        path = tmp_path / "layer.safetensors"
        m.save_weights(str(path))
        path.write_bytes(path.read_bytes()[:50])
        w = ktsft.SFTMoEWrapper(0, 4, 2, 16, 8, dtype="fp32", weight_path=str(path))
        call, name = w.load_weights, str(path)
    elif kind == "stacked_npy":
        for n, a in zip(("gate_proj", "up_proj", "down_proj"),
                        (p.gate_proj, p.up_proj, p.down_proj)):
            np.save(tmp_path / f"{n}.npy", a)
        (tmp_path / "up_proj.npy").write_bytes(b"\x93NUMPY garbage")
        w = ktsft.SFTMoEWrapper(0, 4, 2, 16, 8, dtype="fp32", weight_path=str(tmp_path))
        call, name = w.load_weights, "up_proj.npy"
    else:
        m.save_adapter(tmp_path / "a")
        f = tmp_path / "a" / ("adapter_model.safetensors" if kind == "adapter_weights"
                              else "adapter_config.json")
        f.write_bytes(f.read_bytes()[:40])
        call, name = (lambda: m.load_adapter(tmp_path / "a")), f.name
    with pytest.raises(ValueError, match="not a readable") as e:
        call()
    assert name in str(e.value)


@pytest.mark.parametrize("key, value", [("r", "two"), ("r", 0), ("lora_alpha", "x"),
                                        ("target_modules", 5), ("layers_to_transform", "3"),
                                        ("layers_to_transform", [1, "2"]),
                                        ("alpha_pattern", [1])])
def test_adapter_config_field_types(tmp_path, key, value):
    import json

    m = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1).wrapper()
    m.save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg[key] = value
    f.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"adapter_config.json.*{key} must be"):
        m.load_adapter(tmp_path / "a")


def test_float8_and_huge_buffers_are_named():
    torch = pytest.importorskip("torch")
    from ktsft.buffers import KExpertsSFTBuffer

    p = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1)
    m = p.wrapper()
    if hasattr(torch, "float8_e4m3fn"):
        x = torch.tensor(p.x).to(torch.float8_e4m3fn)
        with pytest.raises(TypeError, match="hidden_states: torch torch.float8_e4m3fn is not "
                                            "supported"):
            m.forward_sft(x, p.ids, p.w)
    with pytest.raises(MemoryError, match="KExpertsSFTBuffer of qlen="):
        KExpertsSFTBuffer.staging(10**13, 2048, 768, 128, 8, 16)
    assert m.cache_depth == 0


def _sharded(tmp_path, p):
    """p's experts as a two-shard HF checkpoint with its index."""
    import json

    from safetensors.numpy import save_file

    shards = {}
    for e in range(p.E):
        for n, a in (("gate_proj", p.gate_proj), ("up_proj", p.up_proj),
                     ("down_proj", p.down_proj)):
            shards.setdefault(f"model-0000{e % 2 + 1}-of-00002.safetensors", {})[
                f"model.layers.0.mlp.experts.{e}.{n}.weight"] = a[e]
    wm = {}
    for f, t in shards.items():
        save_file(t, str(tmp_path / f))
        wm.update({k: f for k in t})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return wm


@pytest.mark.parametrize("case, text", [
    ("truncated", "not valid JSON"),
    ("binary", "not UTF-8"),
    ("list", "found list"),
    ("no_weight_map", "found keys ['metadata']"),
    ("empty_map", "weight_map is empty"),
    ("map_is_list", "weight_map is list"),
    ("null_shard", "maps to None, not a file name"),
    ("missing_shard", "names the shard 'model-00002-of-00002.safetensors' (for"),
])
def test_bad_index_json_is_named(tmp_path, case, text):
    import json

    p = Problem(T=4, H=24, I=16, E=4, k=2, r=3)
    wm = _sharded(tmp_path, p)
    index = tmp_path / "model.safetensors.index.json"
    good = index.read_text()
    key = next(iter(wm))
    body = {"truncated": good[: len(good) // 2].encode(), "binary": b"\xff\xfe\x00garbage",
            "list": b"[1, 2]", "no_weight_map": b'{"metadata": {}}',
            "empty_map": b'{"weight_map": {}}', "map_is_list": b'{"weight_map": []}',
            "null_shard": json.dumps({"weight_map": {**wm, key: None}}).encode(),
            "missing_shard": good.encode()}[case]
    index.write_bytes(body)
    if case == "missing_shard":
        os.remove(tmp_path / "model-00002-of-00002.safetensors")
    import ktsft

    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, lora_rank=p.r, weight_path=str(tmp_path),
                            dtype="fp32")
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        m.load_weights()
    assert "model.safetensors.index.json" in str(info.value) and text in str(info.value), \
        str(info.value)
    with pytest.raises(RuntimeError):  # nothing was loaded
        m.forward_sft(p.x, p.ids, p.w)
