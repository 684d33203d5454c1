"""Machine ceilings measured in the same run: GEMM peak per dtype and
memory read bandwidth, both at the run's thread count."""
from __future__ import annotations

import datetime
import os
import platform

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import ktsft

from .timing import best_time, torch_threads

GEMM_N = 2048        # 2048^3: large enough for MKL/oneDNN to reach steady state
BW_BYTES = 1 << 30   # 1 GiB: far beyond any cache


def _torch_gemm_gflops(dtype: str, threads: int, repeats: int) -> float:
    """Best GFLOP/s of torch's own N x N x N matmul (MKL / oneDNN)."""
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=g).to(tdt)
    b = torch.randn(GEMM_N, GEMM_N, generator=g).to(tdt)
    c = torch.empty(GEMM_N, GEMM_N, dtype=tdt)
    with torch_threads(threads):
        t = best_time(lambda: torch.mm(a, b, out=c), repeats, warmup=2)
    return 2 * GEMM_N ** 3 / t / 1e9


def _numpy_gemm_gflops(threads: int, repeats: int) -> float:
    """Best GFLOP/s of numpy's fp32 matmul (its bundled OpenBLAS)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    b = rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads, user_api="blas"):
        t = best_time(lambda: np.matmul(a, b, out=c), repeats, warmup=2)
    return 2 * GEMM_N ** 3 / t / 1e9


def gemm_peak(dtype: str, threads: int, repeats: int = 5) -> dict:
    """{library: GFLOP/s} of the large-matmul candidates for `dtype`; the
    ceiling is the best of them.  For fp32 both torch (MKL) and numpy
    (OpenBLAS) are tried: on AMD CPUs either may pick the faster kernel."""
    out = {"torch": _torch_gemm_gflops(dtype, threads, repeats)}
    if dtype == "fp32":
        out["numpy"] = _numpy_gemm_gflops(threads, repeats)
    return out


def read_bandwidth_gbs(threads: int, repeats: int = 5) -> float:
    """Best GB/s of a read-only reduction (torch.sum, multi-threaded) over a
    1 GiB float32 tensor."""
    x = torch.ones(BW_BYTES // 4, dtype=torch.float32)  # ones: pages really touched
    with torch_threads(threads):
        t = best_time(lambda: x.sum(), repeats, warmup=1)
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
    """{'gemm_gflops': {dtype: best GFLOP/s}, 'gemm_by_library': {dtype: {...}},
    'read_gbs': GB/s}."""
    by_lib = {d: gemm_peak(d, threads) for d in dtypes}
    return {"gemm_gflops": {d: max(v.values()) for d, v in by_lib.items()},
            "gemm_by_library": by_lib, "read_gbs": read_bandwidth_gbs(threads)}


def best_of(*measured: dict) -> dict:
    """Ceilings measured at several times (start and end of the sweep): the
    best of each, since contention from other processes only lowers them."""
    out = {"gemm_gflops": {}, "gemm_by_library": {}, "read_gbs": max(m["read_gbs"] for m in measured)}
    for d in measured[0]["gemm_gflops"]:
        out["gemm_gflops"][d] = max(m["gemm_gflops"][d] for m in measured)
        out["gemm_by_library"][d] = {lib: max(m["gemm_by_library"][d][lib] for m in measured)
                                     for lib in measured[0]["gemm_by_library"][d]}
    return out
