"""python -m ktsft demo: the expert LoRA learns the new task (held-out
accuracy from ~0 to high), the gradient check passes at --steps 20 over
seeds 0-9, the timing states the machine's load (and withholds the speedup
when it is busy), the outputs are written, and without torch the demo says
what to install.

The seed sweep runs on the tiny model by default (the same check code as the
default run); KTSFT_DEMO_FULL=1 runs it on the default size (about 20 s a
seed on 2 quiet cores)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
from ktsft import demo  # noqa: E402

HF, _ = demo.hf_available()
needs_hf = pytest.mark.skipif(not HF, reason="needs transformers >= 5 and peft")
SWEEP_SIZE = "small" if os.environ.get("KTSFT_DEMO_FULL") else "tiny"


def _short(size, seed, steps, use_transformers=None, dtype="bf16", pretrain=None):
    d = demo.Demo(size, dtype=dtype, threads=2, seed=seed, use_transformers=use_transformers,
                  progress=False, verbose=False)
    d.pretrain(demo.DEFAULT_PRETRAIN_STEPS if pretrain is None else pretrain)
    d.attach_lora()
    d.evaluate("before")
    d.finetune(steps)
    return d


@pytest.mark.parametrize("seed", range(10))
def test_gradient_check_steps_20_seeds_0_9(seed):
    """What `python -m ktsft demo --steps 20 --seed N` checks, N = 0..9."""
    d = _short(SWEEP_SIZE, seed, 20)
    g = d.check_gradients()
    brief = {k: g[k] for k in ("grad_rel_err", "bar", "sensitivity", "perturbed_grad_rel_err",
                               "eager_bf16_grad_rel_err", "layer_max_rel_err", "layer_bar")}
    assert g["ok"] and g["layers_ok"], brief
    # the bar is the bf16 error model's, measured on this step, not a loose constant
    import statistics

    assert len(g["perturbed_grad_rel_err"]) == demo.PERTURBED_TRIALS
    sens = statistics.median(g["perturbed_grad_rel_err"])
    assert g["sensitivity"] == sens
    assert g["bar"] == min(max(demo.SENSITIVITY_FACTOR * max(g["perturbed_grad_rel_err"]),
                               demo.ROUNDINGS_PER_LAYER * g["layers"] * demo.U_BF16), demo.BAR_CAP)
    assert g["bar"] <= 0.5  # a bar that could not fail would be no check
    assert g["loss_rel_err"] < 1e-2


def test_accuracy_moves_far():
    """A short default-size run (fewer steps than the default 200): held-out
    accuracy from ~0 (the base model writes cipher A) to above 0.9."""
    d = _short("small", 0, 100)
    before, after = d.results["heldout"]["before"], d.evaluate("after")
    assert before["accuracy"] < 0.05 and before["accuracy_cipher_a"] > 0.8
    assert after["accuracy"] > 0.9, after
    assert after["loss"] < 0.2 * before["loss"]


def _check_outputs(out, s):
    saved = json.loads((out / "summary.json").read_text())
    assert saved["heldout_accuracy_before"] == s["heldout_accuracy_before"]
    assert saved["heldout_accuracy_after"] > saved["heldout_accuracy_before"] + 0.3
    assert saved["run_seconds"] > 0 and saved["finetune"]["seconds"] > 0
    assert saved["grad_check"]["ok_all"]
    t = saved["timing"]
    assert t["ms"]["ktsft"] > 0 and t["ms"]["eager"] > 0
    assert t["load"]["note"] and "busy" in t["load"]
    assert (t["speedup"] is None) == t["load"]["busy"] == (t["speedup_withheld"] is not None)
    assert len(saved["finetune"]["curve"]["train_loss"]) == saved["steps"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "loss.png").stat().st_size > 1000


@needs_hf
def test_demo_cli_with_transformers(tmp_path, capsys):
    from ktsft.__main__ import main

    main(["demo", "--model-size", "tiny", "--steps", "60", "--threads", "2", "--timing-rounds",
          "2", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert "FAIL" not in text and "cipher-B accuracy" in text
    assert "faster" in text or "speedup withheld" in text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["transformers"] and s["dtype"] == "bf16"
    assert (tmp_path / "peft_adapter" / "adapter_config.json").is_file()
    _check_outputs(tmp_path, s)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_demo_without_transformers(tmp_path, dtype):
    s = demo.run(model_size="tiny", steps=60, threads=2, dtype=dtype, out=str(tmp_path),
                 timing_rounds=2, use_transformers=False, progress=False, verbose=False)
    assert not s["transformers"]
    if dtype == "fp32":
        assert s["grad_check"]["bar"] == demo.FP32_BAR
        for layer in s["grad_check"]["layers_vs_float64"]:
            assert layer["errors"]["grad_down_lora_b"] < 1e-5, layer
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "ktsft-lora-experts"
        assert len(list(f.keys())) == 6 * demo.SIZES["tiny"]["L"]
    _check_outputs(tmp_path, s)


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env},
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(demo.__file__))))


def test_demo_when_transformers_is_missing(tmp_path):
    """transformers and peft not importable: the stack model, same task."""
    r = _python(f"""
        import sys
        sys.modules["transformers"] = None
        sys.modules["peft"] = None
        from ktsft.__main__ import main
        main(["demo", "--model-size", "tiny", "--steps", "30", "--pretrain-steps", "30",
              "--timing-rounds", "1", "--out", {str(tmp_path)!r}, "--no-progress"])
        """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no transformers path" in r.stdout and "Traceback" not in r.stderr
    assert not json.loads((tmp_path / "summary.json").read_text())["transformers"]


def test_demo_without_torch_says_what_to_install():
    r = _python("""
        import sys
        sys.modules["torch"] = None
        from ktsft.__main__ import main
        main(["demo"])
        """)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "pip install torch" in r.stderr and "download.pytorch.org/whl/cpu" in r.stderr


def test_busy_machine_withholds_the_speedup(monkeypatch):
    d = _short("tiny", 0, 2, pretrain=2)
    monkeypatch.setattr("ktsft._contention.CONTENDED", -1.0)  # any load counts as busy
    t = d.time_steps(rounds=2)
    assert t["load"]["busy"] and t["speedup"] is None
    assert "other processes used" in t["speedup_withheld"]
    assert t["ratio_measured_under_load"]["eager"] > 0
    for bar in ("CONTENDED", "SPREAD_BAR"):
        monkeypatch.setattr("ktsft._contention." + bar, 1e9)
    d.loadavg_at_start = None
    t = d.time_steps(rounds=2)
    assert not t["load"]["busy"] and t["speedup"]["eager"] > 0 and t["speedup_withheld"] is None


def test_contention_probe_sees_another_process():
    """The probe the demo, the CLI and bench share."""
    import time

    from ktsft._contention import OtherLoad

    spin = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        g = OtherLoad().start()
        time.sleep(1.0)
        others = g.stop()
    finally:
        spin.kill()
        spin.wait()
    if others is None:
        pytest.skip("no /proc")
    assert others > 0.5, others


def test_cipher_task():
    t = demo.CipherTask(demo.stdlib_corpora(), B=4, S=16, seed=3)
    assert sorted(t.key_a.tolist()) == sorted(t.key_b.tolist()) == list(range(demo.V))
    assert bool((t.key_a != t.key_b).all())
    x, y = t.batch("train")
    assert x.shape == (4, 16) and y.shape == (4, 15) and bool((x[:, 0] == demo.BOS).all())
    assert bool((y == t.key_b[x[:, 1:]]).all())
    assert demo.decode(demo.encode("def f(x):\n\treturn 1")) == "def f(x):| return 1"


@needs_hf
def test_notebook_does_the_same_job(tmp_path):
    """examples/finetune_experts.ipynb, its code cells run in order on the tiny
    size, ends at the numbers of demo.run with the same settings."""
    nb_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(demo.__file__))),
                           "examples", "finetune_experts.ipynb")
    cells = [c for c in json.load(open(nb_path))["cells"] if c["cell_type"] == "code"]
    src = "\n".join("".join(c["source"]) for c in cells)
    settings = {'MODEL_SIZE = "small"': 'MODEL_SIZE = "tiny"',
                "STEPS = demo.DEFAULT_STEPS": "STEPS = 30",
                "PRETRAIN_STEPS = demo.DEFAULT_PRETRAIN_STEPS": "PRETRAIN_STEPS = 30",
                'OUT = "ktsft-demo-out"': f"OUT = {str(tmp_path / 'nb')!r}"}
    for a, b in settings.items():
        assert a in src, a
        src = src.replace(a, b)
    # the notebook shows the plot through IPython (always there in Jupyter); here a
    # stand-in records what it shows, with or without IPython installed
    shown = []
    imp = "from IPython.display import Image, display"
    assert imp in src
    src = src.replace(imp, "Image = lambda path: ('image', path); display = _shown.append")
    ns = {"_shown": shown}
    prev = torch.get_num_threads()
    try:
        exec(compile(src, nb_path, "exec"), ns)
    finally:
        torch.set_num_threads(prev)
    s = ns["s"]
    ref = demo.run(model_size="tiny", steps=30, pretrain_steps=30, threads=2, seed=0,
                   out=str(tmp_path / "cli"), progress=False, verbose=False)
    # the same steps give the same numbers; the base model trains in plain
    # PyTorch, whose CPU GEMMs need not be bitwise reproducible run to run
    for key in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert s[key] == pytest.approx(ref[key], abs=0.01), key
    for key in ("heldout_loss_before", "heldout_loss_after"):
        assert s[key] == pytest.approx(ref[key], rel=0.02), key
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(s["finetune"]["curve"]["train_loss"],
                               ref["finetune"]["curve"]["train_loss"], rtol=0.02)
    assert (tmp_path / "nb" / "summary.json").is_file()
    assert (tmp_path / "nb" / "peft_adapter" / "adapter_config.json").is_file()
    assert len(shown) == (1 if s["outputs"].get("loss_png") else 0)

