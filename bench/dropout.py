"""LoRA-dropout overhead: ``python -m bench.dropout [--iters N] [--threads T]``.

One layer of the Qwen3-30B-A3B shape (H=2048, I=768, E=128, k=8, r=16), T=512
tokens, bf16, forward_sft + backward with lora_dropout=0 and 0.1 alternated
in one process (so drifting machine load hits both alike); prints the median
step and per-phase times of each and the relative overhead."""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/dropout.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import time

import ml_dtypes
import numpy as np

import ktsft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args(argv)
    H, I, E, k, r, T = 2048, 768, 128, 8, 16, a.tokens
    rng = np.random.default_rng(0)
    m = ktsft.SFTMoEWrapper(0, E, k, H, I, cpuinfer_threads=a.threads, lora_rank=r,
                            lora_alpha=32.0, dtype="bf16", chunked_prefill_size=T,
                            lora_dropout=a.p, dropout_seed=1)

    def w(shape, fan):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan)).astype(
            ml_dtypes.bfloat16)

    m.load_weights(gate_proj=w((E, I, H), H), up_proj=w((E, I, H), H), down_proj=w((E, H, I), I))
    m.init_lora_weights(*[0.02 * rng.standard_normal(s, dtype=np.float32) for s in
                          [(E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r)]])
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids = np.argsort(-rng.standard_normal((T, E)), axis=1)[:, :k].astype(np.int64)
    rw = rng.uniform(0.05, 0.3, (T, k)).astype(np.float32)
    dO = rng.standard_normal((T, H), dtype=np.float32)
    ps = (0.0, a.p)
    res = {p: {"step": [], "phases": []} for p in ps}
    for it in range(a.iters + 2):
        for p in (ps if it % 2 == 0 else ps[::-1]):
            t0 = time.perf_counter()
            m.forward_sft(x, ids, rw, lora_dropout=p)
            m.backward(dO)
            if it >= 2:  # warm-up: page faults, first-touch of the caches
                res[p]["step"].append(time.perf_counter() - t0)
                res[p]["phases"].append(m.phase_times())
    print(f"ktsft {ktsft.cpu_info()['selected_isa']}, {a.threads} threads, T={T} bf16, "
          f"{a.iters} steps each")
    med = {}
    for p in ps:
        med[p] = float(np.median(res[p]["step"]))
        ph = {}
        for rec in res[p]["phases"]:
            for d, times in rec.items():
                for n, v in times.items():
                    ph.setdefault(f"{d[0]}.{n}", []).append(v)
        print(f"p={p}: step {med[p] * 1e3:.1f} ms (min {min(res[p]['step']) * 1e3:.1f}); "
              + "  ".join(f"{n} {np.median(v) * 1e3:.1f}" for n, v in ph.items()))
    print(f"overhead of lora_dropout={a.p}: {100 * (med[a.p] / med[0.0] - 1):+.1f}% of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
