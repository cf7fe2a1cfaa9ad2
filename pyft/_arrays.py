"""Feature arrays as the native core reads them: no copies of float data, whatever its origin."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Tuple

import numpy as np

_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


def is_bfloat16_dtype(dtype: Any) -> bool:
    """True for ml_dtypes.bfloat16 (NumPy has no bfloat16 of its own)."""
    return getattr(dtype, "name", None) == "bfloat16"


def is_cuda_tensor(x: Any) -> bool:
    """True for a torch tensor in CUDA memory."""
    return type(x).__module__.startswith("torch") and getattr(x, "is_cuda", False)


def cuda_kwargs(x: Any) -> Dict[str, Any]:
    """``stream=`` for a native call on CUDA tensor ``x``: torch's current stream on its device
    (the core orders its work after it); empty for host arrays."""
    if not is_cuda_tensor(x):
        return {}
    import torch

    return {"stream": torch.cuda.current_stream(x.device).cuda_stream}


def cuda_device(x: Any) -> ContextManager[Any]:
    """Makes the device of CUDA tensor ``x`` current for a native call (a no-op for host
    arrays): torch exports a tensor through DLPack only from its own device, so a tensor on
    cuda:1 would otherwise be refused while cuda:0 is current."""
    if not is_cuda_tensor(x):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(x.device)


def torch_to_numpy(x: Any, name: str = "features") -> Tuple[np.ndarray, bool]:
    """A CPU torch tensor as a NumPy view; bfloat16 becomes its uint16 bit pattern."""
    import torch

    if x.device.type != "cpu":
        raise ValueError(_not_on_cpu_message(name, x.device))
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), True
    return x.numpy(), False


def _not_on_cpu_message(name: str, device: Any) -> str:
    """Why a tensor on ``device`` is refused, and, for a CUDA tensor, what this build does run
    on the GPU (read from the core, so the message stays true for CPU and CUDA builds)."""
    msg = (f"{name} must be on the CPU for this operation; got a tensor on {device}. Call .cpu() "
           "first.")
    if device.type != "cuda":
        return msg
    from pyft import _core

    # Only mini-batch training of the linear head has a CUDA kernel; everything else reads
    # host memory.
    cpu_only = ("L-BFGS (solver='lbfgs'), predict / predict_proba / decision_function, the MLP "
                "head and train_head_data_parallel run on the CPU only")
    if "train_head" in _core.cuda_kernels():
        return (f"{msg} On CUDA tensors pyft trains linear heads with solver 'sgd' or 'adamw' "
                f"(HeadClassifier.fit, fit_grid); {cpu_only}.")
    return (f"{msg} This pyft build has no CUDA kernels; a build with PYFT_ENABLE_CUDA=ON trains "
            f"linear heads with solver 'sgd' or 'adamw' on CUDA tensors; {cpu_only}.")


def as_feature_array(x: Any, name: str = "features",
                     allow_cuda: bool = False) -> Tuple[Any, bool]:
    """Return ``(array, is_bfloat16)`` for the native core.

    float32, float16, float64 and bfloat16 arrays (NumPy, ``np.memmap``, ml_dtypes, torch CPU
    tensors) are passed through as views with their own strides; other numeric arrays are
    converted to float32. With ``allow_cuda``, a CUDA tensor is returned as it is (detached; the
    core reads it through DLPack, dtype included, so the flag is False); otherwise it raises
    ``ValueError``. Raises ``TypeError``/``ValueError`` naming ``name`` otherwise.
    """
    if allow_cuda and is_cuda_tensor(x):
        import torch

        if x.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D tensor of shape (n_samples, n_features); got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {x.dtype}")
        return x.detach(), False
    if type(x).__module__.startswith("torch"):
        arr, bf16 = torch_to_numpy(x, name)
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
