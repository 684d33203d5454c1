"""bench/fma_gemm.c includes an ISA build's kernel unit: it must keep
compiling and running as the kernels change (the bit hashes and one-core
times in docs/performance.md come from it)."""
import os
import platform
import re
import shutil
import subprocess

import pytest

import ktsft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERN = os.path.join(ROOT, "ktsft", "_kernels")

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("gcc") is None
    or "avx2" not in ktsft.cpu_info()["runnable_isas"],
    reason="the harness runs the AVX2 unit with gcc")

LINE = re.compile(r"^(NT|NN) wk=(\d) M=(\d+) N=(\d+) K=(\d+) best ([\d.]+) mean ([\d.]+) ms "
                  r"+([\d.]+) GB/s\(mean\) hash ([0-9a-f]{16})$")


def test_fma_gemm_builds_and_runs(tmp_path):
    exe = str(tmp_path / "fma_gemm")
    src = os.path.join(KERN, "src", "kernels_avx2.c")
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-fno-math-errno", "-mavx2", "-mfma", "-mf16c",
                    "-I" + os.path.join(KERN, "include"), "-I" + os.path.join(KERN, "src"),
                    f'-DSRC="{src}"', "-DENTRY=ktsft_kernels_avx2",
                    os.path.join(ROOT, "bench", "fma_gemm.c"), "-o", exe],
                   check=True, capture_output=True, text=True, timeout=300)
    hashes = {}
    for nn in (0, 1):
        for wk in (1, 2, 3):
            for m in (1, 3, 9):  # the row / stream kernels and the tiles
                out = subprocess.run([exe, str(nn), str(wk), str(m), "256", "384", "2", "2"],
                                     check=True, capture_output=True, text=True, timeout=120)
                got = LINE.match(out.stdout.strip())
                assert got, out.stdout
                assert float(got.group(7)) > 0
                hashes[(nn, wk, m)] = got.group(9)
    # the same call twice gives the same bits; different kinds give different results
    again = subprocess.run([exe, "1", "3", "3", "256", "384", "2", "2"], check=True,
                           capture_output=True, text=True, timeout=120)
    assert LINE.match(again.stdout.strip()).group(9) == hashes[(1, 3, 3)]
    assert len({hashes[(0, wk, 1)] for wk in (1, 2, 3)}) == 3
