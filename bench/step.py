"""python -m bench.step: the CPU side of one training step of one layer,
measured in one run against the machine's own memory bandwidth.

- the optimizer over the layer's six LoRA matrices: ktsft.optim.CPUAdamW
  against torch.optim.AdamW (for-loop, foreach and fused), each as GB/s of
  the 28 bytes per element AdamW must move (read param, grad, exp_avg,
  exp_avg_sq; write param, exp_avg, exp_avg_sq), beside a STREAM-like triad
  (a = b + s * c) at the same thread count: the machine's ceiling for it;
- zero_grad();
- the layer's forward + backward through the autograd module
  (ktsft.torch.LoRAExperts) against the numpy wrapper's forward_sft +
  backward on the same inputs, interleaved ABAB, medians: the cost of the
  PyTorch integration;
- the ratios the issue sets: (optimizer step + zero_grad) / module
  forward+backward, and module / wrapper.

    python -m bench.step                                  # qwen3-30b-a3b, T=512, bf16
    python -m bench.step --preset tiny --tokens 64 --repeats 3
"""
if not __package__:  # run as a file: python path/to/bench/step.py
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import datetime
import math
import statistics
import time

import torch

import ktsft
from ktsft._contention import OtherLoad, loadavg, usable_cores, verdict
from ktsft.optim import CPUAdamW
from ktsft.torch import LoRAExperts

from .paths import add_out_argument, write_result
from .presets import PRESETS, get
from .timing import best_time, torch_threads

ADAM_BYTES = 28          # per element: 4 reads + 3 writes of fp32
TRIAD_BYTES = 12         # a = b + s * c: 2 reads + 1 write
TRIAD_ELEMS = 1 << 27    # 3 x 512 MiB: far beyond any cache


def triad_gbs(threads, repeats):
    """Best GB/s of torch.add(b, c, alpha=s, out=a) over 512 MiB arrays."""
    b = torch.ones(TRIAD_ELEMS)
    c = torch.ones(TRIAD_ELEMS)
    a = torch.empty(TRIAD_ELEMS)
    with torch_threads(threads):
        t = best_time(lambda: torch.add(b, c, alpha=0.5, out=a), repeats, warmup=1)
    return TRIAD_BYTES * TRIAD_ELEMS / t / 1e9


def _layer(shape, r, dtype, threads, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = LoRAExperts(shape.E, shape.k, shape.H, shape.I, r=r, alpha=2.0 * r, dtype=dtype,
                    threads=threads)
    H, I, E = shape.H, shape.I, shape.E
    w = [torch.randn((E, I, H), generator=g) / math.sqrt(H),
         torch.randn((E, I, H), generator=g) / math.sqrt(H),
         torch.randn((E, H, I), generator=g) / math.sqrt(I)]
    m.load_weights(*w)
    del w
    with torch.no_grad():
        for p in m.lora_parameters():
            p.normal_(0, 0.01, generator=g)
    return m


def _inputs(shape, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, shape.H, generator=g)
    ids = torch.stack([torch.randperm(shape.E, generator=g)[:shape.k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, shape.k, generator=g), -1)
    dO = torch.randn(T, shape.H, generator=g)
    return x, ids, w, dO


def optimizer_times(m, threads, repeats):
    """{name: seconds per step} over the module's LoRA parameters, each
    optimizer from the same gradients; zero_grad timed on its own."""
    params = m.lora_parameters()
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    out = {}
    cands = {
        "ktsft CPUAdamW": lambda ps: CPUAdamW(ps, lr=1e-4, threads=threads),
        "torch AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    saved = [p.detach().clone() for p in params]
    for name, make in cands.items():
        opt = make(params)
        for p, gr in zip(params, grads):
            p.grad = gr
        with torch_threads(threads):
            try:
                out[name] = best_time(opt.step, repeats, warmup=1)
            except (RuntimeError, TypeError) as e:  # fused not built for this CPU/torch
                out[name] = None
                print(f"  ({name}: {type(e).__name__}: {e})")
        del opt
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    opt = CPUAdamW(params, lr=1e-4, threads=threads)

    def zero():
        for p, gr in zip(params, grads):
            p.grad = gr
        t0 = time.perf_counter()
        opt.zero_grad()
        return time.perf_counter() - t0

    out["zero_grad"] = min(zero() for _ in range(repeats))
    for p in params:
        p.grad = None
    return out


def step_pair(m, x, ids, w, dO, repeats):
    """Interleaved medians of the module's forward+backward and the
    wrapper's forward_sft+backward on the same inputs."""
    wr = m.wrapper
    xs, ids_np, ws, dOs = x.numpy(), ids.numpy(), w.numpy(), dO.numpy()

    def module():
        xr = x.clone().requires_grad_()
        wr_ = w.clone().requires_grad_()
        t0 = time.perf_counter()
        m(xr, ids, wr_).backward(dO)
        return time.perf_counter() - t0

    def wrapper():
        t0 = time.perf_counter()
        wr.forward_sft(xs, ids_np, ws, save_for_backward=True)
        wr.backward(dOs)
        return time.perf_counter() - t0

    module(), wrapper()  # warm-up: buffers, first-touch pages
    tm, tw = [], []
    for _ in range(repeats):
        tm.append(module())
        tw.append(wrapper())
    m.zero_grad()
    return tm, tw


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS),
                    help="layer shape (qwen3-30b-a3b: 1.2 GB of bf16 base weights, "
                         "about 2.5 GB peak)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--repeats", type=int, default=7)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    shape = get(args.preset)
    load0 = loadavg()
    print(f"bench.step: {shape.name} (H={shape.H}, I={shape.I}, E={shape.E}, k={shape.k}), "
          f"T={args.tokens}, r={args.rank}, {args.dtype}, {args.threads} threads, "
          f"ISA {ktsft.cpu_info()['selected_isa']}", flush=True)
    gauge = OtherLoad().start()
    triad = triad_gbs(args.threads, args.repeats)
    m = _layer(shape, args.rank, args.dtype, args.threads)
    n = sum(p.numel() for p in m.lora_parameters())
    opt = optimizer_times(m, args.threads, args.repeats)
    x, ids, w, dO = _inputs(shape, args.tokens)
    tm, tw = step_pair(m, x, ids, w, dO, args.repeats)
    others = gauge.stop()
    cores = usable_cores()
    reasons = verdict(others, load0, cores, {"module": tm, "wrapper": tw}, reference="wrapper")
    t_mod, t_wr = statistics.median(tm), statistics.median(tw)
    floor = ADAM_BYTES * n / (triad * 1e9)
    rows = []
    for name, t in opt.items():
        if name == "zero_grad" or t is None:
            continue
        rows.append(dict(optimizer=name, ms=1e3 * t, gbs=ADAM_BYTES * n / t / 1e9,
                         x_bandwidth_floor=t / floor))
    kt = opt["ktsft CPUAdamW"]
    res = dict(
        when=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=ktsft.cpu_info()["selected_isa"], preset=shape.name, tokens=args.tokens,
        rank=args.rank, dtype=args.dtype, threads=args.threads, lora_elements=n,
        triad_gbs=triad, adam_floor_ms=1e3 * floor, optimizers=rows,
        zero_grad_ms=1e3 * opt["zero_grad"],
        module_ms=1e3 * t_mod, wrapper_ms=1e3 * t_wr,
        module_rounds_ms=[1e3 * t for t in tm], wrapper_rounds_ms=[1e3 * t for t in tw],
        optimizer_share=(kt + opt["zero_grad"]) / t_mod, module_over_wrapper=t_mod / t_wr,
        load={"other_processes_cores": others, "loadavg_at_start": load0, "cores": cores,
              "busy": bool(reasons), "note": "; ".join(reasons) or "quiet"})
    print(f"\nmemory: triad {triad:.1f} GB/s -> AdamW floor {1e3 * floor:.1f} ms for "
          f"{n / 1e6:.1f} M fp32 parameters ({ADAM_BYTES} B each)")
    print(f"{'optimizer':26s} {'ms/step':>9s} {'GB/s':>7s} {'x floor':>8s}")
    for r in rows:
        print(f"{r['optimizer']:26s} {r['ms']:9.1f} {r['gbs']:7.1f} {r['x_bandwidth_floor']:8.2f}")
    print(f"zero_grad {1e3 * opt['zero_grad']:.3f} ms")
    print(f"forward+backward, interleaved medians of {args.repeats}: LoRAExperts "
          f"{1e3 * t_mod:.1f} ms, wrapper forward_sft+backward {1e3 * t_wr:.1f} ms "
          f"-> module / wrapper {t_mod / t_wr:.3f}")
    print(f"(CPUAdamW step + zero_grad) / module forward+backward = "
          f"{100 * res['optimizer_share']:.1f}%")
    print("machine: " + (f"BUSY ({res['load']['note']}): ratios are suspect" if reasons
                         else f"quiet (other processes {others or 0:.2f} cores)"))
    write_result(args.out, f"step_{shape.name}_T{args.tokens}_{args.dtype}_t{args.threads}.json",
                 res)
    return res


if __name__ == "__main__":
    main()
