"""Hyper-parameter grids for linear heads: many heads per native call, validation or k-fold CV.

:func:`fit_grid` trains one linear head per (learning rate, weight decay) grid point with
``pyft._core.train_heads``: every batch is read once and multiplied against all heads' weights in
one GEMM. Model selection uses a stratified validation split or stratified k-fold
cross-validation on the training data only; the winning grid point is then refit on all of it.

Default learning rates follow linear-probe practice: SGD with momentum 0.9 and a cosine schedule,
learning rate = base_lr x batch_size / 256 (the linear scaling rule of Goyal et al., 2017,
"Accurate, Large Minibatch SGD", arXiv:1706.02677, used for the linear evaluations of SimCLR,
MoCo v3 and MAE), with the base rate swept on a log grid because the best value depends on the
feature scale (DINO's / DINOv2's linear evaluation sweeps about 1e-5 ... 0.1 x batch/256 the same
way). pyft sweeps the half-decade grid {0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0} x batch/256.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pyft import _core
from pyft._arrays import as_feature_array
from pyft._checks import ArgumentTypeError, check_choice, check_number, labels_1d
from pyft.distributed import Ranks, process_group
from pyft.training import (
    TrainOptions,
    holdout_rows,
    init_head_params,
    native_train_head,
    native_train_heads,
)

__all__ = ["fit_grid", "default_lrs", "GridResult", "BASE_LRS"]

#: Base learning rates of the default grid, for a batch size of 256.
BASE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def default_lrs(batch_size: int) -> np.ndarray:
    """The default learning-rate grid: :data:`BASE_LRS` x batch_size / 256 (see module docs)."""
    return np.asarray(BASE_LRS, dtype=np.float64) * (batch_size / 256.0)


@dataclass
class GridResult:
    """Outcome of :func:`fit_grid`.

    Attributes
    ----------
    params_ : ndarray of shape (C*D + C,), float32
        The selected grid point refit on all training data (``W (C x D) | b (C)``).
    coef_, intercept_ : ndarray of shape (C, D) and (C,)
        Views of ``params_``.
    classes_ : ndarray of shape (C,)
        Label values; column c of the logits is ``classes_[c]``.
    best_index_ : int
        Row of ``table_`` that was selected.
    best_lr_, best_weight_decay_ : float
        The selected grid point.
    table_ : dict of ndarray
        One entry per grid point: ``lr``, ``weight_decay``, ``val_accuracy_mean``,
        ``val_accuracy_std``, ``val_loss_mean``, ``val_loss_std`` (over folds, ddof=0; std is 0 for
        a single validation split), and ``val_accuracy`` / ``val_loss`` of shape
        (n_folds, n_points) for the last epoch of each fold.
    fold_ : ndarray of shape (n_samples,), int64
        Fold in which each sample was held out for validation; -1 for samples that were only
        trained on (the training part of a single validation split).
    n_folds_ : int
        Number of folds (1 for a validation split).
    seed_ : int
        Seed of the split, the initialisation and the batch order.
    refit_history_ : list of dict
        Per-epoch history of the refit.
    """

    params_: np.ndarray
    classes_: np.ndarray
    best_index_: int
    best_lr_: float
    best_weight_decay_: float
    table_: Dict[str, np.ndarray]
    fold_: np.ndarray
    n_folds_: int
    seed_: int
    refit_history_: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def coef_(self) -> np.ndarray:
        C = len(self.classes_)
        return self.params_[: -C].reshape(C, -1)

    @property
    def intercept_(self) -> np.ndarray:
        return self.params_[-len(self.classes_):]

    def decision_function(self, X) -> np.ndarray:
        """Logits, shape (n_samples, C)."""
        arr, bf16 = as_feature_array(X, "X")
        return _core.predict(self.params_, arr, num_classes=len(self.classes_), bfloat16=bf16,
                             output="logits")

    def predict(self, X) -> np.ndarray:
        """Predicted labels (values of ``classes_``)."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def _grid(lrs, weight_decays, batch_size):
    lr_values = default_lrs(batch_size) if lrs is None else np.asarray(lrs, dtype=np.float64)
    wd_values = np.asarray(weight_decays, dtype=np.float64)
    for name, v in (("lrs", lr_values), ("weight_decays", wd_values)):
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {v.shape}")
    lr_grid, wd_grid = np.meshgrid(lr_values, wd_values, indexing="ij")
    return lr_grid.ravel().copy(), wd_grid.ravel().copy()


def _check_split(folds, val_fraction) -> None:
    if folds is None:
        check_number("val_fraction", val_fraction)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
        return
    message = f"folds must be None (a validation split) or an integer >= 2; got {folds!r}"
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral):
        raise ArgumentTypeError(message)
    if folds < 2:
        raise ValueError(message)


def _splits(y: np.ndarray, folds, val_fraction: float, seed: int):
    """[(train_rows, val_rows)] and the per-sample fold index."""
    _check_split(folds, val_fraction)
    n = len(y)
    fold = np.full(n, -1, dtype=np.int64)
    if folds is None:
        tr, va = holdout_rows(y, float(val_fraction), seed)
        fold[va] = 0
        return [(tr, va)], fold
    from sklearn.model_selection import StratifiedKFold

    min_count = np.bincount(y).min()
    if min_count < folds:
        raise ValueError(f"folds={folds} needs at least {folds} samples of every class; the "
                         f"smallest class has {min_count}")
    skf = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
    out = []
    for k, (tr, va) in enumerate(skf.split(np.zeros(n), y)):
        fold[va] = k
        out.append((tr.astype(np.int64), va.astype(np.int64)))
    return out, fold


def _encode_labels(labels, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(classes, class indices in sorted order of the classes)."""
    classes, y = np.unique(labels_1d(labels, n, "labels"), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels must contain at least 2 classes; got {len(classes)}")
    return classes, y.astype(np.int64)


def fit_grid(
    features,
    labels,
    *,
    lrs: Optional[Sequence[float]] = None,
    weight_decays: Sequence[float] = (0.0,),
    folds: Optional[int] = None,
    val_fraction: float = 0.1,
    epochs: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = False,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    select: str = "accuracy",
    n_threads: int = 0,
    distributed: Any = None,
) -> GridResult:
    """Train a grid of linear heads, select by validation / k-fold CV, refit the best on all data.

    Parameters
    ----------
    features : ndarray of shape (n_samples, n_features), float32, float16, bfloat16 or float64
        Never copied: every fold trains on row indices of this array (a memmap works). A CUDA
        tensor trains on its GPU (builds with ``PYFT_ENABLE_CUDA=ON``).
    labels : array-like of shape (n_samples,)
        Class labels (any values; encoded in sorted order as ``classes_``).
    lrs : sequence of float, optional
        Learning rates; default :func:`default_lrs` (``BASE_LRS x batch_size / 256``).
    weight_decays : sequence of float
        Weight decays; the grid is the Cartesian product lrs x weight_decays.
    folds : int, optional
        None: one stratified validation split of ``val_fraction``. An integer k >= 2: stratified
        k-fold cross-validation (scikit-learn ``StratifiedKFold(shuffle=True, random_state=seed)``),
        a fresh head per fold (same initialisation), validated on the fold's held-out rows.
    val_fraction : float
        Validation share when ``folds`` is None.
    epochs, batch_size, seed, optimizer, momentum, nesterov, schedule, warmup_steps, n_threads
        As in ``pyft._core.train_head``; shared by every grid point, fold and the refit.
    select : {"accuracy", "loss"}
        Highest mean validation accuracy (ties: lower mean loss) or lowest mean validation loss.
        Grid points whose validation loss is not finite (diverged) are never selected.

    distributed : bool or ProcessGroup, optional
        Split the grid points over the ranks of the initialised ``torch.distributed`` process
        group, or of the ``ProcessGroup`` given (default: when one is initialised, or initialise
        it from ``torchrun``'s environment; see :func:`pyft.distributed.process_group`): each
        rank trains its points (``rank::world_size``) on all the data, the validation table is
        gathered to every rank, and every rank selects and refits the same best point.

    Returns
    -------
    GridResult
    """
    check_choice("select", select, ("accuracy", "loss"))
    X, bf16 = as_feature_array(features, "features", allow_cuda=True)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D array (n_samples, n_features); got {X.ndim}-D")
    classes, y = _encode_labels(labels, X.shape[0])
    lr_grid, wd_grid = _grid(lrs, weight_decays, batch_size)
    splits, fold = _splits(y, folds, val_fraction, int(seed))
    options = TrainOptions(optimizer=optimizer, momentum=momentum, nesterov=nesterov,
                           schedule=schedule, warmup_steps=warmup_steps, epochs=epochs,
                           batch_size=batch_size, seed=int(seed), n_threads=n_threads)
    problem = dict(num_classes=len(classes), bfloat16=bf16)
    init = init_head_params("linear", X.shape[1], len(classes), seed=int(seed))
    acc, loss = _validate_grid(X, y, splits, lr_grid, wd_grid, init, options, problem,
                               process_group(distributed))
    table = _table(lr_grid, wd_grid, acc, loss)
    best = _select(table, select)
    params = init.copy()
    refit = native_train_head(params, X, y, replace(options, lr=float(lr_grid[best]),
                                                   weight_decay=float(wd_grid[best])), **problem)
    return GridResult(params_=params, classes_=classes, best_index_=best,
                      best_lr_=float(lr_grid[best]), best_weight_decay_=float(wd_grid[best]),
                      table_=table, fold_=fold, n_folds_=len(splits), seed_=int(seed),
                      refit_history_=refit["history"])


def _validate_grid(X, y, splits, lr_grid, wd_grid, init, options: TrainOptions,
                   problem: Dict[str, Any], ranks: Ranks) -> Tuple[np.ndarray, np.ndarray]:
    """Last-epoch validation accuracy and loss, (n_folds, n_points), of every grid point: this
    rank trains points ``rank::world`` (one native call per fold), the ranks swap results."""
    mine = np.arange(ranks.rank, lr_grid.size, ranks.world)
    acc = np.empty((len(splits), lr_grid.size))
    loss = np.empty((len(splits), lr_grid.size))
    for k, (tr, va) in enumerate(splits):
        if mine.size == 0:
            continue
        params = np.tile(init, (mine.size, 1))  # a fresh head per grid point and fold
        res = native_train_heads(params, X, y, options, lrs=lr_grid[mine],
                                 weight_decays=wd_grid[mine], train_rows=tr, val_rows=va,
                                 **problem)
        last = res["history"][-1]
        acc[k, mine], loss[k, mine] = last["val_accuracy"], last["val_loss"]
    if ranks.world > 1:
        import torch.distributed as dist

        parts: List[Any] = [None] * ranks.world
        dist.all_gather_object(parts, (mine, acc[:, mine], loss[:, mine]), group=ranks.group)
        for idx, a, lo in parts:
            acc[:, idx], loss[:, idx] = a, lo
    return acc, loss


def _table(lr_grid, wd_grid, acc: np.ndarray, loss: np.ndarray) -> Dict[str, np.ndarray]:
    return {
        "lr": lr_grid, "weight_decay": wd_grid,
        "val_accuracy_mean": acc.mean(axis=0), "val_accuracy_std": acc.std(axis=0),
        "val_loss_mean": loss.mean(axis=0), "val_loss_std": loss.std(axis=0),
        "val_accuracy": acc, "val_loss": loss,
    }


def _select(table: Dict[str, np.ndarray], select: str) -> int:
    """Index of the best grid point by ``select``; diverged points never win."""
    valid = np.isfinite(table["val_loss_mean"])
    if not valid.any():
        raise ValueError("every grid point diverged (non-finite validation loss); use smaller lrs")
    if select == "accuracy":
        # lexsort: last key is primary; invalid points rank last
        order = np.lexsort((np.where(valid, table["val_loss_mean"], np.inf),
                            -np.where(valid, table["val_accuracy_mean"], -np.inf)))
    else:
        order = np.argsort(np.where(valid, table["val_loss_mean"], np.inf), kind="stable")
    return int(order[0])
