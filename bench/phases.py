"""python -m bench.phases: the native phases of one layer's forward and
backward (MoEKernel.last_phase_times) against the thread count: which
phases scale and which do not.

    python -m bench.phases --preset qwen3-30b-a3b --tokens 512 2048 --threads 1 2 4 8 16
"""
if not __package__:  # run as a file: python path/to/bench/phases.py
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import statistics

import torch

import ktsft

from .paths import add_out_argument, write_result
from .presets import PRESETS, get
from .step import _inputs, _layer


def measure(m, T, shape, repeats, dtype="bf16"):
    x, ids, w, dO = _inputs(shape, T)
    if dtype == "bf16":  # the other layers take fp32 activations
        x, dO = x.to(torch.bfloat16), dO.to(torch.bfloat16)
    wr = m.wrapper
    rows = []
    for i in range(repeats + 1):
        _, h = wr.forward_sft(x, ids, w, save_for_backward=True, return_handle=True)
        wr.backward(dO, handle=h)
        if i:
            rows.append(wr.phase_times())
    out = {}
    for part in ("forward", "backward"):
        out[part] = {k: 1e3 * statistics.median(r[part][k] for r in rows) for k in rows[0][part]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "int8", "int4"],
                    help="base weights (int8/int4: quantized, fp32 activations)")
    ap.add_argument("--repeats", type=int, default=3)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    shape = get(args.preset)
    m = _layer(shape, 16, args.dtype, max(args.threads))
    res = {"preset": shape.name, "dtype": args.dtype, "isa": ktsft.cpu_info()["selected_isa"],
           "rows": []}
    for T in args.tokens:
        for n in args.threads:
            m.wrapper.cpuinfer_threads = n
            ph = measure(m, T, shape, args.repeats, args.dtype)
            res["rows"].append({"tokens": T, "threads": n, **ph})
            f, b = ph["forward"], ph["backward"]
            print(f"T={T:5d} threads={n:2d} fwd {sum(f.values()):7.1f} ms "
                  + " ".join(f"{k} {v:.1f}" for k, v in f.items()), flush=True)
            print(f"{'':19s} bwd {sum(b.values()):7.1f} ms "
                  + " ".join(f"{k} {v:.1f}" for k, v in b.items()), flush=True)
    write_result(args.out, f"phases_{shape.name}_{args.dtype}.json", res)


if __name__ == "__main__":
    main()
