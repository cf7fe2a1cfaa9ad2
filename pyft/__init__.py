"""pyft: fast transfer learning with cached frozen features and a fused native head trainer.

The native core (``pyft._core``) trains classification heads on feature matrices of any float
dtype in one call; :class:`HeadClassifier` wraps it as a scikit-learn estimator. Models, freezing
policies and strategy advice (which need PyTorch) load on first use.
"""

from typing import Any

from pyft._blas import preload as _preload_blas

_preload_blas()

from pyft import _core  # noqa: E402
from pyft.heads import HeadClassifier, head_param_count, init_head_params  # noqa: E402

__version__ = _core.__version__

# Public names that import torch, resolved lazily so `import pyft` stays light.
_LAZY = {
    "load_model": "pyft.models",
    "wrap_model": "pyft.models",
    "FineTunableModel": "pyft.models",
    "Block": "pyft.models",
    "Policy": "pyft.freezing",
    "head_only": "pyft.freezing",
    "freeze_first": "pyft.freezing",
    "full": "pyft.freezing",
    "scratch": "pyft.freezing",
    "advise": "pyft.advice",
    "FineTuner": "pyft.finetune",
    "fit_grid": "pyft.grid",
    "load_data": "pyft.data",
    "Advice": "pyft.advice",
    "export_onnx": "pyft.export",
    "InferenceSession": "pyft.inference",
}

__all__ = ["HeadClassifier", "init_head_params", "head_param_count", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
