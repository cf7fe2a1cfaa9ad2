"""Argument checks, optional imports and stratified splits shared by every pyft module.

Every user-facing argument check in pyft goes through these helpers so the messages read alike:
the argument's name, what was expected and what was given ("batch_size must be an integer >= 1;
got 0"). A wrong *type* raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError``: callers that catch either keep working.
"""
from __future__ import annotations

import difflib
import importlib
import numbers
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ArgumentTypeError", "check_bool", "check_choice", "check_int", "check_number",
    "check_positive", "did_you_mean",
    "import_optional", "stratified_holdout", "labels_1d", "expand_image_paths",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that ``except ValueError`` also catches)."""


def did_you_mean(name: Any, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """``"; did you mean 'x'?"`` for the choices closest to ``name``; ``""`` when none is."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``ValueError`` naming ``name``, the choices and the nearest one, unless ``value`` is one."""
    if value not in choices:
        hint = did_you_mean(value, [c for c in choices if isinstance(c, str)], n=1) \
            if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                         f"got {value!r}{hint}")


def check_number(name: str, value: Any, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False,
                 integer: bool = False) -> None:
    """Check that ``value`` is a finite real (an integer when ``integer``) in ``[low, high]``
    (``(low, high]`` when ``low_open``). Booleans are refused: ``True`` is not a batch size."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise ArgumentTypeError(f"{name} must be {what}; got {value!r} "
                                f"({type(value).__name__})")
    if integer:
        if not -(2**62) < int(value) < 2**62:
            raise ValueError(f"{name} is out of range; got {value!r}")
    elif not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}; got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}; got {value!r}")


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low`` ("batch_size must be an int >= 1; got 0")."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int >= {low}; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def check_positive(name: str, value: Any, what: str = "a positive number") -> float:
    """``value`` as a finite float > 0 ("lr must be a positive number; got 0")."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be {what}; got {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False; got {value!r} "
                                f"({type(value).__name__})")


def import_optional(module: str, install: str, purpose: str) -> Any:
    """Import ``module`` or raise an ``ImportError`` that says what needs it and how to install it
    (a broken install, e.g. mismatched torch/torchvision, counts as missing)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the '{module}' package, which is not importable here ({e}); "
            f"install it with '{install}'") from e


def labels_1d(y: Any, n: int, name: str = "y") -> np.ndarray:
    """``y`` as a 1-D array of ``n`` labels (torch tensors are copied to the host)."""
    from sklearn.utils.validation import column_or_1d

    if type(y).__module__.startswith("torch"):
        y = y.detach().cpu().numpy()
    y = column_or_1d(y, warn=True)
    if y.shape[0] != n:
        raise ValueError(f"{name} must have one label per sample ({n}); got {y.shape[0]} labels")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return y


def stratified_holdout(y: np.ndarray, n_val: int, seed: int, *,
                       sort: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices with ``n_val`` validation rows, stratified by ``y`` where
    every present class has two samples (and where stratifying is possible at all), else plain
    random. Indices are int64 and sorted unless ``sort=False``."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    if not 1 <= n_val < len(y):
        raise ValueError(f"a validation split of {n_val} leaves no training data for "
                         f"{len(y)} samples")
    rows = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        tr, va = train_test_split(rows, test_size=n_val, random_state=seed, stratify=stratify)
    except ValueError:  # fewer validation rows than classes: cannot stratify
        tr, va = train_test_split(rows, test_size=n_val, random_state=seed, stratify=None)
    if sort:
        tr, va = np.sort(tr), np.sort(va)
    return tr.astype(np.int64), va.astype(np.int64)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


def expand_image_paths(items: Sequence[Any], *, name: str = "inputs",
                       must_exist: bool = False) -> List[Any]:
    """A folder among ``items`` becomes its image files (by extension, sorted by name, not
    recursive); everything else stays as given. A folder with no image files raises ``ValueError``;
    with ``must_exist``, a path that is neither a folder nor a file raises ``FileNotFoundError``."""
    out: List[Any] = []
    for it in items:
        if isinstance(it, (str, os.PathLike)) and os.path.isdir(it):
            found = sorted(os.path.join(it, f) for f in os.listdir(it)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"{name}: folder {os.fspath(it)!r} holds no image files "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif must_exist and isinstance(it, (str, os.PathLike)) and not os.path.isfile(it):
            raise FileNotFoundError(f"{name}: {os.fspath(it)!r} does not exist")
        else:
            out.append(it)
    return out
