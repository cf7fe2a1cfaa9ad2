"""Labelled datasets from the forms users have them in: folders, CSV files, arrays, texts, torch.

:func:`load_data` returns a :class:`LabeledData`: ``inputs`` (indexable, what a model's
``preprocess`` accepts batch by batch), integer ``labels`` in ``[0, n_classes)`` and the class
names. Image files are read lazily, one batch at a time.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from pyft._checks import IMAGE_EXTENSIONS

__all__ = ["LabeledData", "ImageFiles", "load_data", "take", "IMAGE_EXTENSIONS"]



class ImageFiles(Sequence):
    """A list of image paths that reads (and converts to RGB) the images it is indexed with."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = [os.fspath(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._read(p) for p in self.paths[index]]
        if isinstance(index, (list, np.ndarray)):
            return [self._read(self.paths[int(i)]) for i in index]
        return self._read(self.paths[int(index)])

    def fingerprint_paths(self) -> List[str]:
        return list(self.paths)


def take(inputs: Any, idx: Any) -> Any:
    """The samples ``idx`` of ``inputs`` (array, tensor, list or :class:`ImageFiles`), in order,
    without reading or copying the others."""
    if isinstance(inputs, ImageFiles):
        return inputs[np.asarray(idx)]
    if isinstance(inputs, (list, tuple)):
        return [inputs[int(i)] for i in idx]
    if type(inputs).__module__.startswith("torch"):
        import torch

        return inputs[torch.as_tensor(np.asarray(idx))]
    return inputs[np.asarray(idx)]


@dataclass
class LabeledData:
    """Inputs with integer labels and the names of their classes."""

    inputs: Any
    labels: np.ndarray
    classes: List[str]
    kind: str  # "image" or "text"
    source: str = ""
    skipped: int = 0

    def __len__(self) -> int:
        return int(len(self.labels))

    def subset(self, rows: np.ndarray) -> "LabeledData":
        rows = np.asarray(rows)
        if isinstance(self.inputs, ImageFiles):
            inputs: Any = ImageFiles([self.inputs.paths[i] for i in rows])
        elif isinstance(self.inputs, list):
            inputs = [self.inputs[i] for i in rows]
        else:
            inputs = self.inputs[rows]
        return LabeledData(inputs, self.labels[rows], self.classes, self.kind, self.source)


def _check_readable(paths: List[str], on_error: str) -> Tuple[List[str], int]:
    from PIL import Image, UnidentifiedImageError

    ok, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
            ok.append(p)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            if on_error == "raise":
                raise ValueError(f"{p} is not a readable image ({e}); pass on_error='skip' to skip "
                                 "such files with a warning") from e
            bad.append(p)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}",
                      UserWarning, stacklevel=3)
    return ok, len(bad)


def _encode(labels: Sequence[Any], classes: Optional[Sequence[Any]] = None
            ) -> Tuple[np.ndarray, List[str]]:
    values = [str(v) for v in labels]
    if classes is None:
        try:  # numeric labels sort numerically
            names = sorted(set(values), key=lambda v: (float(v), v))
        except ValueError:
            names = sorted(set(values))
    else:
        names = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(names)}
    unseen = sorted(set(values) - set(index))
    if unseen:
        raise ValueError(f"labels {unseen[:5]} are not among the training classes {names[:10]}")
    return np.array([index[v] for v in values], dtype=np.int64), names


def load_data(source: Any, labels: Any = None, *, kind: Optional[str] = None,
              classes: Optional[Sequence[Any]] = None, on_error: str = "skip",
              path_column: Optional[str] = None, text_column: Optional[str] = None,
              label_column: str = "label") -> LabeledData:
    """Labelled data from a folder, a CSV file, arrays, texts or a torch Dataset.

    Parameters
    ----------
    source :
        - a folder with one subfolder of images per class;
        - a ``.csv`` file with a label column and a ``path`` (images, relative to the CSV's
          folder) or ``text`` column;
        - an array / tensor of images with ``labels``;
        - a list of strings (texts) with ``labels``;
        - a torch ``Dataset`` yielding ``(input, label)`` pairs;
        - an ``(inputs, labels)`` tuple or an existing :class:`LabeledData`.
    classes : sequence, optional
        The class names in order (e.g. the training set's, when loading a validation set);
        labels outside them are an error.
    on_error : {"skip", "raise"}
        Unreadable image files: skip them with a warning and a count, or raise.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}")
    if isinstance(source, LabeledData):
        if classes is not None and list(map(str, classes)) != source.classes:
            y, names = _encode([source.classes[i] for i in source.labels], classes)
            return LabeledData(source.inputs, y, names, source.kind, source.source)
        return source
    if isinstance(source, tuple) and len(source) == 2 and labels is None:
        source, labels = source
    if isinstance(source, (str, os.PathLike)) and labels is None:
        path = os.fspath(source)
        if os.path.isdir(path):
            return _from_folder(path, classes, on_error)
        if os.path.isfile(path) and path.lower().endswith(".csv"):
            return _from_csv(path, classes, on_error, path_column, text_column, label_column)
        raise ValueError(f"data {path!r} is neither a folder of class subfolders nor a .csv file"
                         + ("" if os.path.exists(path) else " (it does not exist)"))
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and labels is None \
            and type(source).__module__.split(".")[0] not in ("numpy", "builtins"):
        return _from_dataset(source, classes)
    if labels is None:
        raise TypeError(f"labels are required with data of type {type(source).__name__}")
    y_raw = np.asarray(labels)
    if y_raw.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y_raw.shape}")
    n = len(source)
    if n != len(y_raw):
        raise ValueError(f"data and labels must have the same length; got {n} and {len(y_raw)}")
    if n == 0:
        raise ValueError("data must not be empty")
    y, names = _encode(y_raw.tolist(), classes)
    if isinstance(source, (list, tuple)) and source and all(isinstance(t, str) for t in source):
        return LabeledData(list(source), y, names, kind or "text", "texts")
    return LabeledData(source, y, names, kind or "image", "array")


def _from_folder(path: str, classes: Optional[Sequence[Any]], on_error: str) -> LabeledData:
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                     and not d.startswith("."))
    if not subdirs:
        raise ValueError(f"folder {path!r} has no class subfolders (expected one subfolder of "
                         "images per class)")
    paths, labels = [], []
    for d in subdirs:
        files = sorted(f for f in os.listdir(os.path.join(path, d))
                       if not f.startswith(".") and os.path.isfile(os.path.join(path, d, f)))
        for f in files:
            paths.append(os.path.join(path, d, f))
            labels.append(d)
    if not paths:
        raise ValueError(f"folder {path!r} holds no files in its class subfolders {subdirs[:5]}")
    not_images = [p for p in paths if not p.lower().endswith(IMAGE_EXTENSIONS)]
    keep = [i for i, p in enumerate(paths) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not_images and on_error == "raise":
        raise ValueError(f"{not_images[0]} is not an image file ({len(not_images)} in all); pass "
                         "on_error='skip' to skip them with a warning")
    paths = [paths[i] for i in keep]
    labels = [labels[i] for i in keep]
    readable, bad = _check_readable(paths, on_error)
    keep_set = set(readable)
    labels = [lab for p, lab in zip(paths, labels) if p in keep_set]
    if not_images:
        warnings.warn(f"skipped {len(not_images)} file(s) without an image extension, e.g. "
                      f"{not_images[0]}", UserWarning, stacklevel=2)
    if not readable:
        raise ValueError(f"folder {path!r} holds no readable images")
    empty = [d for d in subdirs if d not in set(labels)]
    if empty:
        raise ValueError(f"class folder(s) {empty[:5]} in {path!r} hold no readable images")
    y, names = _encode(labels, classes if classes is not None else subdirs)
    return LabeledData(ImageFiles(readable), y, names, "image", path, bad + len(not_images))


def _from_csv(path: str, classes: Optional[Sequence[Any]], on_error: str,
              path_column: Optional[str], text_column: Optional[str],
              label_column: str) -> LabeledData:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    if label_column not in columns:
        raise ValueError(f"{path}: no label column {label_column!r}; columns are {columns} "
                         "(pass label_column=...)")
    pcol = path_column or ("path" if "path" in columns else None)
    tcol = text_column or ("text" if "text" in columns else None)
    if pcol is None and tcol is None:
        raise ValueError(f"{path}: needs a 'path' (images) or 'text' column; columns are {columns}")
    if not rows:
        raise ValueError(f"{path} has no rows")
    labels = [r[label_column] for r in rows]
    if tcol is not None and pcol is None:
        y, names = _encode(labels, classes)
        return LabeledData([r[tcol] for r in rows], y, names, "text", path)
    base = os.path.dirname(os.path.abspath(path))
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in (r[pcol] for r in rows)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and on_error == "raise":
        raise ValueError(f"{path}: {len(missing)} image file(s) do not exist, e.g. {missing[0]}")
    present = [(p, lab) for p, lab in zip(paths, labels) if os.path.isfile(p)]
    readable, bad = _check_readable([p for p, _ in present], on_error)
    keep = set(readable)
    if missing:
        warnings.warn(f"skipped {len(missing)} missing image file(s), e.g. {missing[0]}",
                      UserWarning, stacklevel=2)
    labels = [lab for p, lab in present if p in keep]
    if not labels:
        raise ValueError(f"{path}: no readable images")
    y, names = _encode(labels, classes)
    return LabeledData(ImageFiles(readable), y, names, "image", path, bad + len(missing))


def _from_dataset(ds: Any, classes: Optional[Sequence[Any]]) -> LabeledData:
    n = len(ds)
    if n == 0:
        raise ValueError("the dataset is empty")
    items = [ds[i] for i in range(n)]
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items[:1]):
        raise TypeError("a torch Dataset must yield (input, label) pairs")
    xs = [it[0] for it in items]
    ys = [int(it[1]) if hasattr(it[1], "__int__") else it[1] for it in items]
    y, names = _encode(ys, classes)
    if all(isinstance(x, str) for x in xs):
        return LabeledData(xs, y, names, "text", "dataset")
    import torch

    if all(isinstance(x, torch.Tensor) for x in xs):
        return LabeledData(torch.stack(xs), y, names, "image", "dataset")
    return LabeledData([np.asarray(x) for x in xs], y, names, "image", "dataset")
