"""``python -m bench.numa``: one layer's step with 1, 2, ... NUMA pools
(``threadpool_count``), the pool counts taking turns step by step (paired),
on the same weights.

Prints the machine's nodes, then per token count and pool count: the
median forward and backward, the step time relative to one pool, the share
of tasks a pool ran for another (stolen), and how many of the weights'
pages are on their pool's node.  On a one-node machine the pools cut one
node (what that costs: pinning and a balance kept only by stealing); on a
multi-socket server they are the sockets.  docs/performance.md, "NUMA
pools", has a run and the model of a 2-socket server.

  python -m bench.numa --preset qwen3-30b-a3b --tokens 128,2048 --threads 16 --pools 1,2
"""
from __future__ import annotations

if not __package__:  # run as a file: the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import json
import statistics
import sys
import time

import ktsft
from ktsft import _numa

from . import data, presets
from .contention import Gauge


def _wrapper(shape, isa, threads, pools, base, lora):
    m = ktsft.SFTMoEWrapper(0, shape.E, shape.k, shape.H, shape.I, cpuinfer_threads=threads,
                            threadpool_count=pools, lora_rank=lora[0].shape[1],
                            max_cache_depth=1, dtype="bf16", isa=isa)
    m.load_weights(**base)
    m.init_lora_weights(*lora)
    return m


def run(preset, tokens, threads, pools, reps, isa=None, out=print):
    shape = presets.get(preset)
    base = data.base_weights(shape, "bf16")
    lora = data.lora_weights(shape, 16)
    out(f"nodes (CPUs this process may use): {_numa.topology()}")
    layers = {p: _wrapper(shape, isa, threads, p, base, lora) for p in pools}
    rows = []
    for T in tokens:
        x, g = data.activations(T, shape.H)
        ids, w = data.routing(T, shape, "uniform")
        times = {p: ([], []) for p in pools}
        stolen = {p: [] for p in pools}
        gauge = Gauge().start()
        for i in range(reps + 1):  # step 0 of each: the warm-up
            for p in pools:        # the pool counts take turns
                m = layers[p]
                t0 = time.perf_counter()
                m.forward_sft(x, ids, w)
                t1 = time.perf_counter()
                m.backward(g)
                t2 = time.perf_counter()
                if i:
                    times[p][0].append(t1 - t0)
                    times[p][1].append(t2 - t1)
                    s = m.numa_info()["stolen_tasks"]
                    stolen[p].append(s["forward"] + s["backward"])
        busy = gauge.stop() / max(1e-9, sum(sum(a) + sum(b) for a, b in times.values()))
        one = None
        for p in pools:
            f, b = (1e3 * statistics.median(v) for v in times[p])
            one = f + b if one is None else one
            info = layers[p].numa_info()
            pages = [q["pages"] for q in info["pools"]]
            placed = (None if None in pages else
                      sum(q["pages_on_node"] for q in info["pools"]) / max(1, sum(pages)))
            row = dict(preset=preset, T=T, threads=threads, pools=p, fwd_ms=round(f, 2),
                       bwd_ms=round(b, 2), step_ms=round(f + b, 2),
                       vs_one_pool=round((f + b) / one, 3),
                       stolen_tasks=int(statistics.median(stolen[p])),
                       pages_on_node=None if placed is None else round(placed, 4),
                       other_load_cores=round(busy, 2))
            rows.append(row)
            out(json.dumps(row))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.numa", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(presets.PRESETS))
    ap.add_argument("--tokens", default="128,2048")
    ap.add_argument("--threads", type=int, default=ktsft.wrapper.default_threads())
    ap.add_argument("--pools", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--isa", default=None)
    a = ap.parse_args(argv)
    run(a.preset, [int(t) for t in a.tokens.split(",")], a.threads,
        [int(p) for p in a.pools.split(",")], a.reps, a.isa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
