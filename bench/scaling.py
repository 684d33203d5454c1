"""Thread scaling: ktsft forward+backward at several thread counts, one
process, same weights and inputs, with parallel efficiency against 1 thread.

    python -m bench.scaling --threads 1 2 4 8 16 --qlen 256 2048 --dtype bf16

Parallel efficiency(t) = time(1 thread) / (t * time(t threads)).  Writes
<out>/<tag>.json and .md (default tag: scaling)."""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/scaling.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import json
import time

import ktsft

from . import machine, paths, presets
from .data import activations, base_weights, lora_weights, routing
from .metrics import compute_dtype, flops
from .subject import build, measure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=list(presets.PRESETS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--qlen", nargs="+", type=int, default=[256, 2048])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--routing", default="uniform", choices=["uniform", "skewed"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    paths.add_out_argument(p)
    p.add_argument("--tag", default="scaling")
    args = p.parse_args(argv)
    args.out = paths.resolve_out(args.out)

    shape = presets.get(args.preset)
    info = ktsft.cpu_info()
    base = base_weights(shape, args.dtype)
    lora = lora_weights(shape, args.rank)
    rows = []
    for T in args.qlen:
        ids, w = routing(T, shape, args.routing)
        x, g = activations(T, shape.H)
        fl = flops(shape, T, args.rank)["total"]
        t1 = None
        for t in args.threads:
            m = build(shape, args.dtype, None, args.rank, t, base, lora)
            r = measure(m, x, ids, w, g, args.repeats)
            step = r["fwd_s"] + r["bwd_s"]
            if t1 is None:
                t1 = step  # the first thread count is the reference
            eff = (t1 * args.threads[0]) / (t * step)
            rows.append({"T": T, "threads": t, "fwd_ms": 1e3 * r["fwd_s"], "bwd_ms": 1e3 * r["bwd_s"],
                         "tok_s": T / step, "gflops": fl / step / 1e9, "parallel_eff": eff,
                         "other_load": r["other_load"]})
            print(f"T={T:5d} threads={t:3d} fwd {1e3 * r['fwd_s']:8.1f} ms bwd {1e3 * r['bwd_s']:8.1f} ms "
                  f"{fl / step / 1e9:7.0f} GFLOP/s  parallel eff {100 * eff:5.1f}%", flush=True)
            del m
    peak_dtype = compute_dtype(args.dtype)  # bf16 without bf16 hardware: the fp32 peak
    peaks = {t: max(machine.gemm_peak(peak_dtype, t, repeats=3).values())
             for t in (args.threads[0], args.threads[-1])}
    head = (f"{machine.cpu_model()}, {args.preset}, {args.dtype}, r={args.rank}, "
            f"ktsft {ktsft.__version__} isa {info['selected_isa']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines = [head, "", f"torch GEMM peak ({peak_dtype}): " +
             ", ".join(f"{t} threads {v:.0f} GFLOP/s" for t, v in peaks.items()), "",
             "| T | threads | fwd ms | bwd ms | tokens/s | GFLOP/s | parallel efficiency | other load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['threads']} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['tok_s']:.0f} | "
                     f"{r['gflops']:.0f} | {100 * r['parallel_eff']:.0f}% | {r['other_load']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.md").write_text(text)
    (args.out / f"{args.tag}.json").write_text(json.dumps(
        {"header": head, "cpu_info": info, "gemm_peak": peaks, "rows": rows}, indent=1, default=str))
    print(f"wrote {args.out / args.tag}.md, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
