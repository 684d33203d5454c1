"""The portable kernel build must compile where no x86 SIMD exists (aarch64)."""
import os
import shutil
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ktsft", "_kernels")


@pytest.mark.parametrize("unit", ["kernels_scalar", "cpu_features", "dispatch"])
def test_portable_units_cross_compile_for_aarch64(unit, tmp_path):
    pytest.importorskip("ziglang", reason="zig (pip install ziglang) cross-compiles C for aarch64")
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu", "-O2",
           "-std=c11", "-Wall", "-Werror", "-fPIC", "-I", os.path.join(SRC, "include"), "-c",
           os.path.join(SRC, "src", unit + ".c"), "-o", str(tmp_path / (unit + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp_path / "zig-cache")))
    assert r.returncode == 0, r.stderr


def test_x86_units_are_not_needed_off_x86():
    """setup.py builds only the portable unit when the machine is not x86."""
    text = open(os.path.join(os.path.dirname(SRC), "..", "setup.py")).read()
    assert 'ISA_UNITS = [("kernels_scalar", [])]' in text and "if X86:" in text
