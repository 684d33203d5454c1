"""Every check of user input, raised in Python before native code runs.

Messages name the argument, what was expected and what was given.  Nothing
here mutates state: callers validate everything first, then commit.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ._arrays import BF16, as_numpy, describe

FLOAT_INPUTS = (np.dtype(np.float32), BF16)


def check_int(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_dropout(value, name: str = "lora_dropout") -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_seed(value, name: str = "dropout_seed") -> int:
    """An integer seed in [0, 2^64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__} {value!r}")
    value = int(value)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def check_memory(nbytes: int, what: str, limit: int | None = None) -> None:
    """Refuse absurd requests before allocating (default: physical RAM)."""
    if limit is None:
        try:
            import os

            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    if nbytes > limit:
        raise MemoryError(
            f"{what} would need {nbytes / 2**30:.1f} GiB, more than this machine's "
            f"{limit / 2**30:.1f} GiB of RAM"
        )


def array(x, name: str, shape: tuple, dtypes=FLOAT_INPUTS, *, contiguous=False,
          writable=False, finite=False) -> np.ndarray:
    """x as a numpy array of an accepted dtype and exact shape."""
    a = as_numpy(x, name)
    if a.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: dtype must be one of ({allowed}), got {describe(x)}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (it is read in place), got strides {a.strides}")
    if not a.flags.aligned:
        if contiguous or writable:  # read or written in place: a copy would not do
            raise ValueError(f"{name}: must be aligned to its {a.itemsize}-byte elements (it is "
                             "used in place)")
        a = np.require(a, requirements=["A"])  # an aligned copy: the kernels load whole elements
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: must be writable")
    if finite:
        check_finite(a, name)
    return a


def check_finite(a: np.ndarray, name: str, chunk: int = 1 << 22) -> None:
    """NaN/Inf check in bounded chunks (no full-size temporary)."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        if part.dtype == BF16:
            part = part.astype(np.float32)
        if not np.isfinite(part).all():
            bad = start + int(np.flatnonzero(~np.isfinite(part.astype(np.float32)))[0])
            idx = np.unravel_index(bad, a.shape)
            raise ValueError(f"{name}: contains a non-finite value at index {tuple(int(i) for i in idx)}")


def expert_ids(x, name: str, T: int, k: int, num_experts: int) -> np.ndarray:
    a = as_numpy(x, name)
    if a.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise TypeError(f"{name}: dtype must be int64 or int32, got {describe(x)}")
    if a.shape != (T, k):
        raise ValueError(f"{name}: expected shape ({T}, {k}) = (tokens of hidden_states, "
                         f"num_experts_per_tok), got {tuple(a.shape)}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: expert id {bad} out of range [0, {num_experts})")
    return np.require(a, np.int32, ["C", "A"])  # contiguous and aligned (a copy where not)


def routing_weights(x, name: str, T: int, k: int) -> np.ndarray:
    a = as_numpy(x, name)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == BF16):
        raise TypeError(f"{name}: must hold floating-point routing weights, got {describe(x)}")
    if a.shape != (T, k):
        raise ValueError(f"{name}: expected shape ({T}, {k}) = (tokens of hidden_states, "
                         f"num_experts_per_tok), got {tuple(a.shape)}")
    a = np.require(a, np.float32, ["C", "A"])  # contiguous and aligned (a copy where not)
    check_finite(a, name)  # after the conversion: a float64 beyond float32 is inf here
    return a


def permutation(x, name: str, n: int) -> np.ndarray:
    a = as_numpy(x, name)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: must be an integer array, got {describe(x)}")
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(a.shape)}")
    if not np.array_equal(np.sort(a), np.arange(n)):
        raise ValueError(f"{name}: must be a permutation of 0..{n - 1} (each logical expert in one slot)")
    return a.astype(np.int64)
