"""python -m ktsft: build one random MoE layer with LoRA on gate/up/down, run
forward + backward through ktsft, check every output and gradient against
ktsft.reference (float64), and time ktsft against the PyTorch eager loop
with autograd (measured interleaved, with the machine's load stated).

python -m ktsft demo [--model-size ...]: fine-tune the routed experts' LoRA of
a small MoE model (needs torch; see ``python -m ktsft demo --help``)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ._contention import CONTENDED, SPREAD_BAR, OtherLoad, usable_cores, verdict
from ._contention import loadavg as _loadavg

PRESETS = {  # H, I, E, k
    "tiny": (256, 128, 8, 2),
    "small": (1024, 512, 32, 4),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
}
PRESET_NOTES = {
    "tiny": "a smoke test (seconds)",
    "small": "a small layer (seconds)",
    "qwen3-30b-a3b": "one Qwen3-30B-A3B MoE layer",
    "olmoe": "one OLMoE-1B-7B MoE layer",
}
DEFAULTS = {"tokens": 256, "rank": 16, "dtype": "bf16", "repeats": 3}

TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
# optional modules a subcommand may import, and how to get them
_INSTALL = {
    "torch": TORCH_CPU_INSTALL + "\n  (the CPU wheel; an existing CUDA build of torch works too)",
    "transformers": "pip install transformers peft",
    "peft": "pip install peft",
    "matplotlib": "pip install matplotlib",
    "safetensors": "pip install safetensors",
}

_GB = 1e9


# ---------------------------------------------------------------------------
# memory the run needs, from the shapes
# ---------------------------------------------------------------------------
def memory_estimate(H, I, E, k, T, r, dtype="bf16", check=True, torch=True) -> dict:
    """Bytes the layer check holds at its peak, by part, from the shapes
    alone (what the code below allocates, in order):

    - source: the random fp32 base weights 3*E*I*H*4 (+ LoRA, activations)
    - ktsft: its bf16 copy of the base weights 3*E*I*H*2 (fp32: read in
      place, 0), LoRA gradients and staging, the activation cache
      (bytes_per_token * T) and the per-call workspace
    - check: the float64 reference converts the weights, 3*E*I*H*8, and
      keeps float64 activations for its backward
    - eager: PyTorch's copy of the weights in bf16 (fp32: shared, 0), its
      LoRA parameters and autograd's saved activations

    The reference is freed before the eager loop is built, so the peak is
    source + ktsft + max(check, eager) + the interpreter (and torch)."""
    from .buffers import CacheEntry, Workspace

    base = 3 * E * I * H
    lora = 4 * E * r * 3 * (H + I)          # six fp32 LoRA matrices
    P = T * k                                # (token, slot) pairs
    acts = 4 * T * (2 * H + 2 * k) + 8 * P  # x, dO, weights, ids
    parts = {
        "source": 4 * base + lora + acts,
        "ktsft": (2 * base if dtype == "bf16" else 0) + 2 * lora
        + CacheEntry.bytes_per_token(H, I, k, r) * T
        + Workspace.bytes_per_token(H, I, k, r, dtype == "bf16") * T
        + 4 * T * H + 4 * P,                 # grad_input, grad of the routing weights
        "check": (8 * base + 4 * 2 * lora + 8 * P * (4 * I + 3 * H) + 8 * 4 * T * H) if check else 0,
        "eager": ((2 * base if dtype == "bf16" else 0) + lora
                  + 4 * P * (6 * I + 3 * H) + 4 * 2 * T * H) if torch else 0,
        "runtime": (300 if torch else 60) * 2 ** 20,  # interpreter, numpy, torch's libraries
    }
    parts["peak"] = (parts["source"] + parts["ktsft"] + max(parts["check"], parts["eager"])
                     + parts["runtime"])
    return parts


def _gb(n) -> str:
    return f"{n / _GB:.1f} GB" if n >= 0.95 * _GB else f"{n / 2 ** 20:.0f} MB"


def _presets_epilog() -> str:
    T, r = DEFAULTS["tokens"], DEFAULTS["rank"]
    lines = ["presets: H hidden size, I expert intermediate size, E experts, k experts per",
             f"token, and the memory a run needs at --tokens {T} --rank {r} (with the float64",
             "check and the torch timing; --no-check or --no-torch need less; the run prints",
             "its own estimate first, and its peak at the end):"]
    for name, (H, I, E, k) in PRESETS.items():
        b = memory_estimate(H, I, E, k, T, r, "bf16")["peak"]
        f = memory_estimate(H, I, E, k, T, r, "fp32")["peak"]
        lines.append(f"  {name:14s} H={H} I={I} E={E} k={k}: {PRESET_NOTES[name]}")
        lines.append(f"  {'':14s} ~{_gb(b)} with --dtype bf16, ~{_gb(f)} with fp32")
    lines += [
        "",
        "The memory is dominated by the base weights, 3*E*I*H values: generated in fp32, a bf16",
        "copy in ktsft (and one in torch), and a float64 copy for the reference check.",
        "",
        "Speedups: ktsft and the eager loop are timed in alternation (ABAB), and the run",
        "measures what other processes use meanwhile. On a busy machine (other processes",
        f"using more than {CONTENDED} cores, a load average above the usable cores, or pairs",
        f"that disagree by more than {SPREAD_BAR:.0%}) the speedup is withheld, with the reason.",
        "",
        "subcommands:",
        "  demo           fine-tune expert LoRA on a small MoE model (python -m ktsft demo --help)",
    ]
    return "\n".join(lines)


def _available_memory():
    """MemAvailable from /proc/meminfo, bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss():
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return None


# ---------------------------------------------------------------------------
# the layer check
# ---------------------------------------------------------------------------
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class _Progress:
    def __init__(self, on: bool):
        self.on, self.t0 = on, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ktsft", description=__doc__, epilog=_presets_epilog(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="small",
                    help="layer shape (default: small; the list below gives each one's memory)")
    ap.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], metavar="T",
                    help="tokens in the batch, each routed to k experts (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=DEFAULTS["rank"], metavar="R",
                    help="LoRA rank r; alpha is 2r (default: %(default)s)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=DEFAULTS["dtype"],
                    help="storage of the frozen base weights, in ktsft and in the eager loop; "
                         "LoRA and accumulation stay fp32 (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="ktsft's OpenMP threads and torch's threads (default: the usable cores)")
    ap.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], metavar="N",
                    help="timed forward+backward steps of each of ktsft and eager, in alternation, "
                         "after one warm-up step each (default: %(default)s)")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the eager PyTorch timing (also automatic without torch)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the float64 reference check (saves its float64 copy of the "
                         "weights, 3*E*I*H*8 bytes)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress lines on stderr")
    return ap


def layer_check(argv=None):
    args = _parser().parse_args(argv)
    load_start = _loadavg()  # before this run adds to it
    import ktsft
    from ktsft import reference

    say = _Progress(not args.no_progress)
    H, I, E, k = PRESETS[args.preset]
    T, r = args.tokens, args.rank
    if T < 1 or r < 1 or args.repeats < 1:
        raise SystemExit("--tokens, --rank and --repeats must be >= 1")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print(f"torch not installed: skipping the eager comparison (to get it: "
                  f"{TORCH_CPU_INSTALL})")
    mem = memory_estimate(H, I, E, k, T, r, args.dtype, check=not args.no_check,
                          torch=torch is not None)
    avail = _available_memory()
    print(f"memory: about {_gb(mem['peak'])} (fp32 source weights {_gb(mem['source'])}, "
          f"ktsft {_gb(mem['ktsft'])}"
          + (f", float64 check {_gb(mem['check'])}" if mem["check"] else "")
          + (f", eager torch {_gb(mem['eager'])}" if mem["eager"] else "")
          + (f"; {_gb(avail)} available" if avail else "") + ")", flush=True)
    if avail is not None and mem["peak"] > avail:
        print(f"WARNING: this run needs about {_gb(mem['peak'])} but {_gb(avail)} is available; "
              "--no-check (and --no-torch) need less, a smaller --preset much less",
              file=sys.stderr, flush=True)

    base_bytes = 3 * E * I * H * 4
    say(f"allocating random weights ({_gb(base_bytes)} fp32)...")
    rng = np.random.default_rng(0)
    f = np.float32
    w = [(rng.standard_normal(s, dtype=f) * 0.02) for s in ((E, I, H), (E, I, H), (E, H, I))]
    loras = [(rng.standard_normal(s, dtype=f) * 0.02)
             for s in ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))]
    x = rng.standard_normal((T, H), dtype=f)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int64)
    rw = rng.random((T, k), dtype=f)
    dO = rng.standard_normal((T, H), dtype=f)

    say(f"loading them into ktsft ({args.dtype}"
        + (f": a {_gb(base_bytes // 2)} bf16 copy" if args.dtype == "bf16" else ", in place")
        + ")...")
    m = ktsft.SFTMoEWrapper(0, E, k, H, I, cpuinfer_threads=args.threads, lora_rank=r,
                            lora_alpha=2.0 * r, dtype=args.dtype)
    m.load_weights(gate_proj=w[0], up_proj=w[1], down_proj=w[2])
    m.init_lora_weights(*loras)
    info = ktsft.cpu_info()
    threads, cores = m.cpuinfer_threads, usable_cores()
    print(f"ktsft {ktsft.__version__}: ISA {info['selected_isa']}, {threads} threads "
          f"({cores} usable cores), dtype {args.dtype}")
    print(f"layer H={H} I={I} E={E} k={k} r={r}, T={T} tokens; "
          f"cache {m.bytes_per_token() / 1024:.1f} KiB/token")

    say("ktsft forward + backward (also the warm-up)...")
    out = m.forward_sft(x, ids, rw)
    dx, grads = m.backward(dO)
    ok = True
    if not args.no_check:
        say(f"float64 reference forward + backward ({_gb(3 * E * I * H * 8)} of float64 "
            "weights; the slow part)...")
        ref_out, ctx = reference.forward(x, ids, rw, *w, *loras, m.lora_scaling)
        ref_dx, ref_g = reference.backward(dO, ctx)
        del ctx
        bar = 1e-5 if args.dtype == "fp32" else 1e-2
        rows = [("out", out, ref_out), ("grad_input", dx, ref_dx)]
        rows += [(n, grads[n], ref_g[n]) for n in ref_g]
        print(f"\nrelative error vs float64 reference (bar {bar:g}):")
        for name, got, want in rows:
            e = _rel(got, want)
            ok &= e <= bar
            print(f"  {name:24s} {e:.2e} {'ok' if e <= bar else 'FAIL'}")
        del rows, ref_out, ref_dx, ref_g
    del out, dx, grads

    def step():
        m.forward_sft(x, ids, rw)
        m.backward(dO)

    flops = 12.0 * H * I * T * k
    eager_step = None
    if torch is not None:
        from ktsft.eager import EagerLoRAExperts

        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        tdt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        say("building the eager PyTorch loop" + (f" (its {_gb(base_bytes // 2)} bf16 copy)"
                                                 if args.dtype == "bf16" else "") + "...")
        eager = EagerLoRAExperts(*w, loras, m.lora_scaling, dtype=tdt)
        xt = torch.from_numpy(x)
        idt, rwt, dOt = torch.from_numpy(ids), torch.from_numpy(rw), torch.from_numpy(dO)

        def eager_step():
            xg = xt.clone().requires_grad_()
            wg = rwt.clone().requires_grad_()
            eager(xg, idt, wg).backward(dOt)

        say("warming up the eager loop...")
        eager_step()
    try:
        t_k, t_e = [], []
        gauge = OtherLoad().start()
        for i in range(args.repeats):  # ABAB: both see the same moments of the machine
            t0 = time.perf_counter()
            step()
            t_k.append(time.perf_counter() - t0)
            msg = f"repeat {i + 1}/{args.repeats}: ktsft {1e3 * t_k[-1]:.1f} ms"
            if eager_step is not None:
                t0 = time.perf_counter()
                eager_step()
                t_e.append(time.perf_counter() - t0)
                msg += f", eager {1e3 * t_e[-1]:.1f} ms"
            say(msg)
        others = gauge.stop()
    finally:
        if torch is not None:
            torch.set_num_threads(prev)

    tk = statistics.median(t_k)
    loadavg = _loadavg()
    load_txt = (f"load average {load_start:.2f} at the start, {loadavg:.2f} now, on {cores} "
                f"usable cores" if load_start is not None else f"{cores} usable cores")
    if others is not None:
        load_txt += f", other processes used {others:.2f} cores during the timing"
    print(f"\nktsft forward+backward: {tk * 1e3:.1f} ms median of {len(t_k)} "
          f"({flops / tk / 1e9:.0f} GFLOP/s base; {load_txt})")
    if t_e:
        te = statistics.median(t_e)
        ratios = [e / k_ for e, k_ in zip(t_e, t_k)]
        print(f"PyTorch eager loop + autograd: {te * 1e3:.1f} ms median of {len(t_e)}, "
              "interleaved with ktsft")
        reasons = verdict(others, load_start, cores, {"ktsft": t_k, "eager": t_e})
        if reasons:
            print("speedup withheld: the machine was busy (" + "; ".join(reasons) + "). "
                  "Contention slows ktsft's multi-threaded step and the eager loop by different, "
                  "shifting factors, so the ratio would mislead; rerun when the machine is quiet"
                  + (", or with --threads 1" if threads > 1 else "") + ".")
        else:
            rng_txt = (f", pairs {min(ratios):.1f}x-{max(ratios):.1f}x" if len(ratios) > 1 else "")
            print(f"-> ktsft is {te / tk:.1f}x faster (interleaved, median of {len(ratios)}"
                  f"{rng_txt}; {load_txt})")
    rss = _peak_rss()
    if rss:
        print(f"peak memory (RSS) {_gb(rss)}, estimated {_gb(mem['peak'])}")
    if not ok:
        raise SystemExit("accuracy check FAILED")
    return 0


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------
def missing_module_message(exc: ImportError, what: str):
    """The install instructions for an optional module `exc` says is
    missing, or None when it is not one of ours (a real bug: re-raise)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in _INSTALL:
        return None
    return (f"{what} needs {name}, which is not installed (or not importable here: {exc}).\n"
            f"To install it:\n  {_INSTALL[name]}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        try:
            from .demo import main as demo_main

            return demo_main(argv[1:])
        except ImportError as e:
            msg = missing_module_message(e, "python -m ktsft demo")
            if msg is None:
                raise
            print(msg, file=sys.stderr)
            return 2
    return layer_check(argv)


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
