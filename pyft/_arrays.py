"""Feature arrays as the native core reads them: no copies of float data, whatever its origin."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


def is_bfloat16_dtype(dtype: Any) -> bool:
    """True for ml_dtypes.bfloat16 (NumPy has no bfloat16 of its own)."""
    return getattr(dtype, "name", None) == "bfloat16"


def torch_to_numpy(x: Any) -> Tuple[np.ndarray, bool]:
    """A CPU torch tensor as a NumPy view; bfloat16 becomes its uint16 bit pattern."""
    import torch

    if x.device.type != "cpu":
        raise ValueError(
            f"features must be on the CPU for the CPU trainer; got a tensor on {x.device}. "
            "Call .cpu() first (CUDA tensors are trained natively once pyft is built with CUDA)."
        )
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), True
    return x.numpy(), False


def as_feature_array(x: Any, name: str = "features") -> Tuple[np.ndarray, bool]:
    """Return ``(array, is_bfloat16)`` for the native core.

    float32, float16, float64 and bfloat16 arrays (NumPy, ``np.memmap``, ml_dtypes, torch CPU
    tensors) are passed through as views with their own strides; other numeric arrays are
    converted to float32. Raises ``TypeError``/``ValueError`` naming ``name`` otherwise.
    """
    if type(x).__module__.startswith("torch"):
        arr, bf16 = torch_to_numpy(x)
    else:
        if hasattr(x, "toarray") or type(x).__module__.startswith("scipy.sparse"):
            raise TypeError(f"{name} must be a dense array; got sparse {type(x).__name__}")
        arr = np.asarray(x)
        bf16 = is_bfloat16_dtype(arr.dtype)
        if bf16:
            arr = arr.view(np.uint16)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, n_features); got shape {arr.shape}"
        )
    if not bf16 and arr.dtype not in _NATIVE_FLOATS:
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind == "f":  # longdouble and friends
            arr = arr.astype(np.float64)
        else:
            raise TypeError(
                f"{name} must hold real numbers (float32, float16, bfloat16 or float64); "
                f"got dtype {arr.dtype}"
            )
    return arr, bf16
