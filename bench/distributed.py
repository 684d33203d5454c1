"""``python -m bench.distributed``: step time and communication share of
expert parallelism on local processes (gloo on loopback).

Every configuration trains the same layer on the same global batch: one
process holding all experts (``ktsft.torch.LoRAExperts``), then
``ExpertParallelLoRAExperts`` on 2 and 4 ranks, each rank with
global_tokens / ranks tokens.  Per timed step (after a barrier): forward +
backward wall time; time inside torch.distributed calls (transfer and
waiting for slower peers); payload bytes sent to other ranks.  The ranks
share this machine's cores, so "ranks" here measures the protocol's cost,
not a speed-up.

    python -m bench.distributed                       # Qwen3-30B-A3B layer, bf16, 512 tokens
    python -m bench.distributed --ranks 1 2 --steps 3 --hidden 256 --inter 128 --experts 16
"""
from __future__ import annotations

if not __package__:  # run as a file (python path/to/bench/distributed.py): the package's module
    import os as _os, sys as _sys
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    from bench.paths import as_package
    __package__ = as_package(__file__)

import argparse
import os
import statistics
import time


def _busy_ticks() -> int:
    """System-wide busy CPU ticks (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle


def _worker(rank, world, cfg):
    import torch
    import torch.distributed as dist

    import ktsft.torch as kt
    from ktsft.distributed import STATS, ExpertParallelLoRAExperts

    torch.set_num_threads(cfg["threads"])
    E, k, H, I, r = cfg["experts"], cfg["top_k"], cfg["hidden"], cfg["inter"], cfg["rank"]
    dtype = cfg["dtype"]
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    if cfg["mode"] == "single":
        m = kt.LoRAExperts(E, k, H, I, r=r, alpha=2.0 * r, dtype=dtype, threads=cfg["threads"])
        lo, hi = 0, E
    else:
        m = ExpertParallelLoRAExperts(E, k, H, I, r=r, alpha=2.0 * r, dtype=dtype,
                                      threads=cfg["threads"])
        lo, hi = m.expert_range
    g = torch.Generator().manual_seed(1234 + lo)
    # only this rank's experts are ever generated: weights std 0.02, in the storage dtype
    w = [torch.empty((hi - lo, *s), dtype=store) for s in ((I, H), (I, H), (H, I))]
    for t in w:
        for e in range(hi - lo):
            t[e] = (torch.randn(t.shape[1:], generator=g) * 0.02).to(store)
    m.load_weights(*w)
    with torch.no_grad():
        for p in m.lora_parameters():
            if not p.any():
                p.normal_(0, 0.01, generator=g)
    T = cfg["tokens"] // world
    gb = torch.Generator().manual_seed(99 + rank)
    x = torch.randn(T, H, generator=gb).to(store)
    ids = torch.rand(T, E, generator=gb).topk(k, dim=1).indices       # k distinct, uniform
    wts = torch.softmax(torch.randn(T, k, generator=gb), dim=1)
    dO = torch.randn(T, H, generator=gb).to(store)

    def step():
        out = m(x, ids, wts)
        out.backward(dO)

    step()  # warm-up: caches, workspaces, lazy gradient buffers
    times, comm, local = [], [], []
    STATS.reset()
    STATS.enabled = True
    dist.barrier()
    busy0, wall0, cpu0 = _busy_ticks(), time.perf_counter(), time.process_time()
    for _ in range(cfg["steps"]):
        dist.barrier()
        c0, l0 = STATS.seconds, STATS.local_seconds
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        comm.append(STATS.seconds - c0)
        local.append(STATS.local_seconds - l0)
    STATS.enabled = False
    dist.barrier()
    busy1, wall1, cpu1 = _busy_ticks(), time.perf_counter(), time.process_time()
    # the model's bytes: rows and pairs this rank sends to and gets from other ranks
    owner = torch.repeat_interleave(torch.arange(world), torch.tensor(
        [(E // world) + (i < E % world) for i in range(world)]))
    own = owner[ids]
    remote_rows = sum(len(set(own[t].tolist()) - {rank}) for t in range(T))
    remote_pairs = int((own != rank).sum())
    return {"times": times, "comm": comm, "local": local, "bytes": STATS.bytes_sent / cfg["steps"], "T": T,
            "remote_rows": remote_rows, "remote_pairs": remote_pairs,
            "cpu": cpu1 - cpu0, "busy": (busy1 - busy0) / os.sysconf("SC_CLK_TCK"),
            "wall": wall1 - wall0, "elem": 2 if dtype == "bf16" else 4}


def run(cfg, ranks):
    from .contention import wait_for_quiet

    rows = []
    for world in ranks:
        c = dict(cfg, mode="single" if world == 1 else "ep",
                 threads=cfg["threads"] or max(1, (os.cpu_count() or 1) // world))
        for attempt in range(cfg["retries"] + 1):  # a run disturbed by other processes is redone
            if cfg["quiet_wait"]:
                wait_for_quiet(cfg["quiet_wait"])
            row = _measure(c, world)
            if row["other_load"] < 0.3:
                break
        rows.append(row)
    return rows


def _measure(c, world):
    from ktsft.distributed import run_local

    res = run_local(_worker, world, (c,), timeout=c["timeout"])  # 1 rank: a group for barrier()
    steps = range(c["steps"])
    med = statistics.median
    step = med(max(r["times"][i] for r in res) for i in steps)
    comm = med(statistics.mean(r["comm"][i] for r in res) for i in steps)
    local = med(statistics.mean(r["local"][i] for r in res) for i in steps)
    rest = med(statistics.mean(r["times"][i] - r["comm"][i] - r["local"][i] for r in res)
               for i in steps)
    tokens = sum(r["T"] for r in res)
    H, b = c["hidden"], res[0]["elem"]
    # per step: 2 row transfers out (x fwd, grad_out bwd) and 2 back (out, grad_x), 12 + 4 B per pair
    model = sum(4 * H * b * r["remote_rows"] + 16 * r["remote_pairs"] for r in res)
    other = max(0.0, (res[0]["busy"] - sum(r["cpu"] for r in res)) / res[0]["wall"])
    return {"ranks": world, "threads": c["threads"], "tokens_per_rank": tokens // world,
            "step_ms": 1e3 * step, "tok_s": tokens / step, "comm_ms": 1e3 * comm,
            "local_ms": 1e3 * local, "rest_ms": 1e3 * rest, "comm_share": comm / step,
            "bytes_per_token": sum(r["bytes"] for r in res) / tokens,
            "model_bytes_per_token": model / tokens,
            "rows_per_token": sum(r["remote_rows"] for r in res) / tokens,
            "other_load": other}
    return rows


def render(cfg, rows) -> str:
    head = (f"layer H={cfg['hidden']}, I={cfg['inter']}, E={cfg['experts']}, k={cfg['top_k']}, "
            f"r={cfg['rank']}, {cfg['dtype']}; global batch {cfg['tokens']} tokens; "
            f"median of {cfg['steps']} steps\n\n")
    out = ["| ranks | threads/rank | tokens/rank | step ms | tokens/s | in collectives ms | "
           "comm share | owner's experts ms | rest ms | bytes sent /token (measured) | model | "
           "remote rows /token | other load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        single = r["ranks"] == 1
        comm = "-" if single else f"{r['comm_ms']:.1f}"
        share = "-" if single else f"{100 * r['comm_share']:.0f}%"
        local = "-" if single else f"{r['local_ms']:.1f}"
        rest = "-" if single else f"{r['rest_ms']:.1f}"
        name = f"{r['ranks']} (LoRAExperts)" if single else str(r["ranks"])
        out.append(f"| {name} | {r['threads']} | {r['tokens_per_rank']} | {r['step_ms']:.1f} | "
                   f"{r['tok_s']:.0f} | {comm} | {share} | {local} | {rest} | "
                   f"{r['bytes_per_token']:.0f} | "
                   f"{r['model_bytes_per_token']:.0f} | {r['rows_per_token']:.2f} | "
                   f"{r['other_load']:.2f} |")
    return head + "\n".join(out) + "\n"


def expected_remote(E: int, k: int, N: int) -> tuple[float, float]:
    """(distinct remote owner ranks, remote pairs) per token when a token
    picks k distinct experts uniformly and N ranks own E / N each."""
    from math import comb

    if N == 1:
        return 0.0, 0.0
    per = E // N
    p_none = comb(E - per, k) / comb(E, k)   # a given rank owns none of the token's experts
    return (N - 1) * (1 - p_none), k * (N - 1) / N


def network_model(H=7168, I=2048, E=256, k=8, layers=58, r=16, act_bytes=2, servers=(2, 4, 8),
                  gbps=(25, 100, 400), tflops=(1, 4, 16), tokens=8192, efficiency=0.7) -> str:
    """Markdown: per-token bytes and FLOPs, and a step-time model of expert
    parallelism on `servers` machines (see docs/distributed.md)."""
    pair_flops = 12 * H * I + 18 * r * (H + I)
    tok_flops = k * layers * pair_flops
    out = [f"H={H}, I={I}, E={E}, k={k}, {layers} MoE layers, r={r}, {8 * act_bytes}-bit "
           f"activations; FLOPs per (token, expert) pair fwd+bwd = {pair_flops / 1e6:.1f} M; "
           f"global batch {tokens} tokens; links at {100 * efficiency:.0f}% of line rate, "
           "communication not overlapped with compute\n",
           "| servers | remote owners /token | wire KB /token /layer | compute s (1 / 4 / 16 "
           "TFLOP/s per server) | network s at " + " / ".join(f"{g}" for g in gbps) + " Gb/s | "
           "network = compute at (TFLOP/s per server) " + " / ".join(f"{g}" for g in gbps)
           + " Gb/s |", "|---|---|---|---|---|---|"]
    for N in servers:
        d, kr = expected_remote(E, k, N)
        wire = 4 * H * act_bytes * d + 16 * kr             # bytes per token per layer
        comp = [tokens * tok_flops / (N * f * 1e12) for f in tflops]
        egress = tokens / N * layers * wire                 # per server, each direction
        net = [egress / (g * 1e9 / 8 * efficiency) for g in gbps]
        cross = [k * pair_flops * g * 1e9 / 8 * efficiency / wire / 1e12 for g in gbps]
        out.append(f"| {N} | {d:.2f} | {wire / 1e3:.1f} | " + " / ".join(f"{c:.1f}" for c in comp)
                   + " | " + " / ".join(f"{t:.2f}" for t in net) + " | "
                   + " / ".join(f"{c:.0f}" for c in cross) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--tokens", type=int, default=512, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="OpenMP threads per rank (default: cores / ranks)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--retries", type=int, default=2,
                    help="redo a configuration during which other processes used > 0.3 cores")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each configuration wait up to S s for other processes to go idle")
    ap.add_argument("--model", action="store_true",
                    help="print the DeepSeek-V3 network model instead of measuring")
    a = ap.parse_args(argv)
    if a.model:
        print(network_model())
        return 0
    cfg = {"hidden": a.hidden, "inter": a.inter, "experts": a.experts, "top_k": a.top_k,
           "rank": a.rank, "dtype": a.dtype, "tokens": a.tokens, "steps": a.steps,
           "threads": a.threads, "timeout": a.timeout, "quiet_wait": a.quiet_wait,
           "retries": a.retries}
    print(render(cfg, run(cfg, a.ranks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
