"""Which kernel build runs: chosen once at import, overridable with KTSFT_ISA."""
from __future__ import annotations

import os

from ._kernels import moe_sft as _native

_ENV = "KTSFT_ISA"

# what each build's base GEMMs run on (reported by cpu_info): from the one
# ISA list, ktsft/_kernels/include/ktsft/isa_table.h
_OPS = {row["name"]: (row["fp32"], row["bf16"]) for row in _native.isa_table()}


def _choose() -> tuple[str, bool]:
    runnable = _native.runnable_isas()
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced:
        if forced not in _native.ISA_ORDER:
            raise ImportError(f"{_ENV}={forced!r} is not an ISA name; choose from {_native.ISA_ORDER}")
        if forced not in runnable:
            raise ImportError(f"{_ENV}={forced!r} cannot run on this CPU/build; runnable: {runnable}")
        return forced, True
    # the C model of AMX tiles (a development build) only runs when asked for
    best = [n for n in runnable if n != "amx" or _native.amx_build() == 1]
    return best[-1], False


SELECTED_ISA, FORCED = _choose()


def resolve_isa(isa: str | None) -> str:
    """The ISA a new wrapper uses: the explicit one, else the import-time choice."""
    if isa is None:
        return SELECTED_ISA
    if not isinstance(isa, str) or isa.lower() not in _native.runnable_isas():
        raise ValueError(f"isa={isa!r} cannot run here; runnable: {_native.runnable_isas()}")
    return isa.lower()


def _numa_nodes():
    from ._numa import topology

    try:
        return topology()
    except ValueError as e:  # a malformed KTSFT_NUMA_NODES: reported, not raised here
        return str(e)


def cpu_info() -> dict:
    """Detected CPU features, the kernel builds and the one each op uses."""
    fp32_desc, bf16_desc = _OPS[SELECTED_ISA]
    return {
        "features": _native.cpu_features(),
        "compiled_isas": list(_native.compiled_isas()),
        "runnable_isas": list(_native.runnable_isas()),
        "selected_isa": SELECTED_ISA,
        "forced_by_env": FORCED,
        "openmp": _native.openmp_enabled(),
        "amx": dict(zip(("usable", "reason"), _native.amx_status())),
        # the CPUs of each NUMA node this process may use (threadpool_count's pools)
        "numa_nodes": _numa_nodes(),
        "kernels": {
            "base GEMMs, dtype=fp32": fp32_desc,
            "base GEMMs, dtype=bf16": bf16_desc,
            "LoRA products and gradients": fp32_desc.split(" on ")[0] if "bf16" in fp32_desc else fp32_desc,
            "silu / routing combine": f"{SELECTED_ISA} build of the portable C (compiler-vectorised)",
        },
    }
