"""python -m ktsft: build a random layer, run forward + backward, check it
against ktsft.reference (float64) and time it against the PyTorch eager loop.

python -m ktsft demo [--model-size ...]: fine-tune the routed experts' LoRA of
a small MoE model (see ktsft/demo.py and ``python -m ktsft demo --help``)."""
from __future__ import annotations

import argparse
import time

import numpy as np

import ktsft
from ktsft import reference

PRESETS = {  # H, I, E, k
    "small": (1024, 512, 32, 4),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    return layer_check(argv)


def layer_check(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ktsft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch timing")
    args = ap.parse_args(argv)

    H, I, E, k = PRESETS[args.preset]
    T, r = args.tokens, args.rank
    rng = np.random.default_rng(0)
    f = np.float32
    w = [(rng.standard_normal(s, dtype=f) * 0.02) for s in ((E, I, H), (E, I, H), (E, H, I))]
    loras = [(rng.standard_normal(s, dtype=f) * 0.02)
             for s in ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))]
    x = rng.standard_normal((T, H), dtype=f)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int64)
    rw = rng.random((T, k), dtype=f)
    dO = rng.standard_normal((T, H), dtype=f)

    m = ktsft.SFTMoEWrapper(0, E, k, H, I, cpuinfer_threads=args.threads, lora_rank=r,
                            lora_alpha=2.0 * r, dtype=args.dtype)
    m.load_weights(gate_proj=w[0], up_proj=w[1], down_proj=w[2])
    m.init_lora_weights(*loras)
    info = ktsft.cpu_info()
    print(f"ktsft {ktsft.__version__}: ISA {info['selected_isa']}, {m.cpuinfer_threads} threads, "
          f"dtype {args.dtype}")
    print(f"layer H={H} I={I} E={E} k={k} r={r}, T={T} tokens; "
          f"cache {m.bytes_per_token() / 1024:.1f} KiB/token")

    out = m.forward_sft(x, ids, rw)
    dx, grads = m.backward(dO)
    ref_out, ctx = reference.forward(x, ids, rw, *w, *loras, m.lora_scaling)
    ref_dx, ref_g = reference.backward(dO, ctx)
    bar = 1e-5 if args.dtype == "fp32" else 1e-2
    rows = [("out", out, ref_out), ("grad_input", dx, ref_dx)]
    rows += [(n, grads[n], ref_g[n]) for n in ref_g]
    ok = True
    print(f"\nrelative error vs float64 reference (bar {bar:g}):")
    for name, got, want in rows:
        e = _rel(got, want)
        ok &= e <= bar
        print(f"  {name:24s} {e:.2e} {'ok' if e <= bar else 'FAIL'}")

    def step():
        m.forward_sft(x, ids, rw)
        m.backward(dO)

    t_k = _best(step, args.repeats)
    flops = 12.0 * H * I * T * k
    print(f"\nktsft forward+backward: {t_k * 1e3:.1f} ms ({flops / t_k / 1e9:.0f} GFLOP/s base)")
    if not args.no_torch:
        try:
            import torch

            from ktsft.eager import EagerLoRAExperts
        except ImportError:
            print("torch not installed: skipping the eager comparison")
        else:
            prev = torch.get_num_threads()
            torch.set_num_threads(m.cpuinfer_threads)
            try:
                tdt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
                eager = EagerLoRAExperts(*w, loras, m.lora_scaling, dtype=tdt)
                xt = torch.from_numpy(x)
                idt, rwt, dOt = torch.from_numpy(ids), torch.from_numpy(rw), torch.from_numpy(dO)

                def eager_step():
                    xg = xt.clone().requires_grad_()
                    wg = rwt.clone().requires_grad_()
                    eager(xg, idt, wg).backward(dOt)

                t_e = _best(eager_step, max(1, args.repeats - 1))
                print(f"PyTorch eager loop + autograd: {t_e * 1e3:.1f} ms -> ktsft is "
                      f"{t_e / t_k:.1f}x faster")
            finally:
                torch.set_num_threads(prev)
    if not ok:
        raise SystemExit("accuracy check FAILED")


if __name__ == "__main__":
    main()
