"""Where the bf16 products lose time: the same kernels on cached and on
DRAM-resident weights, per-token-block timings, and what one core can read.

    python -m bench.probe [--threads 2] [--out DIR] [--tag probe]   # DIR: ./ktsft-bench-results

Builds bench/probe.c (which includes ktsft's kernel sources) with the flags
of the avx512bf16 unit and runs it; needs a C compiler with OpenMP and a CPU
with AVX512-BF16.  This VM has no hardware performance counters, so this is
the profile behind docs/performance.md's "why the targets are missed".
"""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/probe.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from . import paths

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "ktsft", "_kernels", "src")
INCLUDE = os.path.join(ROOT, "ktsft", "_kernels", "include")
# as the extension builds its ISA units (Python's CFLAGS bring -fwrapv)
FLAGS = ["-O3", "-std=gnu11", "-fwrapv", "-fopenmp", "-fno-math-errno", "-mavx2", "-mfma", "-mf16c",
         "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]


def build(tmp: str) -> str:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        cc = "cc"
    exe = os.path.join(tmp, "probe")
    subprocess.run([cc, *FLAGS, "-I", SRC, "-I", INCLUDE, os.path.join(HERE, "probe.c"),
                    "-o", exe], check=True, capture_output=True, text=True)
    return exe


def probe(exe: str, mode: str, E: int, M: int, distinct: int, threads: int,
          arg: int | None = None, runs: int = 3) -> dict:
    """Best of `runs` processes (each already best of 5 calls): the machine is shared."""
    cmd = [exe, mode, str(E), str(M), str(distinct), str(threads)]
    if arg is not None:
        cmd.append(str(arg))
    best = None
    for _ in range(runs):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out)
        if best is None or res["ms"] < best["ms"]:
            best = res
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    paths.add_out_argument(ap)
    ap.add_argument("--tag", default="probe")
    args = ap.parse_args(argv)
    args.out = str(paths.resolve_out(args.out))
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print("bench.probe: x86-64 only", file=sys.stderr)
        return 2
    th = args.threads
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = build(tmp)
        except subprocess.CalledProcessError as err:
            print("bench.probe: build failed\n" + err.stderr, file=sys.stderr)
            return 2

        def run(name, *a, **kw):
            res = probe(exe, *a, **kw)
            res["name"] = name
            rows.append(res)
            return res

        # 1. the kernels at T=512's 32 tokens per expert: cached vs DRAM weights
        lines.append(f"## 32 tokens per expert (T=512), {th} threads: cached vs DRAM-resident W\n")
        lines.append("| product | W from | ms | GFLOP/s | weight GB/s |")
        lines.append("|---|---|---|---|---|")
        for mode in ("nt", "nn"):
            for distinct, where in ((1, "cache (one 3 MB matrix)"), (0, "DRAM (128 x 3 MB)")):
                r = run(f"{mode}_m32_d{distinct}", mode, 128, 32, distinct, th)
                lines.append(f"| {mode.upper()} | {where} | {r['ms']:.2f} | {r['gflops']:.0f} | "
                             f"{r['weight_gbs']:.1f} |")
        # 2. where the NT kernel waits: every token block of a row block, 1 thread
        lines.append("\n## NT, 32 tokens per expert, 1 thread: TSC ticks per token block "
                     "(6 blocks of 5-6 tokens per 4-row block)\n")
        lines.append("| W from | block 0 (first touch of W) | blocks 1-5 (W in L1/L2) |")
        lines.append("|---|---|---|")
        for distinct, where in ((1, "cache"), (0, "DRAM")):
            r = run(f"nt_ticks_d{distinct}", "nt", 128, 32, distinct, 1)
            t = r["tile_ticks"]
            rest = [x for x in t[1:6] if x > 0]
            lines.append(f"| {where} | {t[0]:.0f} | {sum(rest) / max(len(rest), 1):.0f} |")
        # 3. few tokens: memory-bound; compare with plain reads of the same bytes
        lines.append(f"\n## Few tokens per expert (T=8..128), {th} threads, W from DRAM\n")
        lines.append("| what | tokens per expert | weight GB/s |")
        lines.append("|---|---|---|")
        for R in (1, 4):
            r = run(f"read_r{R}", "read", 128, 1, 0, th, R)
            lines.append(f"| plain loads, {R} row{'s' if R > 1 else ''} at a time | - | "
                         f"{r['weight_gbs']:.1f} |")
        for mode in ("nt", "nn"):
            for M in (1, 2, 4, 8):
                r = run(f"{mode}_m{M}", mode, 128, M, 0, th, 2048 if mode == "nn" else None)
                lines.append(f"| {mode.upper()} kernel | {M} | {r['weight_gbs']:.1f} |")
        # 4. how much one core can have in flight
        lines.append("\n## One core: loads vs software prefetches over the same 1.2 GB\n")
        lines.append("| what | 'GB/s' |")
        lines.append("|---|---|")
        r = run("read_1thr", "read", 128, 1, 0, 1, 1)
        lines.append(f"| plain loads | {r['weight_gbs']:.1f} |")
        for h, name in enumerate(("prefetcht0", "prefetcht1", "prefetcht2", "prefetchnta")):
            r = run(f"prefetch_{name}", "prefetch", 128, 1, 0, 1, h)
            lines.append(f"| {name} only | {r['weight_gbs']:.1f} |")

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    head = f"# bench.probe\n\n{cpu}, {th} threads, {stamp}\n"
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.tag + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump({"machine": cpu, "threads": th, "time": stamp, "rows": rows}, f, indent=1)
    print(f"wrote {os.path.join(args.out, args.tag)}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
