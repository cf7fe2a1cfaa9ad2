"""Load the OpenBLAS that pyft._core links against, from the scipy-openblas32 package."""

from __future__ import annotations

import ctypes
import os


def preload() -> None:
    """Make ``libscipy_openblas.so`` resolvable before ``pyft._core`` is imported.

    The extension records the library by its soname; loading it here by full path means the
    dynamic loader finds it whatever the install layout (editable, isolated build, wheel).
    """
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise ImportError(
            "pyft needs the 'scipy-openblas32' package (its BLAS); install it with "
            "'pip install scipy-openblas32'"
        ) from exc
    lib = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    if os.name == "nt":  # pragma: no cover
        os.add_dll_directory(scipy_openblas32.get_lib_dir())
    else:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
