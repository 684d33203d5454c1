"""python -m ktsft: its --help (every option and preset explained, with the
memory each preset needs), progress on its phases, the load note on its
speedup, and the message (not a traceback) when torch is missing."""
import os
import re
import subprocess
import sys

import pytest

from ktsft import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def _py(code, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *(("-c", code) if code else ()), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_option_and_preset():
    r = _py(None, "-m", "ktsft", "--help")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    ap = cli._parser()
    for action in ap._actions:
        assert action.help, f"{action.option_strings} has no help"
        for opt in action.option_strings:
            assert opt in text
    for name, (H, I, E, k) in cli.PRESETS.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert f"H={H} I={I} E={E} k={k}" in line
        nxt = text.splitlines()[text.splitlines().index(line) + 1]
        assert re.search(r"~[\d.]+ (GB|MB) with --dtype bf16, ~[\d.]+ (GB|MB) with fp32", nxt), nxt
    assert "demo" in text and "(ABAB)" in text and "withheld" in text


def test_memory_estimate_from_the_shapes():
    H, I, E, k = cli.PRESETS["qwen3-30b-a3b"]
    m = cli.memory_estimate(H, I, E, k, 256, 16, "bf16")
    base = 3 * E * I * H
    assert m["source"] >= 4 * base and m["ktsft"] >= 2 * base and m["check"] >= 8 * base
    # the float64 check dominates and is freed before the eager loop is built
    assert m["peak"] == m["source"] + m["ktsft"] + m["check"] + m["runtime"]
    assert 9e9 < m["peak"] < 10.5e9  # measured: 9.2 GB peak RSS (10.8 GB before the reorder)
    lean = cli.memory_estimate(H, I, E, k, 256, 16, "bf16", check=False, torch=False)
    assert lean["peak"] < 4.5e9
    assert cli.memory_estimate(H, I, E, k, 256, 16, "fp32")["ktsft"] < base  # in place


def test_no_torch_layer_check_says_what_to_install():
    r = _py(BLOCK_TORCH + "from ktsft.__main__ import main; "
            "sys.exit(main(['--preset', 'tiny', '--tokens', '32', '--repeats', '1']))")
    assert r.returncode == 0, r.stderr
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in r.stdout
    assert "ok" in r.stdout and "FAIL" not in r.stdout
    assert "peak memory (RSS)" in r.stdout


@pytest.mark.parametrize("args", [["demo"], ["demo", "--steps", "3", "--model-size", "tiny"]])
def test_demo_without_torch_prints_install_instructions(args):
    r = _py(BLOCK_TORCH + "import runpy; sys.argv = ['ktsft', *sys.argv[1:]]; "
            "runpy.run_module('ktsft', run_name='__main__', alter_sys=True)", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in out
    assert "torch" in r.stderr


def test_missing_module_message_only_for_optional_modules():
    e = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert "download.pytorch.org/whl/cpu" in cli.missing_module_message(e, "x")
    e = ModuleNotFoundError("No module named 'torch._C'", name="torch._C")
    assert cli.missing_module_message(e, "x") is not None
    assert cli.missing_module_message(ModuleNotFoundError("x", name="ktsft.nope"), "x") is None
    assert cli.missing_module_message(ImportError("x"), "x") is None


def test_load_verdict():
    from ktsft._contention import verdict

    quiet = verdict(0.05, 0.3, 2, {"ktsft": [0.1, 0.1, 0.11], "eager": [0.24, 0.25, 0.27]})
    assert quiet == []
    busy = verdict(1.3, 4.1, 2, {"ktsft": [0.37, 0.1, 0.12], "eager": [2.6, 4.1, 3.6]})
    text = "; ".join(busy)
    assert "other processes used 1.3 of 2 cores" in text
    assert "load average 4.1 at the start > 2 usable cores" in text
    assert "eager/ktsft ratios disagree by 483%" in text and "ktsft times spread 270%" in text
    # several variants: each against ktsft
    two = verdict(None, None, 2, {"ktsft": [0.1, 0.1], "eager": [0.3, 0.3], "grouped_mm": [0.2, 0.5]})
    assert len(two) == 2 and "grouped_mm/ktsft ratios disagree by 150%" in two[0]
    assert verdict(None, None, 2, {"ktsft": [0.1], "eager": [0.3]}) == []  # no /proc, one pair


def _run(monkeypatch, capsys, others, load, *extra):
    pytest.importorskip("torch")
    monkeypatch.setattr(cli.OtherLoad, "stop", lambda self: others)
    monkeypatch.setattr(cli, "_loadavg", lambda: load)
    monkeypatch.setattr("ktsft._contention.SPREAD_BAR", 1e9)  # the spread of a noisy CI machine: not tested here
    cli.main(["--preset", "tiny", "--tokens", "16", "--repeats", "2", "--threads", "1", *extra])
    return capsys.readouterr()


def test_speedup_printed_with_the_load_when_quiet(monkeypatch, capsys):
    r = _run(monkeypatch, capsys, 0.01, 0.2)
    assert re.search(r"-> ktsft is [\d.]+x faster \(interleaved, median of 2, pairs "
                     r"[\d.]+x-[\d.]+x; load average 0.20 at the start, 0.20 now, on \d+ usable "
                     r"cores, other processes used 0.01 cores during the timing\)", r.out), r.out
    # progress on every phase, on stderr
    for phase in ("allocating random weights", "loading them into ktsft", "float64 reference",
                  "building the eager PyTorch loop", "warming up", "repeat 1/2", "repeat 2/2"):
        assert phase in r.err, phase
    assert r.out.startswith("memory: about ")


def test_speedup_withheld_when_busy(monkeypatch, capsys):
    r = _run(monkeypatch, capsys, 1.4, 1000.0, "--no-check", "--no-progress")
    assert "faster" not in r.out
    assert re.search(r"speedup withheld: the machine was busy \(other processes used 1.4 of \d+ "
                     r"cores during the timing; load average 1000.0 at the start > \d+ usable cores",
                     r.out), r.out
    assert "relative error" not in r.out and r.err == ""
