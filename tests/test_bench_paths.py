"""bench writes where the user says (default ./ktsft-bench-results in the
current directory, never the tracked bench/results/ unless asked) and runs
from any directory: ``python -m bench`` with the repository on PYTHONPATH,
and ``python /path/to/repo/bench[/<script>.py]``."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--qlen", "8", "--dtype", "fp32", "--no-peers", "--repeats", "1"]


def _tracked_digest():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ROOT / "bench" / "results").iterdir()) if p.is_file()}


def _run(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_default_out_is_in_the_current_directory(tmp_path, monkeypatch):
    from bench import paths

    monkeypatch.chdir(tmp_path)
    assert paths.resolve_out(None) == tmp_path / "ktsft-bench-results"
    assert paths.resolve_out("bench/results") == Path("bench/results")  # explicit: as given
    pytest.importorskip("tqdm")
    pytest.importorskip("torch")
    from bench import run

    args = run.parse_args(["--quick"])
    assert args.out == tmp_path / "ktsft-bench-results" and args.tag == "quick"
    assert run.parse_args(["--out", "x"]).out == Path("x")


def test_as_package_keeps_pythonpath_first(monkeypatch, tmp_path):
    from bench import paths

    here, root = str(ROOT / "bench"), str(ROOT)
    build = str(tmp_path / "build")
    monkeypatch.setattr(sys, "path", [here, build, "/usr/lib/python3"])
    monkeypatch.setenv("PYTHONPATH", build)
    assert paths.as_package(str(ROOT / "bench" / "ab.py")) == "bench"
    assert sys.path == [build, root, "/usr/lib/python3"]  # bench/ itself is gone
    monkeypatch.setattr(sys, "path", [here, "/usr/lib/python3"])
    monkeypatch.delenv("PYTHONPATH")
    paths.as_package(str(ROOT / "bench" / "run.py"))
    assert sys.path == [root, "/usr/lib/python3"]


@pytest.mark.parametrize("how", ["module", "directory"])
def test_sweep_from_another_directory(tmp_path, how):
    pytest.importorskip("tqdm")
    pytest.importorskip("torch")
    before = _tracked_digest()
    if how == "module":  # python -m bench, the repository on PYTHONPATH
        r = _run(["-m", "bench", *TINY], tmp_path, pythonpath=str(ROOT))
    else:                # python /path/to/repo/bench, nothing on PYTHONPATH
        r = _run([str(ROOT / "bench"), *TINY], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ktsft-bench-results"
    d = json.loads((out / "sweep.json").read_text())
    assert [row["preset"] for row in d["rows"]] == ["tiny"]
    assert (out / "sweep.md").is_file()
    assert f"wrote {out / 'sweep.json'}" in r.stdout
    assert _tracked_digest() == before  # bench/results/ untouched

    # a script run as a file, and --out honoured
    r = _run([str(ROOT / "bench" / "render.py"), str(out / "sweep.json"), "--out", "again"],
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "sweep.md").read_text() == (out / "sweep.md").read_text()
    assert _tracked_digest() == before


@pytest.mark.parametrize("script", ["scaling", "incumbent", "probe", "dropout", "hf_e2e",
                                    "distributed", "render"])
def test_every_script_runs_as_a_file_from_elsewhere(tmp_path, script):
    pytest.importorskip("torch")
    r = _run([str(ROOT / "bench" / f"{script}.py"), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage:" in r.stdout


def test_bf16_rows_use_fp32_peak_without_bf16_hardware(monkeypatch):
    """On a CPU without bf16 hardware torch's bf16 matmul is emulated (under
    1 GFLOP/s on a Zen 3): the bench must bound bf16 rows by the fp32 FMA
    peak that ktsft's widened bf16 products really run on."""
    from bench import metrics

    monkeypatch.setattr(metrics, "bf16_hardware", lambda: False)
    assert metrics.compute_dtype("bf16") == "fp32"
    assert metrics.compute_dtype("int4") == "fp32"
    monkeypatch.setattr(metrics, "bf16_hardware", lambda: True)
    assert metrics.compute_dtype("bf16") == "bf16"
    assert metrics.compute_dtype("fp32") == "fp32"
