"""The native head trainer as pyft's Python layer calls it.

- :func:`init_head_params` / :func:`head_param_count`: the flat parameter layout every native
  call shares.
- :class:`TrainOptions`: the optimizer, schedule and loop settings of a mini-batch run. It builds
  the keyword arguments of ``_core.train_head``, ``_core.train_heads``, ``_core.optimizer_step``
  and ``_core.lr_factor``, so these option names are written out here only.
- :func:`native_train_head` / :func:`native_train_heads`: one native run on host arrays or on a
  CUDA tensor (its device made current, torch's stream handed on).
- :func:`holdout_rows`: the stratified validation split of ``HeadClassifier`` and ``fit_grid``.
- :func:`train_head_data_parallel`: one head, data-parallel over torch.distributed ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from pyft import _core
from pyft._arrays import as_feature_array, cuda_device, cuda_kwargs
from pyft._checks import ArgumentTypeError, check_choice, check_number, stratified_holdout
from pyft.distributed import Ranks, process_group

__all__ = ["TrainOptions", "native_train_head", "native_train_heads", "init_head_params",
           "head_param_count", "holdout_rows", "train_head_data_parallel"]


def head_param_count(head: str, in_features: int, num_classes: int, hidden_size: int = 0) -> int:
    """Length of the flat parameter vector of a head (see :func:`init_head_params`)."""
    if head == "linear":
        return num_classes * in_features + num_classes
    return hidden_size * in_features + hidden_size + num_classes * hidden_size + num_classes


def init_head_params(
    head: str, in_features: int, num_classes: int, hidden_size: int = 0, seed: int = 0
) -> np.ndarray:
    """PyTorch ``nn.Linear`` default initialisation, as one flat float32 vector.

    Layout: ``linear``: W (C*D) | b (C); ``mlp``: W1 (H*D) | b1 (H) | W2 (C*H) | b2 (C), row-major,
    so ``W = params[:C*D].reshape(C, D)`` is ``nn.Linear(D, C).weight``. Every weight and bias is
    drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    rng = np.random.default_rng(seed)
    parts = []
    layers = (
        [(in_features, num_classes)]
        if head == "linear"
        else [(in_features, hidden_size), (hidden_size, num_classes)]
    )
    for fan_in, fan_out in layers:
        bound = 1.0 / np.sqrt(fan_in)
        parts.append(rng.uniform(-bound, bound, size=fan_out * fan_in))
        parts.append(rng.uniform(-bound, bound, size=fan_out))
    return np.concatenate(parts).astype(np.float32)


def holdout_rows(y: np.ndarray, fraction: float, seed: int):
    """Stratified (train, validation) rows holding out ``fraction`` of ``y`` (at least one row)."""
    n_val = max(1, int(round(fraction * len(y))))
    if n_val >= len(y):
        raise ValueError(
            f"validation_fraction={fraction} leaves no training data for {len(y)} samples"
        )
    return stratified_holdout(y, n_val, seed)


# train_heads takes one lr and weight decay per head (lrs=, weight_decays=) and has neither
# dropout (linear heads) nor early stopping.
_SINGLE_HEAD_ONLY = ("lr", "weight_decay", "dropout", "patience", "min_delta")


@dataclass(frozen=True)
class TrainOptions:
    """Settings of one native mini-batch run, named and defaulted as ``_core.train_head`` has
    them. Values go to the core as given: callers cast and check them first (the core checks
    again)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 1
    gamma: float = 0.1
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    dropout: float = 0.0
    patience: int = 0
    min_delta: float = 0.0
    n_threads: int = 0

    def train_head_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``_core.train_head``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def train_heads_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``_core.train_heads`` (the per-head lrs and weight decays apart)."""
        kw = self.train_head_kwargs()
        for name in _SINGLE_HEAD_ONLY:
            del kw[name]
        return kw

    def optimizer_step_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``_core.optimizer_step`` (the step's lr apart)."""
        return dict(optimizer=self.optimizer, weight_decay=self.weight_decay,
                    momentum=self.momentum, nesterov=self.nesterov, beta1=self.beta1,
                    beta2=self.beta2, eps=self.eps)

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        """The learning rate of optimizer step ``step`` (from 0), as the native trainer sets it."""
        return self.lr * _core.lr_factor(self.schedule, step, total, steps_per_epoch,
                                         warmup_steps=self.warmup_steps,
                                         min_lr_ratio=self.min_lr_ratio,
                                         step_size=self.step_size, gamma=self.gamma)


def native_train_head(params: np.ndarray, features: Any, labels: Any, options: TrainOptions,
                      **problem: Any) -> Dict[str, Any]:
    """``_core.train_head`` with ``options``; ``problem`` holds the rest of its arguments
    (``num_classes``, ``head``, ``bfloat16``, validation data, class weights, callback)."""
    with cuda_device(features):  # torch exports a tensor from its own device only
        return _core.train_head(params, features, labels, **problem,
                                **options.train_head_kwargs(), **cuda_kwargs(features))


def native_train_heads(params: np.ndarray, features: Any, labels: Any, options: TrainOptions,
                       **problem: Any) -> Dict[str, Any]:
    """``_core.train_heads`` with ``options``; ``problem`` holds the rest of its arguments
    (``num_classes``, ``lrs``, ``weight_decays``, rows, ``bfloat16``)."""
    with cuda_device(features):
        return _core.train_heads(params, features, labels, **problem,
                                 **options.train_heads_kwargs(), **cuda_kwargs(features))


# ---------------------------------------------------------------------- data-parallel trainer


def train_head_data_parallel(features: Any, labels: Any, num_classes: int, *,
                             head: str = "linear", hidden_size: int = 0,
                             activation: str = "relu", optimizer: str = "sgd", lr: float = 0.1,
                             momentum: float = 0.9, nesterov: bool = False,
                             weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                             eps: float = 1e-8, schedule: str = "constant", warmup_steps: int = 0,
                             min_lr_ratio: float = 0.0, epochs: int = 10, batch_size: int = 256,
                             seed: int = 0, params: Optional[np.ndarray] = None,
                             n_threads: int = 0, distributed: Any = None
                             ) -> Tuple[np.ndarray, List[Dict[str, float]]]:
    """Train one head (linear or MLP), data-parallel over the process group's ranks.

    Every rank holds the same ``features`` (e.g. the cache entry's float16 memmap) and walks the
    same global batches (``pyft._core.epoch_permutation``). Rank ``r`` gathers rows ``r::world`` of
    each batch with the native gatherer and computes their summed loss gradient with the native
    kernel (``pyft._core.objective``); an all-reduce adds the ranks' gradients and every rank
    applies the same optimizer step. The update is the native trainer's
    (:func:`pyft._core.train_head`: SGD with momentum / Nesterov or AdamW, weight decay on the
    weights only, ``constant`` / ``cosine`` / ``step`` schedule with warm-up, mean loss over the
    global batch), so the result equals one process -- and ``train_head`` -- with the same global
    batch up to float summation order. Without a group it is the one-process run.
    ``distributed`` chooses the ranks as in :func:`pyft.distributed.process_group` (default: the
    initialised group, or one from torchrun's environment; a ``ProcessGroup`` for a subset of the
    ranks). Features are read on the CPU (the native objective has no CUDA kernel).

    Returns
    -------
    params : ndarray, float32
        The flat head, laid out as :func:`init_head_params` lays it out.
    history : list of dict
        Per-epoch mean training loss and learning rate.
    """
    _check_data_parallel_settings(head, hidden_size, optimizer, schedule, epochs, batch_size, lr,
                                  weight_decay, momentum)
    options = TrainOptions(optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                           momentum=momentum, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps,
                           schedule=schedule, warmup_steps=warmup_steps,
                           min_lr_ratio=min_lr_ratio, epochs=epochs, batch_size=batch_size,
                           seed=seed, n_threads=n_threads)
    X, bf16 = as_feature_array(features)
    n, d = X.shape
    if n == 0:
        raise ValueError(f"features must have at least 1 row; got shape {X.shape}")
    y = _class_indices(labels, n, num_classes)
    ranks = process_group(distributed)
    C, H = int(num_classes), int(hidden_size)
    p = _start_params(params, head, d, C, H, seed)
    gradient = _ShardedGradient(X, bf16, y, ranks, batch_size, n_threads, p.size,
                                head=head, num_classes=C, hidden_size=H, activation=activation)
    history = _train_epochs(p, gradient, n, options,
                            head=head, in_features=d, num_classes=C, hidden_size=H)
    return p, history


def _check_data_parallel_settings(head, hidden_size, optimizer, schedule, epochs, batch_size, lr,
                                  weight_decay, momentum) -> None:
    check_choice("head", head, ("linear", "mlp"))
    check_choice("optimizer", optimizer, ("sgd", "adamw"))
    check_choice("schedule", schedule, ("constant", "cosine", "step"))
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        check_number(name, v, low=1, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("momentum", momentum, low=0, high=1)
    if head == "mlp":
        check_number("hidden_size", hidden_size, low=1, integer=True)


def _class_indices(labels: Any, n: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 class indices in [0, num_classes), one per feature row."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be 1-D with {n} entries to match features; got shape "
                         f"{y.shape}")
    if y.dtype.kind not in "iu":
        raise ArgumentTypeError(f"labels must be integers in [0, {num_classes}); got dtype "
                                f"{y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got values in "
                         f"[{y.min()}, {y.max()}]")
    return y


def _start_params(params: Optional[np.ndarray], head: str, d: int, C: int, H: int,
                  seed: int) -> np.ndarray:
    """A float32 copy of ``params``, or a fresh head from ``seed``; checked against the layout."""
    p = init_head_params(head, d, C, H, seed=seed) if params is None else \
        np.array(params, dtype=np.float32).ravel()
    n_params = head_param_count(head, d, C, H)
    if p.size != n_params:
        raise ValueError(f"params must hold {n_params} values for a {head} head on {d} features "
                         f"and {C} classes; got {p.size}")
    return p


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """The global batches of one epoch: the native trainer's shuffle, so every rank agrees."""
    order = np.asarray(_core.epoch_permutation(n, seed, epoch))
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


class _ShardedGradient:
    """The mean loss gradient of a global batch: this rank computes rows ``rank::world`` of it,
    an all-reduce adds the ranks' shares."""

    def __init__(self, X: Any, bf16: bool, y: np.ndarray, ranks: Ranks, batch_size: int,
                 n_threads: int, n_params: int, **objective: Any):
        import torch

        self.X, self.bf16, self.y, self.ranks = X, bf16, y, ranks
        self.n_threads, self.n_params = n_threads, n_params
        self.objective = dict(objective, n_threads=n_threads)
        self.rows = np.empty((min(batch_size, X.shape[0]), X.shape[1]), np.float32)
        self.buf = torch.zeros(n_params + 1, dtype=torch.float32)  # gradient | this rank's loss

    def __call__(self, p: np.ndarray, batch: np.ndarray) -> Tuple[np.ndarray, float]:
        """(mean gradient over ``batch``, summed loss over ``batch``) at ``p``, on every rank."""
        import torch

        n_params, buf = self.n_params, self.buf
        mine = np.sort(batch[self.ranks.rank::self.ranks.world])
        buf.zero_()
        if len(mine):
            xb = _core.gather_rows(self.X, mine, out=self.rows[:len(mine)],
                                   n_threads=self.n_threads, bfloat16=self.bf16)
            f, g = _core.objective(p, xb, self.y[mine], **self.objective)
            buf[:n_params] = torch.from_numpy(g)
            buf[:n_params] *= len(mine)  # the gradient of the summed loss of these rows
            buf[n_params] = f * len(mine)
        if self.ranks.world > 1:  # one float32 all-reduce of the head's size (+ 1) per step
            import torch.distributed as dist

            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.ranks.group)
        return (buf[:n_params] / len(batch)).numpy(), float(buf[n_params])


def _train_epochs(p: np.ndarray, gradient: _ShardedGradient, n: int, options: TrainOptions,
                  **head_shape: Any) -> List[Dict[str, float]]:
    """Run ``options.epochs`` epochs of the native optimizer on ``p`` in place; the history."""
    m_buf = np.zeros_like(p)
    v_buf = np.zeros_like(p) if options.optimizer == "adamw" else None
    step_kw = dict(head_shape, **options.optimizer_step_kwargs())
    steps_per_epoch = -(-n // options.batch_size)
    total = steps_per_epoch * options.epochs
    history = []
    step = 0
    for epoch in range(options.epochs):
        total_loss = 0.0
        for batch in _epoch_batches(n, options.batch_size, options.seed, epoch):
            g_mean, loss_sum = gradient(p, batch)
            lr_t = options.lr_at(step, total, steps_per_epoch)
            step += 1
            _core.optimizer_step(p, g_mean, m_buf, v_buf, step=step, lr=lr_t, **step_kw)
            total_loss += loss_sum
        history.append({"epoch": epoch, "train_loss": total_loss / n, "lr": lr_t})
    return history
