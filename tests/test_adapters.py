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
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 8.0
    m2 = kt.LoRAExperts(4, 2, 24, 16, r=4, alpha=8.0, dtype="fp32", use_rslora=True)
    m2.load_adapter(tmp_path / "t")
    for a, b in zip(m.lora_parameters(), m2.lora_parameters()):
        assert torch.equal(a, b)
    m3 = kt.LoRAExperts(4, 2, 24, 16, r=4, alpha=8.0, dtype="fp32")
    with pytest.raises(ValueError, match="scaling"):
        m3.load_adapter(tmp_path / "t")
