"""The sweep: options, the loop over (preset, dtype, routing, T, isa), and
the report (table on stdout; JSON, markdown and PNG under --out)."""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/run.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import gc
import sys
import time
from pathlib import Path

from tqdm import tqdm

import ktsft

from . import check, data, machine, memory, metrics, paths, peers, presets, report, subject
from ktsft._contention import usable_cores

from .contention import wait_for_quiet
from .timing import settle

REAL_PRESETS = [n for n in presets.PRESETS if n != "tiny"]
QUICK = {"preset": ["qwen3-30b-a3b"], "qlen": [128, 512], "repeats": 3, "peer_repeats": 1,
         "quiet_wait": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    info = ktsft.cpu_info()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="ktsft MoE-LoRA forward+backward against measured machine ceilings "
                    "and PyTorch peers (docs/performance.md explains the columns).")
    p.add_argument("--preset", nargs="+", choices=list(presets.PRESETS), default=REAL_PRESETS,
                   help="layer shapes (default: all but tiny)")
    p.add_argument("--qlen", nargs="+", type=int, default=[8, 32, 128, 512],
                   help="tokens per step")
    p.add_argument("--dtype", nargs="+", choices=["bf16", "fp32", "int8", "int4"],
                   default=["bf16", "fp32"],
                   help="int8/int4: quantized base weights (no PyTorch peer; fp32 GEMM peak)")
    p.add_argument("--threads", type=int, default=usable_cores(),
                   help="ktsft cpuinfer_threads and torch threads (default: usable cores)")
    p.add_argument("--routing", nargs="+", choices=["uniform", "skewed"], default=["uniform"],
                   help="expert popularity: uniform, or Zipf-like skewed (fixed seed)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is 32)")
    p.add_argument("--isa", nargs="+", choices=info["runnable_isas"], default=None,
                   help=f"ktsft kernel builds to compare (default: {info['selected_isa']})")
    p.add_argument("--repeats", type=int, default=5, help="timed ktsft steps after one warm-up")
    p.add_argument("--peer-repeats", type=int, default=2,
                   help="timed steps of each PyTorch peer after one warm-up")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each measurement wait up to S seconds for other processes "
                        "to go idle (the cores may be shared; default: don't wait)")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced sweep (< 2 min on 2 cores), i.e. these defaults: {QUICK}")
    p.add_argument("--no-peers", action="store_true", help="skip the PyTorch peers and the check")
    paths.add_out_argument(p, "JSON, markdown and PNG")
    p.add_argument("--tag", default=None, help="output file stem (default: quick or sweep)")
    args = p.parse_args(argv)
    if args.quick:  # --quick only changes defaults: options given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.isa = args.isa or [info["selected_isa"]]
    args.tag = args.tag or ("quick" if args.quick else "sweep")
    args.out = paths.resolve_out(args.out)
    return args


class Sweep:
    """Runs the measurements; rows come out raw (derived columns later,
    once the end-of-run ceilings are known)."""

    def __init__(self, args, bar):
        self.args, self.bar = args, bar
        gmm = None if args.no_peers else peers.grouped_mm_status()
        self.peer_status = ({"eager": "skipped (--no-peers)", "grouped_mm": "skipped (--no-peers)"}
                            if args.no_peers else {"eager": "ok", "grouped_mm": gmm or "ok"})
        self.overhead = {}  # (dtype, isa) -> call overhead, measured once
        self.rows = []

    def run(self) -> list:
        a = self.args
        for preset in a.preset:
            shape = presets.get(preset)
            for dtype in a.dtype:
                self.bar.set_description(f"{preset} {dtype}: generating weights")
                quantized = dtype in metrics.QUANTIZED
                # quantized layers are made from fp32 weights (ktsft quantizes at load)
                base = data.base_weights(shape, "fp32" if quantized else dtype)
                lora = data.lora_weights(shape, a.rank)
                layer = (None if a.no_peers or quantized else
                         peers.TorchLayer(base, lora, subject.LORA_ALPHA / a.rank))
                for routing in a.routing:
                    for T in a.qlen:
                        self._point(shape, dtype, routing, T, base, lora, layer)
                del base, lora, layer  # before the next layer's weights are made
                gc.collect()
        return self.rows

    def _point(self, shape, dtype, routing, T, base, lora, layer) -> None:
        """One (preset, dtype, routing, T): ktsft for every isa, then the
        peers once, then the accuracy check of every isa against them."""
        a = self.args
        x, gout = data.activations(T, shape.H)
        ids, w = data.routing(T, shape, routing)
        where = f"{shape.name} {dtype} {routing} T={T}"
        rows = []
        for isa in a.isa:
            self.bar.set_description(f"{where} ktsft[{isa}]")
            if (dtype, isa) not in self.overhead:
                self.overhead[dtype, isa] = subject.call_overhead_us(dtype, isa, a.threads)
            m = subject.build(shape, dtype, isa, a.rank, a.threads, base, lora)
            wait_for_quiet(a.quiet_wait)
            res = subject.measure(m, x, ids, w, gout, a.repeats)
            del m
            rows.append((self._row(shape, dtype, isa, routing, T, ids, res), res))
        peer_res = {}
        if layer is not None:
            settle()
            impls = [peers.EagerPeer(layer)]
            if self.peer_status["grouped_mm"] == "ok":
                impls.append(peers.GroupedMMPeer(layer))
            for peer in impls:
                self.bar.set_description(f"{where} {peer.name}")
                wait_for_quiet(a.quiet_wait)
                peer_res[peer.name] = peers.measure(peer, x, ids, w, gout, a.threads,
                                                    a.peer_repeats)
            settle()
        for row, res in rows:
            _attach_peers(row, res, peer_res, dtype)
            self.rows.append(row)
            self.bar.update()

    def _row(self, shape, dtype, isa, routing, T, ids, res) -> dict:
        a = self.args
        fl = metrics.flops(shape, T, a.rank)
        n_active = data.active_experts(ids, shape.E)
        ov = self.overhead[dtype, isa]
        return {
            "preset": shape.name, "H": shape.H, "I": shape.I, "E": shape.E, "k": shape.k,
            "T": T, "dtype": dtype, "isa": isa, "routing": routing, "rank": a.rank,
            "threads": a.threads, "active_experts": n_active,
            "fwd_ms": 1e3 * res["fwd_s"], "bwd_ms": 1e3 * res["bwd_s"],
            "flops": fl["total"], "flops_base": fl["base"], "flops_lora": fl["lora"],
            "streamed_bytes": metrics.streamed_bytes(shape, dtype, n_active),
            "extra_mb": res["extra_bytes"] / 1e6, "cache_mb": res["cache_bytes"] / 1e6,
            "weights_mb": res["weight_bytes"] / 1e6,
            "lora_grad_mb": res["lora_grad_bytes"] / 1e6, "cpu_share": res["cpu_share"],
            "other_load": res["other_load"],
            "py_fwd_us": ov["fwd_us"], "py_bwd_us": ov["bwd_us"],
        }


def _attach_peers(row, ours, peer_res, dtype) -> None:
    """Peer times and the accuracy of ktsft against each peer; the table's
    check is the one against the eager loop (the plainest reference)."""
    for name, res in peer_res.items():
        row[name] = {"fwd_ms": 1e3 * res["fwd_s"], "bwd_ms": 1e3 * res["bwd_s"],
                     "other_load": res["other_load"], "check": check.compare(ours, res, dtype)}
    row["check"] = row["eager"]["check"] if "eager" in peer_res else None


def main(argv=None) -> int:
    args = parse_args(argv)
    memory.pin_malloc()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = machine.describe(args.threads)
    print(f"{info['cpu_model']}: {args.threads} threads, ktsft isa {', '.join(args.isa)}; "
          "measuring ceilings...", file=sys.stderr, flush=True)
    ceil_dtypes = sorted({metrics.compute_dtype(d) for d in args.dtype})
    ceil_start = machine.ceilings(ceil_dtypes, args.threads)
    n_rows = len(args.preset) * len(args.dtype) * len(args.routing) * len(args.qlen) * len(args.isa)
    with tqdm(total=n_rows, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        sweep = Sweep(args, bar)
        rows = sweep.run()
    settle()
    # measured again at the end: on a shared machine either may be depressed
    ceil = {"start": ceil_start, "end": machine.ceilings(ceil_dtypes, args.threads)}
    ceil["best"] = machine.best_of(ceil["start"], ceil["end"])
    for row in rows:
        row.update(metrics.derive(row, ceil["best"]))
    elapsed = time.perf_counter() - t0

    text = report.full_text(info, ceil["best"], sweep.peer_status, args, rows, elapsed)
    print(text)
    stem = args.out / args.tag
    report.write_all(stem, text, rows, {
        "machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()},
        "ceilings": ceil["best"], "ceilings_start": ceil["start"], "ceilings_end": ceil["end"],
        "flop_count": f"base 12*H*I per (token, expert) pair; {metrics.LORA_FLOPS_NOTE}",
        "peers": sweep.peer_status, "elapsed_s": elapsed, "rows": rows},
        report.title(info, args.threads, args.rank))
    written = ", ".join(str(stem) + ext for ext in (".json", ".md", ".png")
                        if (stem.parent / (stem.name + ext)).exists())
    print(f"\nwrote {written} ({elapsed:.0f} s)")
    failed = [r for r in rows if r["check"] is not None and not r["check"]["ok"]]
    for r in failed:
        c = r["check"]
        print(f"ACCURACY FAIL: {r['preset']} T={r['T']} {r['dtype']} {r['isa']} {r['routing']}: "
              f"{c['worst']} rel err {c['max_rel_err']:.2e} > {c['tolerance']:.0e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
