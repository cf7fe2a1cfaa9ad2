"""An object that presents itself as a CUDA tensor through DLPack, without any GPU.

Used where no GPU exists (CI) to check that CUDA-resident inputs reach the core's device
dispatch and fail there with a clear RuntimeError (CPU build: "built without CUDA"; CUDA build
without a device: "needs a CUDA device"). Its data pointer is not real: it must never be handed
to a build that has a GPU to launch on (the tests check cuda_device_count() == 0 first).
"""

from __future__ import annotations

import ctypes
from typing import Sequence, Tuple

KDL_CUDA = 2
KDL_FLOAT, KDL_INT = 2, 0


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


# The capsule keeps a pointer to its name: it must outlive every capsule.
_NAME = ctypes.create_string_buffer(b"dltensor")
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]


class FakeCudaTensor:
    """A C-contiguous CUDA tensor of `shape` as far as DLPack says (float32 unless told)."""

    def __init__(self, shape: Sequence[int], code: int = KDL_FLOAT, bits: int = 32,
                 device_id: int = 0):
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._mt = _ManagedTensor()
        t = self._mt.dl_tensor
        t.data = 0x10000  # never dereferenced: the core refuses before any CUDA work
        t.device = _Device(KDL_CUDA, device_id)
        t.ndim = len(shape)
        t.dtype = _DataType(code, bits, 1)
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0
        self.shape = tuple(shape)

    def __dlpack_device__(self) -> Tuple[int, int]:
        return (KDL_CUDA, self._mt.dl_tensor.device.device_id)

    def __dlpack__(self, stream=None):
        return _capsule_new(ctypes.addressof(self._mt), ctypes.addressof(_NAME), None)
