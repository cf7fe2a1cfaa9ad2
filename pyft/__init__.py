"""pyft: fast transfer learning with cached frozen features and a fused native head trainer.

The native core (``pyft._core``) trains classification heads on feature matrices of any float
dtype in one call; :class:`HeadClassifier` wraps it as a scikit-learn estimator.
"""

from pyft._blas import preload as _preload_blas

_preload_blas()

from pyft import _core  # noqa: E402
from pyft.heads import HeadClassifier, head_param_count, init_head_params  # noqa: E402

__version__ = _core.__version__

__all__ = ["HeadClassifier", "init_head_params", "head_param_count", "__version__"]
