"""pyft: fast transfer learning with cached frozen features and a fused native head trainer."""

from pyft._blas import preload as _preload_blas

_preload_blas()

from pyft import _core  # noqa: E402

__version__ = _core.__version__
