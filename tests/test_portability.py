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


def _setup_py(expr, machine=None):
    """Run setup.py with its setup() and cythonize stubbed (as on `machine`,
    where given) and return the value of `expr` over its globals `g`."""
    root = os.path.dirname(os.path.dirname(SRC))
    code = ("import platform, runpy, setuptools, Cython.Build\n"
            + (f"platform.machine = lambda: {machine!r}\n" if machine else "")
            + "setuptools.setup = lambda **kw: None\n"
            "Cython.Build.cythonize = lambda *a, **k: []\n"
            "g = runpy.run_path('setup.py')\n"
            f"print({expr})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("machine,units", [
    ("aarch64", ["kernels_scalar"]),
    ("x86_64", ["kernels_scalar", "kernels_avx2", "kernels_avx512", "kernels_avx512bf16"]),
])
def test_isa_units_follow_the_machine(machine, units):
    """setup.py, run as on another machine (its setup() and cythonize stubbed):
    off x86 it builds only the portable unit."""
    got = _setup_py("','.join(u for u, _ in g['ISA_UNITS'])", machine)
    assert got.split(",") == units


def test_one_isa_list():
    """setup.py's units, the dispatch table and cpu_info all come from
    include/ktsft/isa_table.h: the same names, in the same order."""
    import ktsft
    from ktsft._kernels import moe_sft

    names = [row["name"] for row in moe_sft.isa_table()]
    assert names == list(moe_sft.ISA_ORDER) == ["scalar", "avx2", "avx512", "avx512bf16", "amx"]
    got = _setup_py("','.join(g['ISAS'])")
    assert got.split(",") == names
    info = ktsft.cpu_info()
    assert info["compiled_isas"] == [n["name"] for n in moe_sft.isa_table() if n["built"]]
    row = {n["name"]: n for n in moe_sft.isa_table()}[info["selected_isa"]]
    assert info["kernels"]["base GEMMs, dtype=bf16"] == row["bf16"]
