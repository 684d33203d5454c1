"""Machine ceilings measured in the same run: GEMM peak per dtype and
memory read bandwidth, both at the run's thread count."""
from __future__ import annotations

import datetime
import os
import platform

from .timing import best_time, torch_threads

GEMM_N = 2048        # 2048^3: large enough for MKL/oneDNN to reach steady state
BW_BYTES = 1 << 30   # 1 GiB: far beyond any cache


def gemm_peak_gflops(dtype: str, threads: int, repeats: int = 5) -> float:
    """Best GFLOP/s of torch's own N x N x N matmul in `dtype`."""
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=g).to(tdt)
    b = torch.randn(GEMM_N, GEMM_N, generator=g).to(tdt)
    c = torch.empty(GEMM_N, GEMM_N, dtype=tdt)
    with torch_threads(threads):
        t = best_time(lambda: torch.mm(a, b, out=c), repeats, warmup=2)
    return 2 * GEMM_N ** 3 / t / 1e9


def read_bandwidth_gbs(threads: int, repeats: int = 5) -> float:
    """Best GB/s of a read-only reduction (torch.sum, multi-threaded) over a
    1 GiB float32 tensor."""
    import torch

    x = torch.ones(BW_BYTES // 4, dtype=torch.float32)  # ones: pages really touched
    with torch_threads(threads):
        t = best_time(lambda: x.sum(), repeats, warmup=1)
    del x
    return BW_BYTES / t / 1e9


def cpu_model() -> str:
    """lscpu's 'Model name' (from /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(threads: int) -> dict:
    """Everything the report needs to name the machine."""
    import torch

    import ktsft

    info = ktsft.cpu_info()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "usable_cores": cores,
        "threads": threads,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "selected_isa": info["selected_isa"],
        "runnable_isas": info["runnable_isas"],
        "torch": torch.__version__,
        "ktsft": ktsft.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def ceilings(dtypes, threads: int) -> dict:
    """{'gemm_gflops': {dtype: GFLOP/s}, 'read_gbs': GB/s}."""
    return {"gemm_gflops": {d: gemm_peak_gflops(d, threads) for d in dtypes},
            "read_gbs": read_bandwidth_gbs(threads)}
