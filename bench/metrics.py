"""Work and traffic of one forward+backward step, and what they imply
against the measured ceilings."""
from __future__ import annotations

# Per (token, expert) pair, multiply-adds counted as 2 FLOPs:
#   base: forward 3 GEMVs of H*I (gate, up, down) = 6HI; backward only the
#     input gradients (weights frozen) = 6HI; total 12HI.
#   LoRA (A: r x in, B: out x r, in + out = H + I for each of the three):
#     forward 2r(in+out) each = 6r(H+I); backward 4r(in+out) each (grad B,
#     grad through B, grad A, grad through A) = 12r(H+I); total 18r(H+I).
#   Element-wise work (silu, products, routing sums) is not counted.
LORA_FLOPS_NOTE = "LoRA FLOPs per (token, expert) pair = 18*r*(H+I): fwd 6r(H+I) + bwd 12r(H+I)"


def flops(shape, T: int, rank: int) -> dict:
    pairs = T * shape.k
    base = 12 * shape.H * shape.I * pairs
    lora = 18 * rank * (shape.H + shape.I) * pairs
    return {"base": base, "lora": lora, "total": base + lora}


QUANTIZED = ("int8", "int4")


def weight_bytes_per_element(dtype: str, shape) -> float:
    """Stored bytes per base weight, scales included (int8: one fp32 scale
    per row; int4: half a byte plus one fp32 scale per group)."""
    if dtype == "int8":
        return 1 + 4 * (2 / shape.H + 1 / shape.I) / 3
    if dtype == "int4":  # the group the layer picks (quant_group=None)
        from ktsft.wrapper import _int4_group

        return 0.5 + 4 / _int4_group(None, "int4", shape.H, shape.I)
    return 2 if dtype == "bf16" else 4


def bf16_hardware() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16).
    Without it ktsft widens bf16 to fp32 FMA lanes, and torch's own bf16
    matmul runs an emulated path (on a 2-core Zen 3 it measured under
    1 GFLOP/s and took minutes): no ceiling for anything."""
    import ktsft

    f = ktsft.cpu_info()["features"]
    return bool(f.get("avx512_bf16") or f.get("amx_bf16"))


def compute_dtype(dtype: str) -> str:
    """The dtype whose GEMM peak bounds a row: quantized weights are
    dequantized to fp32 in registers, and so is bf16 on a CPU without bf16
    hardware (bf16_hardware)."""
    if dtype in QUANTIZED or (dtype == "bf16" and not bf16_hardware()):
        return "fp32"
    return dtype


def streamed_bytes(shape, dtype: str, n_active: int) -> int:
    """Base-weight bytes of the experts that got a token, read once by the
    forward and once by the backward."""
    return int(2 * n_active * 3 * shape.H * shape.I * weight_bytes_per_element(dtype, shape))


def derive(row: dict, ceilings: dict) -> dict:
    """The report's derived columns for one row of raw measurements."""
    t = row["fwd_ms"] / 1e3 + row["bwd_ms"] / 1e3
    peak = ceilings["gemm_gflops"][compute_dtype(row["dtype"])] * 1e9
    bw = ceilings["read_gbs"] * 1e9
    fl = row["flops"]
    nbytes = row["streamed_bytes"]
    roof = max(fl / peak, nbytes / bw)
    d = {
        "tok_s": row["T"] / t,
        "gflops": fl / t / 1e9,
        "frac_peak": fl / t / peak,
        "gbs": nbytes / t / 1e9,
        "frac_bw": nbytes / t / bw,
        "roofline_ms": roof * 1e3,
        "bound": "compute" if fl / peak >= nbytes / bw else "memory",
        "roofline_eff": roof / t,
    }
    for peer in ("eager", "grouped_mm"):
        p = row.get(peer)
        d[f"speedup_{peer}"] = ((p["fwd_ms"] + p["bwd_ms"]) / 1e3 / t) if p else None
    return d
