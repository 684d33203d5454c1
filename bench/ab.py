"""A/B of two builds in one session: median forward+backward (ms) and the
phase split of a Qwen3-30B-A3B bf16 layer, one JSON line per (ISA, threads, T).

    PYTHONPATH=<build A> python -m bench.ab A; PYTHONPATH=<build B> python -m bench.ab B; ...

Alternate the builds several times in one session (the machines are shared
and drift 10-20% between minutes): bench/results/xeon_ab_*.jsonl came from
four alternations on the lent Xeon.  ISAS, THS, TS (space-separated env
variables) pick the ISA builds, thread counts and token counts.  Weights are
8 random experts tiled to E (fast to make; values do not matter for speed).
"""

if not __package__:  # run as a file (python path/to/bench/ab.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import json, os, sys, time
import numpy as np
import ktsft
H, I, E, k, r = 2048, 768, 128, 8, 16
rng = np.random.default_rng(0)
def w(shape):
    base = (rng.standard_normal((8,) + shape[1:], dtype=np.float32) * 0.02).view(np.uint32)
    b16 = ((base + 0x7FFF + ((base >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(np.tile(b16, (shape[0] // 8, 1, 1)))
import ml_dtypes
gate, up, down = [a.view(ml_dtypes.bfloat16) for a in (w((E, I, H)), w((E, I, H)), w((E, H, I)))]
shapes = [(E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r)]
lora = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shapes]
tag = sys.argv[1]
ISAS = os.environ.get("ISAS", "amx avx512bf16").split()
THS = [int(t) for t in os.environ.get("THS", "2 16").split()]
TS = [int(t) for t in os.environ.get("TS", "128 512 2048").split()]
for isa in ISAS:
    for th in THS:
        m = ktsft.SFTMoEWrapper(0, E, k, H, I, cpuinfer_threads=th, lora_rank=r, lora_alpha=32.0,
                                dtype="bf16", isa=isa)
        m.load_weights(gate_proj=gate, up_proj=up, down_proj=down)
        m.init_lora_weights(*lora)
        for T in TS:
            x = rng.standard_normal((T, H), dtype=np.float32)
            ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int64)
            rw = rng.uniform(0, 1, (T, k)).astype(np.float32)
            dO = rng.standard_normal((T, H), dtype=np.float32)
            ts, ph = [], {}
            for rep in range(4):
                t0 = time.perf_counter(); m.forward_sft(x, ids, rw); m.backward(dO)
                ts.append(time.perf_counter() - t0)
                if rep:
                    for d, v in m.phase_times().items():
                        for n, s in v.items():
                            ph.setdefault(d[0] + ":" + n, []).append(s * 1e3)
            print(json.dumps({"tag": tag, "isa": isa, "threads": th, "T": T,
                              "ms": round(float(np.median(ts[1:])) * 1e3, 1),
                              "phases": {n: round(float(np.median(v)), 1) for n, v in ph.items()
                                         if np.median(v) > 0.5}}), flush=True)
