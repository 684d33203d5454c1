"""ktsft beside the AMX-based incumbent's published step times (issue 7).

    python -m bench.incumbent --isa amx avx512bf16 --threads 2 15 16

Same shapes as the incumbent's table: the Qwen3-30B-A3B layer (H=2048,
I=768, E=128, k=8, r=16, bf16 weights, uniform random routing) at qlen 128,
512 and 2048, and a DeepSeek-V3-sized expert layer (H=7168, I=2048, E=16,
k=8, qlen 512).  Median forward+backward per call after a warm-up, the
phase split of the last call, and (``--accuracy``) every output of one
step against the float64 reference.  Writes <out>/<tag>.json and .md."""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/incumbent.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import json
import statistics
import time

import numpy as np

import ktsft

from . import machine, paths, presets
from .data import activations, base_weights, lora_weights, routing
from .metrics import flops
from .subject import build

# the incumbent on the device's Xeon (family 6 model 207), median ms per
# forward+backward, as given in the issue
INCUMBENT = {
    ("qwen3-30b-a3b", 128): {"amx": {2: 250, 15: 96}, "avx512bf16": {2: 339}},
    ("qwen3-30b-a3b", 512): {"amx": {2: 355, 15: 85}, "avx512bf16": {2: 747}},
    ("qwen3-30b-a3b", 2048): {"amx": {2: 835, 15: 176}, "avx512bf16": {2: 2707}},
    ("deepseek-v3-expert", 512): {"amx": {16: 332}},
}
DEFAULT_RUNS = [("qwen3-30b-a3b", 128), ("qwen3-30b-a3b", 512), ("qwen3-30b-a3b", 2048),
                ("deepseek-v3-expert", 512)]


def step_times(m, x, ids, w, g, repeats: int):
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        m.forward_sft(x, ids, w)
        m.backward(g)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def accuracy(shape, isa: str, T: int, rank: int) -> dict:
    """Relative error of every output of one bf16 step vs float64."""
    from ktsft import reference

    base = base_weights(shape, "bf16")
    lora = lora_weights(shape, rank)
    ids, w = routing(T, shape, "uniform")
    x, g = activations(T, shape.H)
    m = build(shape, "bf16", isa, rank, 2, base, lora)
    out = np.array(m.forward_sft(x, ids, w))
    dx, grads = m.backward(g)
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ref_out, ctx = reference.forward(x, ids, w, f(base["gate_proj"]), f(base["up_proj"]),
                                     f(base["down_proj"]), *lora, 32.0 / rank)
    ref_dx, ref_g = reference.backward(g, ctx)
    err = lambda a, b: float(np.linalg.norm(f(a) - f(b)) / np.linalg.norm(f(b)))  # noqa: E731
    res = {"out": err(out, ref_out), "grad_input": err(dx, ref_dx)}
    res.update({n: err(grads[n], ref_g[n]) for n in ref_g})
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", nargs="+", default=["amx", "avx512bf16"])
    p.add_argument("--threads", nargs="+", type=int, default=[2, 15, 16])
    p.add_argument("--runs", nargs="+", default=None,
                   help="preset:qlen pairs (default: the incumbent's table)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--accuracy", action="store_true", help="check one qlen-128 step vs float64")
    paths.add_out_argument(p)
    p.add_argument("--tag", default="incumbent")
    args = p.parse_args(argv)
    args.out = paths.resolve_out(args.out)
    runs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs
            else DEFAULT_RUNS)
    info = ktsft.cpu_info()
    isas = [i for i in args.isa if i in info["runnable_isas"]]
    rows = []
    for name in dict.fromkeys(n for n, _ in runs):
        shape = presets.get(name)
        base = base_weights(shape, "bf16")
        lora = lora_weights(shape, args.rank)
        for pname, T in runs:
            if pname != name:
                continue
            ids, w = routing(T, shape, "uniform")
            x, g = activations(T, shape.H)
            fl = flops(shape, T, args.rank)["total"]
            for isa in isas:
                for t in args.threads:
                    m = build(shape, "bf16", isa, args.rank, t, base, lora)
                    ts = step_times(m, x, ids, w, g, args.repeats)
                    ph = m.phase_times()
                    med = statistics.median(ts)
                    inc = INCUMBENT.get((name, T), {}).get(isa, {}).get(t)
                    inc_amx = INCUMBENT.get((name, T), {}).get("amx", {})
                    best = min(inc_amx.values()) if inc_amx else None
                    row = {"preset": name, "T": T, "isa": isa, "threads": t, "ms": 1e3 * med,
                           "min_ms": 1e3 * min(ts), "gflops": fl / med / 1e9,
                           "incumbent_same_ms": inc, "incumbent_amx_best_ms": best,
                           "phases_ms": {d: {k: round(1e3 * v, 2) for k, v in ph[d].items()}
                                         for d in ph}}
                    rows.append(row)
                    print(f"{name} T={T} {isa} threads={t}: {1e3 * med:.1f} ms "
                          f"({fl / med / 1e9:.0f} GFLOP/s)"
                          + (f", incumbent {inc} ms" if inc else "")
                          + (f", incumbent AMX best {best} ms" if best else ""), flush=True)
                    del m
        del base
    acc = {}
    if args.accuracy:
        shape = presets.get("qwen3-30b-a3b")
        for isa in isas:
            acc[isa] = accuracy(shape, isa, 128, args.rank)
            print(f"accuracy {isa}: max rel err {max(acc[isa].values()):.2e}", flush=True)
    bw = {t: machine.read_bandwidth_gbs(t) for t in sorted({min(args.threads), max(args.threads)})}
    print("read bandwidth: " + ", ".join(f"{t} threads {v:.1f} GB/s" for t, v in bw.items()))
    head = (f"{machine.cpu_model()}, ktsft {ktsft.__version__}, bf16, r={args.rank}, "
            f"uniform routing, median of {args.repeats} after a warm-up, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines = [head, "", "Read bandwidth (numpy, same run): " +
             ", ".join(f"{t} threads {v:.1f} GB/s" for t, v in bw.items()), "", "| layer | qlen | ISA | threads | ktsft ms | GFLOP/s | incumbent, same ISA and threads | "
             "incumbent AMX, its best |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['T']} | {r['isa']} | {r['threads']} | {r['ms']:.0f} | "
                     f"{r['gflops']:.0f} | {r['incumbent_same_ms'] or '-'} | "
                     f"{r['incumbent_amx_best_ms'] or '-'} |")
    if acc:
        lines += ["", "Accuracy, qwen3-30b-a3b qlen 128, relative error vs float64:", ""]
        for isa, e in acc.items():
            lines.append(f"- {isa}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.md").write_text(text)
    (args.out / f"{args.tag}.json").write_text(json.dumps(
        {"header": head, "cpu_info": info, "rows": rows, "accuracy": acc, "read_gbs": bw}, indent=1, default=str))
    print(f"wrote {args.out / args.tag}.md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
