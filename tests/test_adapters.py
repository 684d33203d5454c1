"""PEFT-format adapters: round trips, key names, in-place loading."""
import json

import numpy as np
import pytest

import ktsft
from conftest import Problem


def test_wrapper_round_trip_in_place(tmp_path):
    p = Problem(T=6, H=24, I=16, E=4, k=2, r=3, seed=31)
    m = p.wrapper(dtype="fp32")
    m.layer_idx = 7
    want = p.run(m)
    m.save_adapter(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == p.alpha
    assert cfg["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.7.mlp.experts.2.down_proj.lora_B.weight"
    assert np.array_equal(t[key], p.lora[5][2])  # B_down[e] is [H, r]
    assert len(t) == 6 * p.E
    arrays = [a.copy() for a in p.lora]
    for a in p.lora:
        a[:] = 0.0                      # forget the trained values
    m.load_adapter(tmp_path / "ad")     # copied back into the registered arrays
    for a, b in zip(p.lora, arrays):
        assert np.array_equal(a, b)
    got = p.run(m)
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def test_mixtral_names_and_errors(tmp_path):
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=32)
    m = p.wrapper(dtype="fp32")
    m.save_adapter(tmp_path / "mx", proj_names=("w1", "w3", "w2"), block="block_sparse_moe")
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "mx" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.1.w3.lora_A.weight" in keys
    m.load_adapter(tmp_path / "mx", block="block_sparse_moe")  # names from target_modules
    with pytest.raises(KeyError, match="layers.0"):
        m.load_adapter(tmp_path / "mx")  # wrong block name: a clear error
    other = ktsft.SFTMoEWrapper(0, 3, 2, 16, 8, lora_rank=4, dtype="fp32")
    with pytest.raises(ValueError, match="rank"):
        other.load_adapter(tmp_path / "mx", block="block_sparse_moe")


def test_torch_module_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    import ktsft.torch as kt

    m = kt.LoRAExperts(4, 2, 24, 16, r=4, alpha=8.0, dtype="fp32", use_rslora=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in m.lora_parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    m.save_adapter(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    # rsLoRA is written as plain LoRA of the same scaling (alpha * sqrt(r) / r), which
    # PEFT's per-expert -> fused conversion, vLLM and SGLang all apply correctly
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == 8.0 * 2.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["ktsft.use_rslora"] == "true" and float(meta["ktsft.lora_alpha"]) == 8.0
    m2 = kt.LoRAExperts(4, 2, 24, 16, r=4, alpha=8.0, dtype="fp32", use_rslora=True)
    m2.load_adapter(tmp_path / "t")
    for a, b in zip(m.lora_parameters(), m2.lora_parameters()):
        assert torch.equal(a, b)
    m3 = kt.LoRAExperts(4, 2, 24, 16, r=4, alpha=8.0, dtype="fp32")
    with pytest.raises(ValueError, match="scaling"):
        m3.load_adapter(tmp_path / "t")


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------
def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _failing_writer(monkeypatch, exc=OSError("No space left on device")):
    """safetensors' writer that dies half way through its file."""
    import safetensors.numpy as stn

    real = stn.save_file

    def half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(max(1, len(f.read()) // 2))
        raise exc

    monkeypatch.setattr(stn, "save_file", half)


def test_failed_save_keeps_old_adapter(tmp_path, monkeypatch):
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=40)
    m = p.wrapper(dtype="fp32")
    m.save_adapter(tmp_path / "ad")
    before = _files(tmp_path / "ad")
    p.lora[0][:] += 1.0
    _failing_writer(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        m.save_adapter(tmp_path / "ad")
    assert _files(tmp_path / "ad") == before          # the old adapter, byte for byte
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ad"]  # no temporary left
    with pytest.raises(OSError):
        m.save_adapter(tmp_path / "new")               # a new target: nothing appears
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ad"]


def test_interrupted_config_write_keeps_old_adapter(tmp_path, monkeypatch):
    from ktsft import adapters

    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=41)
    m = p.wrapper(dtype="fp32")
    m.save_adapter(tmp_path / "ad")
    before = _files(tmp_path / "ad")
    p.lora[5][:] = 7.0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.save_adapter(tmp_path / "ad")
    assert _files(tmp_path / "ad") == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ad"]


@pytest.mark.parametrize("exchange", [True, False])
def test_save_over_existing_adapter(tmp_path, monkeypatch, exchange):
    from ktsft import adapters

    if not exchange:  # no atomic directory exchange: per-file replace
        monkeypatch.setattr(adapters, "_exchange", lambda a, b: False)
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=42)
    m = p.wrapper(dtype="fp32")
    m.save_adapter(tmp_path / "ad")
    p.lora[3][:] = 0.25
    want = [a.copy() for a in p.lora]
    m.save_adapter(tmp_path / "ad")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ad"]
    _, mats = adapters.load_adapter(tmp_path / "ad", 0, 3)
    for n, a in zip(adapters.NAMES, want):
        assert np.array_equal(mats[n], a), n
    # other files in the directory survive a save into it
    (tmp_path / "ad" / "trainer_state.json").write_text("{}")
    p.lora[3][:] = 0.5
    m.save_adapter(tmp_path / "ad")
    assert (tmp_path / "ad" / "trainer_state.json").read_text() == "{}"
    assert adapters.load_adapter(tmp_path / "ad", 0, 3)[1]["up_lora_b"].max() == 0.5
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ad"]


def test_save_refuses_a_file_and_bad_matrices(tmp_path):
    from ktsft import adapters

    (tmp_path / "f").write_text("keep")
    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=43)
    m = p.wrapper(dtype="fp32")
    with pytest.raises(NotADirectoryError):
        m.save_adapter(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep"
    mats = dict(zip(adapters.NAMES, p.lora))
    mats["down_lora_b"] = mats["down_lora_b"][:, :, :1]
    with pytest.raises(ValueError, match=r"down_lora_b: shape \[3, 16, 1\], expected \[3, 16, 2\]"):
        adapters.save_adapter(tmp_path / "bad", {0: mats}, 2, 4.0)
    with pytest.raises(ValueError, match="r=3"):
        adapters.save_adapter(tmp_path / "bad", {0: dict(zip(adapters.NAMES, p.lora))}, 3, 4.0)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]


# ---------------------------------------------------------------------------
# load-time validation
# ---------------------------------------------------------------------------
def _edit(path, fn):
    from safetensors.numpy import load_file, save_file

    f = str(path / "adapter_model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f)


def test_load_lists_every_mismatch(tmp_path):
    from ktsft import adapters

    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=44)
    p.wrapper(dtype="fp32").save_adapter(tmp_path / "ad")
    pre = "base_model.model.model.layers.0.mlp.experts"
    _, ok = adapters.load_adapter(tmp_path / "ad", 0, 3, hidden_size=16, intermediate_size=8, r=2,
                                  scaling=p.alpha / p.r)
    with pytest.raises(ValueError) as e:
        adapters.load_adapter(tmp_path / "ad", 0, 3, hidden_size=32, intermediate_size=8, r=4,
                              scaling=1.0)
    msg = str(e.value)
    assert "hidden_size 16, the layer has 32" in msg and "r=2, the layer has r=4" in msg
    assert "scaling 3 (lora_alpha/r" in msg and "the layer scales by 1" in msg and "intermediate" not in msg

    def damage(t):
        t[f"{pre}.1.up_proj.lora_A.weight"] = np.zeros((2, 15), np.float32)   # wrong in_features
        t[f"{pre}.2.down_proj.lora_B.weight"] = np.zeros((16, 2), np.int32)   # not a float
        t[f"{pre}.0.gate_proj.lora_B.weight"] = np.zeros((8, 3), np.float32)  # wrong rank
    _edit(tmp_path / "ad", damage)
    with pytest.raises(ValueError) as e:
        adapters.load_adapter(tmp_path / "ad", 0, 3)
    msg = str(e.value)
    assert f"{pre}.1.up_proj.lora_A.weight: shape [2, 15], expert 0 has in_features=16" in msg
    assert f"{pre}.2.down_proj.lora_B.weight: dtype int32" in msg
    assert f"{pre}.0.gate_proj.lora_B.weight: shape [8, 3] has rank 3, config r=2" in msg
    m = p.wrapper(dtype="fp32")
    with pytest.raises(ValueError, match="int32"):
        m.load_adapter(tmp_path / "ad")
    assert np.array_equal(ok["gate_lora_a"], p.lora[0])


def test_load_checks_expert_count_and_dims(tmp_path):
    from ktsft import adapters

    p = Problem(T=4, H=16, I=8, E=4, k=2, r=2, seed=45)
    p.wrapper(dtype="fp32").save_adapter(tmp_path / "e4")
    with pytest.raises(ValueError, match=r"experts \[3\] in layer 0; the layer has 3"):
        adapters.load_adapter(tmp_path / "e4", 0, 3)
    with pytest.raises(KeyError, match=r"experts.4.gate_proj.lora_A.weight. \(and 5 more\); it has experts 0..3 of layer 0, the layer has 5"):
        adapters.load_adapter(tmp_path / "e4", 0, 5)
    # gate and up disagree with down on the hidden size
    _edit(tmp_path / "e4", lambda t: t.update({
        f"base_model.model.model.layers.0.mlp.experts.{e}.down_proj.lora_B.weight":
            np.zeros((12, 2), np.float32) for e in range(4)}))
    with pytest.raises(ValueError, match="down_proj: out_features 12, but gate gives 16"):
        adapters.load_adapter(tmp_path / "e4", 0, 4)
    p.wrapper(dtype="fp32").save_adapter(tmp_path / "h16")
    other = ktsft.SFTMoEWrapper(0, 4, 2, 12, 8, lora_rank=2, dtype="fp32")
    with pytest.raises(ValueError, match=r"hidden_size 16, the layer has 12"):
        other.load_adapter(tmp_path / "h16")   # checked against the layer before anything is copied


def test_load_bf16_adapter_and_patterns(tmp_path):
    import ml_dtypes

    from ktsft import adapters

    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=46)
    mats = dict(zip(adapters.NAMES, p.lora))
    adapters.save_adapter(tmp_path / "b", {0: mats}, 2, 4.0, dtype=ml_dtypes.bfloat16)
    _, got = adapters.load_adapter(tmp_path / "b", 0, 3)
    assert got["up_lora_a"].dtype == np.float32
    assert np.array_equal(got["up_lora_a"], p.lora[2].astype(ml_dtypes.bfloat16).astype(np.float32))
    cfg_path = tmp_path / "b" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"down_proj": 4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank_pattern 'down_proj'"):
        adapters.load_adapter(tmp_path / "b", 0, 3)
    cfg.pop("rank_pattern")
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        adapters.load_adapter(tmp_path / "b", 0, 3)


# ---------------------------------------------------------------------------
# fused ("3D", target_parameters) export
# ---------------------------------------------------------------------------
def _peft_delta(A, B, E, rank, scaling):
    """PEFT's ParamWrapper delta for a [E, out, in] parameter:
    A.reshape(E, rank, in), B.reshape(out, rank, E) (lora/layer.py)."""
    a = A.reshape(E, rank, A.shape[-1]).astype(np.float64)
    b = B.reshape(B.shape[0], rank, E).astype(np.float64)
    return np.einsum("ore,eri->eoi", b, a) * scaling


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_export_is_exact(tmp_path, rslora):
    import math

    from safetensors.numpy import load_file

    from ktsft import adapters

    p = Problem(T=4, H=20, I=12, E=5, k=2, r=3, seed=47)
    mats = dict(zip(adapters.NAMES, p.lora))
    adapters.export_peft_fused(tmp_path / "f", {2: mats}, p.r, p.alpha, use_rslora=rslora)
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.2.mlp.experts"
    assert sorted(t) == sorted(f"{pre}.{b}lora_{x}.weight" for b in ("", "base_layer.") for x in "AB")
    E, r, H, I = p.E, p.r, p.H, p.I
    assert t[f"{pre}.base_layer.lora_A.weight"].shape == (E * 2 * r, H)
    assert t[f"{pre}.base_layer.lora_B.weight"].shape == (2 * I, 2 * r * E)
    assert t[f"{pre}.lora_A.weight"].shape == (E * r, I)
    assert t[f"{pre}.lora_B.weight"].shape == (H, r * E)
    s = p.alpha / (math.sqrt(r) if rslora else r)
    r_gu, a_gu = cfg["rank_pattern"]["gate_up_proj"], cfg["alpha_pattern"]["gate_up_proj"]
    s_gu = a_gu / (math.sqrt(r_gu) if rslora else r_gu)
    assert r_gu == 2 * r and s_gu == pytest.approx(s, rel=1e-15)
    gu = _peft_delta(t[f"{pre}.base_layer.lora_A.weight"], t[f"{pre}.base_layer.lora_B.weight"],
                     E, 2 * r, s_gu)
    dn = _peft_delta(t[f"{pre}.lora_A.weight"], t[f"{pre}.lora_B.weight"], E, r, s)
    ga, gb, ua, ub, da, db = (x.astype(np.float64) for x in p.lora)
    want_gu = np.concatenate([gb @ ga, ub @ ua], axis=1) * s    # gate rows first
    assert np.abs(gu - want_gu).max() <= 1e-12 * np.abs(want_gu).max()
    assert np.abs(dn - db @ da * s).max() <= 1e-12 * np.abs(dn).max()
    # back into a layer, through the wrapper's load_adapter (format detected)
    m = ktsft.SFTMoEWrapper(2, E, 2, H, I, lora_rank=r, lora_alpha=p.alpha, dtype="fp32")
    m.init_lora_weights(*[np.zeros_like(a) for a in p.lora])
    if not rslora:
        m.load_adapter(tmp_path / "f")
        for a, b in zip(m.adapter_layer()[1].values(), p.lora):
            assert np.array_equal(a, b)


def test_fused_load_rejects_full_gate_up_b(tmp_path):
    from safetensors.numpy import load_file, save_file

    from ktsft import adapters

    p = Problem(T=4, H=16, I=8, E=3, k=2, r=2, seed=48)
    adapters.export_peft_fused(tmp_path / "f", {0: dict(zip(adapters.NAMES, p.lora))}, 2, 4.0)
    f = str(tmp_path / "f" / "adapter_model.safetensors")
    t = load_file(f)
    t["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"][0, -1] = 0.5
    save_file(t, f)
    with pytest.raises(ValueError, match="not block-diagonal"):
        adapters.load_adapter(tmp_path / "f", 0, 3)
    with pytest.raises(ValueError, match=r"base_layer.lora_A.weight: shape \[12, 16\], expected \[16, 16\]"):
        adapters.load_adapter(tmp_path / "f", 0, 4)   # wrong expert count


def test_adapter_path_and_experts_refusals(tmp_path, monkeypatch):
    """An empty path or '.' would write into (and could replace) the current
    directory; a string is not a list of experts."""
    from ktsft import adapters

    m = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1).wrapper()
    monkeypatch.chdir(tmp_path)
    for bad in ("", "."):
        with pytest.raises(ValueError, match="current directory"):
            m.save_adapter(bad)
    assert list(tmp_path.iterdir()) == []
    m.save_adapter(tmp_path / "a")
    with pytest.raises(TypeError, match="string"):
        adapters.load_adapter(tmp_path / "a", 0, 4, experts="01")


def test_load_adapter_refuses_nan_for_every_front_end(tmp_path):
    """A NaN in an adapter file is refused before anything is written, by
    the numpy wrapper and the torch module alike (one implementation)."""
    import safetensors.numpy as stn

    torch = pytest.importorskip("torch")
    import ktsft.torch as kt

    p = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1)
    m = p.wrapper()
    m.save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = stn.load_file(str(f))
    key = sorted(t)[0]
    t[key] = t[key].copy()
    t[key].flat[0] = np.nan
    stn.save_file(t, str(f), metadata={"format": "pt"})
    before = [a.copy() for a in m.adapter_layer()[1].values()]
    with pytest.raises(ValueError, match="non-finite"):
        m.load_adapter(tmp_path / "a")
    for a, b in zip(before, m.adapter_layer()[1].values()):
        assert np.array_equal(a, b)
    mod = kt.LoRAExperts(4, 2, 16, 8, r=2, alpha=p.alpha if hasattr(p, "alpha") else 6.0,
                         dtype="fp32", threads=1)
    with pytest.raises(ValueError, match="non-finite"):
        mod.load_adapter(tmp_path / "a")


def test_a_handle_of_another_wrapper_is_refused():
    p = Problem(T=3, H=16, I=8, E=4, k=2, r=2, seed=1)
    a, b = p.wrapper(depth=2), p.wrapper(depth=2)
    _, ha = a.forward_sft(p.x, p.ids, p.w, return_handle=True)
    b.forward_sft(p.x, p.ids, p.w, return_handle=True)
    with pytest.raises((ValueError, KeyError, RuntimeError)):
        b.backward(p.dO, handle=ha)
    assert b.cache_depth == 1


def test_load_adapter_into_partly_read_only_lora_changes_nothing(tmp_path):
    """Registered LoRA arrays of which some are read-only: load_adapter is
    refused before any array is written (validate everything, then write)."""
    p = Problem(T=5, H=24, I=16, E=4, k=2, r=3, seed=2)
    src = p.wrapper()
    src.init_lora_weights(*[a * 3 for a in p.lora])
    src.save_adapter(tmp_path / "ad")
    lora = [a.copy() for a in p.lora]
    lora[4].setflags(write=False)  # down_lora_a read-only, the others writable
    m = ktsft.SFTMoEWrapper(0, p.E, p.k, p.H, p.I, cpuinfer_threads=1, lora_rank=p.r,
                            lora_alpha=p.alpha, dtype="fp32")
    m.load_weights(gate_proj=p.gate_proj, up_proj=p.up_proj, down_proj=p.down_proj)
    m.init_lora_weights(*lora)
    before = [a.copy() for a in lora]
    with pytest.raises(ValueError, match=r"down_lora_a.*read-only"):
        m.load_adapter(tmp_path / "ad")
    for a, b in zip(lora, before):
        assert np.array_equal(a, b)
