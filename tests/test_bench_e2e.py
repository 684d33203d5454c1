"""bench.e2e and bench.step stay working: CPU only, the tiny preset."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_e2e_tiny_on_cpu(tmp_path, capsys):
    from bench import e2e

    res = e2e.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--tokens", "16,32",
                    "--threads", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ktsft_T16" in out and "outside" in out
    saved = json.loads((tmp_path / "e2e_tiny_L2_cpu.json").read_text())
    for T in (16, 32):
        run = saved["runs"][f"ktsft_T{T}"]
        assert len(run["rows"]) == 3  # warm-up + 2
        m = run["median"]
        assert m["tokens_per_s"] > 0 and m["kernel_fwd_s"] > 0 and m["kernel_bwd_s"] > 0
        assert m["optimizer_s"] > 0 and 0 < m["outside_kernels"] < 1
        parts = sum(m[k] for k in ("kernel_fwd_s", "kernel_bwd_s", "gpu_wait_s", "transfers_s",
                                   "staging_s", "optimizer_s", "other_s"))
        assert parts == pytest.approx(m["step_s"], rel=0.3)  # medians of parts, not exact
        assert run["cache_bytes"] > 0
    # training moves the loss
    rows = saved["runs"]["ktsft_T16"]["rows"]
    assert all(r["loss"] > 0 for r in rows)
    assert saved["peak_rss"] > 0 and saved["rss_bound"] > saved["expert_bytes"]
    assert res["layers"] == 2


def test_e2e_help_states_memory(capsys):
    from bench import e2e

    with pytest.raises(SystemExit):
        e2e.main(["--help"])
    out = capsys.readouterr().out
    for name in e2e.PRESETS:
        assert name in out
    assert "GB experts (bf16)" in out and "as many layers as host memory allows" in out


def test_step_tiny(tmp_path):
    from bench import step

    res = step.main(["--preset", "tiny", "--tokens", "16", "--repeats", "2", "--threads", "2",
                     "--out", str(tmp_path)])
    names = [r["optimizer"] for r in res["optimizers"]]
    assert "ktsft CPUAdamW" in names and "torch AdamW (for-loop)" in names
    assert res["triad_gbs"] > 0 and res["module_ms"] > 0 and res["wrapper_ms"] > 0
    assert (tmp_path / "step_tiny_T16_bf16_t2.json").is_file()


def test_e2e_overlap_both(tmp_path, capsys):
    """--overlap both: the overlapped steps and the serial ones in one run
    (deferral forced on CPU here: tests/test_shared_overlap.py)."""
    from bench import e2e
    from ktsft import _overlap

    _overlap.FORCE_CPU = True
    try:
        e2e.main(["--preset", "tiny-deepseek", "--device", "cpu", "--steps", "1", "--tokens",
                  "24", "--threads", "2", "--overlap", "both", "--out", str(tmp_path)])
    finally:
        _overlap.FORCE_CPU = False
    out = capsys.readouterr().out
    assert "ktsft_T24_serial" in out and "hidden" in out
    saved = json.loads((tmp_path / "e2e_tiny-deepseek_L2_cpu.json").read_text())
    assert saved["shared_expert_blocks"] == 2
    on, off = saved["runs"]["ktsft_T24"], saved["runs"]["ktsft_T24_serial"]
    assert on["overlap"] and not off["overlap"]
    assert all(r["join_wait_s"] > 0 for r in on["rows"])
    assert all(r["join_wait_s"] == 0 and r["hidden_s"] == 0 for r in off["rows"])
    png = e2e.plot([saved], str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000 and png
