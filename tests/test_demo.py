"""python -m ktsft demo, short: it trains, its gradient checks pass, it
writes the adapter, the loss curve and the summary."""
import json

import pytest

torch = pytest.importorskip("torch")
from ktsft import demo  # noqa: E402


def _check_outputs(out, s, steps):
    assert s["grad_check_ok"], s
    assert len(s["losses"]) == steps
    assert sum(s["losses"][-3:]) < sum(s["losses"][:3])  # it learns
    assert s["step_ms_ktsft"] > 0 and s["step_ms_eager"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["format"] == "ktsft-lora-experts"
    assert len(keys) == 6 * demo.SIZES["tiny"]["L"]
    assert all(k.rsplit(".", 1)[1].startswith(("gate_lora", "up_lora", "down_lora")) for k in keys)
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000


def test_demo_without_transformers(tmp_path):
    s = demo.run(model_size="tiny", steps=20, threads=2, dtype="fp32", out=str(tmp_path), lr=5e-3,
                 eager_steps=2, use_transformers=False, progress=False, verbose=False)
    assert s["layer_rel_err_vs_reference"]["grad_down_lora_b"] < 1e-5
    _check_outputs(tmp_path, s, 20)


def test_demo_cli_with_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    from ktsft.__main__ import main

    main(["demo", "--model-size", "tiny", "--steps", "12", "--threads", "2", "--eager-steps",
          "2", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert "faster" in text and "FAIL" not in text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["transformers"] and s["dtype"] == "bf16"
    assert (tmp_path / "peft_adapter" / "adapter_config.json").is_file()
    _check_outputs(tmp_path, s, 12)
