"""Quantization of frozen base weights at load: symmetric int8 with one
scale per output row, symmetric int4 with one scale per group of inputs.
The kernels dequantize in registers (ktsft/_kernels/src/gemm_fma.inc)."""
from __future__ import annotations

import numpy as np


def quantize_int8(w):
    """Symmetric per-row int8: w ~= scale[:, None] * q, scale = max|row| / 127."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_int4(w, group: int):
    """Symmetric int4 with one scale per `group` inputs of a row: w ~=
    scale[:, i // group] * q, q in [-7, 7], stored as q + 8, two per byte
    (element 2i in the low nibble).  Returns (packed [out, in / 2] uint8,
    scale [out, in / group] float32)."""
    w = np.asarray(w, np.float32)
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    amax = np.abs(g).max(axis=2)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = (np.clip(np.rint(g / scale[:, :, None]), -7, 7).astype(np.int16) + 8).reshape(out, inp)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale


def dequantize_int4(packed, scale, group: int):
    """float32 weights that an int4 (packed, scale) pair stands for."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.float32)
    q[:, 0::2] = (packed & 0xF).astype(np.float32) - 8
    q[:, 1::2] = (packed >> 4).astype(np.float32) - 8
    return q * np.repeat(scale, group, axis=1)
