"""bench/probe.c includes the kernel sources: it must keep compiling and
running as they change (the profile in docs/performance.md comes from it)."""
import platform
import tempfile

import pytest

import ktsft

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or "avx512bf16" not in ktsft.cpu_info()["runnable_isas"],
    reason="the probe runs the AVX512-BF16 kernels")


def test_probe_builds_and_runs():
    from bench import probe
    with tempfile.TemporaryDirectory() as tmp:
        exe = probe.build(tmp)
        for mode, arg in (("nt", None), ("nn", None), ("read", 2), ("prefetch", 0)):
            res = probe.probe(exe, mode, 2, 3, 1, 1, arg, runs=1)
            assert res["mode"] == mode and res["ms"] > 0
        nt = probe.probe(exe, "nt", 2, 13, 1, 1, runs=1)  # 13 tokens: the tiled kernel
        assert nt["tile_ticks"][0] > 0 and nt["gflops"] > 0
