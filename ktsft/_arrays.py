"""Array plumbing between numpy, ml_dtypes.bfloat16 and torch, without
importing torch unless the caller already did."""
from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_module():
    """torch if the process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch_tensor(x) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def describe(x) -> str:
    if is_torch_tensor(x):
        return f"torch.Tensor(dtype={x.dtype}, shape={tuple(x.shape)}, device={x.device})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(dtype={x.dtype}, shape={x.shape})"
    return type(x).__name__


def as_numpy(x, name: str) -> np.ndarray:
    """A numpy view of x (numpy array or CPU torch tensor), sharing memory.
    A torch bfloat16 tensor becomes an ml_dtypes.bfloat16 array."""
    if isinstance(x, np.ma.MaskedArray):  # the kernels would read the raw data under the mask
        raise TypeError(f"{name}: masked arrays are not supported (the kernels read every "
                        f"element, masked or not); pass {name}.filled(value) or the data you mean")
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        torch = torch_module()
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(BF16)
        try:
            return x.numpy()
        except TypeError:  # float8 and other dtypes numpy has no type for
            raise TypeError(f"{name}: torch {x.dtype} is not supported; convert it to "
                            "torch.bfloat16 or torch.float32") from None
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {describe(x)}")


def to_like(arr: np.ndarray, like):
    """arr (float32 numpy) in the array type and float dtype of `like`."""
    if is_torch_tensor(like):
        torch = torch_module()
        t = torch.from_numpy(arr)
        if like.dtype != torch.float32:
            t = t.to(like.dtype)
        return t if like.device.type == "cpu" else t.to(like.device)
    if isinstance(like, np.ndarray) and like.dtype != np.float32:
        return arr.astype(like.dtype)
    return arr


def wrap_like(arr: np.ndarray, like):
    """arr as a torch tensor (zero-copy) when `like` is one, else unchanged."""
    if is_torch_tensor(like):
        return torch_module().from_numpy(arr)
    return arr
