"""The AMX-BF16 tile kernels against the float64 reference.

They run where the CPU has AMX and Linux grants tile data, or on a
development build with the C model of the tiles (KTSFT_AMX_EMULATE=1);
elsewhere these tests skip, saying why.  The shapes drive every branch of
the tile code: token counts below, at and past a tile pair (16, 32), odd
tile counts, K not a multiple of 32 (padded last block), output rows not a
multiple of 16 (the vdpbf16ps remainder), activations read in place or
packed, accumulate on and off, LoRA ranks 1 and 16."""
import numpy as np
import pytest

import ktsft
from conftest import Problem, check_against_reference, rel_err

INFO = ktsft.cpu_info()
pytestmark = pytest.mark.skipif("amx" not in INFO["runnable_isas"],
                                reason=f"AMX path not usable here: {INFO['amx']['reason']}")

SHAPES = {
    # pairs per expert = T * k / E under two_experts routing (k = 2 -> T each)
    "tile_pair_exact": dict(T=32, H=96, I=64, E=2, k=2, r=4, routing="two_experts"),
    "one_tile_partial": dict(T=11, H=64, I=48, E=2, k=2, r=1, routing="two_experts"),
    "three_tiles_ragged": dict(T=45, H=100, I=50, E=2, k=2, r=16, routing="two_experts"),
    "many_experts": dict(T=96, H=128, I=80, E=8, k=2, r=8),
    "wide_rows": dict(T=40, H=544, I=272, E=2, k=1, r=2, routing="two_experts"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_amx_matches_reference(case):
    p = Problem(seed=len(case), **SHAPES[case])
    got = p.run(p.wrapper(dtype="bf16", isa="amx"))
    check_against_reference(p, got, "bf16")


def test_amx_agrees_with_vdpbf16ps():
    """Two bf16 paths, fp32 accumulation in different orders: close, not equal."""
    p = Problem(T=48, H=160, I=96, E=4, k=2, r=8, seed=11)
    a = p.run(p.wrapper(dtype="bf16", isa="amx"))
    b = p.run(p.wrapper(dtype="bf16", isa="avx512bf16"))
    for name in a:
        assert rel_err(a[name], b[name]) < 1e-3, name


def test_amx_thread_count_agnostic():
    p = Problem(T=45, H=100, I=50, E=3, k=2, r=4, seed=2)
    runs = [p.run(p.wrapper(dtype="bf16", isa="amx", threads=n)) for n in (1, 2, 3)]
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(runs[0][name], other[name]), name


def test_cpu_info_reports_amx():
    """Hardware tiles are chosen by default; the C model only when asked for."""
    assert INFO["amx"]["usable"] is True
    if INFO["amx"]["reason"].startswith("C model"):
        assert INFO["selected_isa"] != "amx" or INFO["forced_by_env"]
    else:
        assert INFO["selected_isa"] == "amx" or INFO["forced_by_env"]
        assert "AMX" in INFO["kernels"]["base GEMMs, dtype=bf16"]


def test_amx_token_slices():
    """An expert with more tokens than one slice (512) of the tile kernels."""
    p = Problem(T=600, H=64, I=48, E=2, k=2, r=2, seed=4, routing="two_experts")
    check_against_reference(p, p.run(p.wrapper(dtype="bf16", isa="amx")), "bf16")


def test_per_thread_scratch_is_freed_with_the_last_amx_layer():
    """The tile packs' per-thread scratch is kept between calls (no page
    faults per call) and freed when the last AMX layer goes; a new layer
    then allocates afresh and computes the same.  In a fresh interpreter:
    here other tests' layers may still be alive."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import gc, sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from conftest import Problem
        from ktsft._kernels.moe_sft import kept_scratch_bytes
        p = Problem(T=64, H=96, I=64, E=2, k=2, r=4, routing="two_experts", seed=7)
        a, b = p.wrapper(dtype="bf16", isa="amx"), p.wrapper(dtype="bf16", isa="amx")
        ref = p.run(a)
        assert kept_scratch_bytes() > 0
        p.run(b)
        del a
        gc.collect()
        assert kept_scratch_bytes() > 0  # b still runs on it
        del b
        gc.collect()
        assert kept_scratch_bytes() == 0
        c = p.wrapper(dtype="bf16", isa="amx")
        got = p.run(c)
        assert kept_scratch_bytes() > 0
        for n in ref:
            assert np.array_equal(got[n], ref[n]), n
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
