"""Plain PyTorch / NumPy reference implementations of what ``pyft._core`` computes.

Nothing here imports pyft: the tests feed the references the same initial parameters and the
same mini-batch order (``_core.epoch_permutation``, passed in as a callable) and compare.

Flat parameter layout (see ``pyft.init_head_params``), row-major float32:
    linear: W (C*D) | b (C)                     == nn.Linear(D, C)
    mlp:    W1 (H*D) | b1 (H) | W2 (C*H) | b2 (C) == nn.Linear(D, H), act, nn.Linear(H, C)
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

# ------------------------------------------------------------------------------------------------
# Parameters


def unflatten(params: np.ndarray, head: str, D: int, C: int, H: int = 0) -> List[np.ndarray]:
    """The flat vector as [W, b] (linear) or [W1, b1, W2, b2] (mlp), as views."""
    params = np.asarray(params)
    shapes = [(C, D), (C,)] if head == "linear" else [(H, D), (H,), (C, H), (C,)]
    out, o = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(params[o : o + n].reshape(s))
        o += n
    assert o == params.size, (o, params.size)
    return out


def flatten(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def torch_head(params: np.ndarray, head: str, D: int, C: int, H: int = 0,
               activation: str = "relu", dtype=torch.float32) -> nn.Sequential:
    """An ``nn.Sequential`` head holding a copy of the flat parameters."""
    if head == "linear":
        model = nn.Sequential(nn.Linear(D, C))
    else:
        act = nn.ReLU() if activation == "relu" else nn.GELU()  # GELU: exact (erf) form
        model = nn.Sequential(nn.Linear(D, H), act, nn.Linear(H, C))
    model = model.to(dtype)
    with torch.no_grad():
        for t, a in zip(model.parameters(), unflatten(params, head, D, C, H)):
            t.copy_(torch.from_numpy(np.array(a, dtype=np.float64)).to(dtype))
    return model


def module_flat(model: nn.Module) -> np.ndarray:
    return flatten([p.detach().to(torch.float32).cpu().numpy() for p in model.parameters()])


def split_decay(model: nn.Module):
    """(weights, biases): optimizer param groups, weight decay on weights only."""
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return weights, biases


# ------------------------------------------------------------------------------------------------
# NumPy forward / loss (float64)


def np_gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_logits(params: np.ndarray, X: np.ndarray, head: str, C: int, H: int = 0,
              activation: str = "relu") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    D = X.shape[1]
    parts = [p.astype(np.float64) for p in unflatten(params, head, D, C, H)]
    if head == "linear":
        W, b = parts
        return X @ W.T + b
    W1, b1, W2, b2 = parts
    h = X @ W1.T + b1
    h = np.maximum(h, 0.0) if activation == "relu" else np_gelu(h)
    return h @ W2.T + b2


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_cross_entropy(z: np.ndarray, y: np.ndarray, class_weights=None,
                     label_smoothing: float = 0.0) -> float:
    """torch.nn.CrossEntropyLoss(weight, label_smoothing, reduction='mean') in float64."""
    n, C = z.shape
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    nll = -np_log_softmax(z)
    wy = w[y]
    per_row = (1.0 - label_smoothing) * wy * nll[np.arange(n), y]
    per_row += label_smoothing / C * (nll * w).sum(axis=1)
    return float(per_row.sum() / wy.sum())


def logreg_objective(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float,
                     class_weights=None) -> float:
    """sum_i w_{y_i} CE_i / sum_i w_{y_i} + l2/2 ||W||^2, intercept unpenalised (float64).

    This is scikit-learn's multinomial LogisticRegression objective with
    l2 = 1 / (C_reg * sum_i w_{y_i}).
    """
    W = np.asarray(W, dtype=np.float64)
    z = np.asarray(X, dtype=np.float64) @ W.T + np.asarray(b, dtype=np.float64)
    return np_cross_entropy(z, y, class_weights) + 0.5 * l2 * float((W * W).sum())


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule (written from the documented formula, independently of the core)


def lr_factor(schedule: str, step: int, total: int, steps_per_epoch: int, warmup_steps: int = 0,
              min_lr_ratio: float = 0.0, step_size: int = 1, gamma: float = 0.1) -> float:
    f = 1.0
    W = warmup_steps
    if schedule == "cosine":
        if step >= W:
            span = max(1, total - W)
            progress = min(1.0, (step - W) / span)
            f = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        f = gamma ** (epoch // step_size)
    elif schedule != "constant":
        raise ValueError(schedule)
    if step < W:
        f *= (step + 1) / W
    return f


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    B = min(batch_size, n)
    return max(1, n // B) if drop_last else -(-n // B)


# ------------------------------------------------------------------------------------------------
# Dropout mask (mirrors the counter-based hash documented in csrc/common/rng.h and head_math.h:
# element (sample, unit) of step t is dropped iff uniform(hash(seed, t, sample, unit)) < p)

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _splitmix64(np.asarray(a, dtype=np.uint64) ^ _splitmix64(np.asarray(b, dtype=np.uint64)))


def dropout_keep_mask(seed: int, step: int, rows: np.ndarray, hidden: int, p: float) -> np.ndarray:
    """Boolean (len(rows), hidden) keep mask of optimizer step `step` for samples `rows`."""
    step_seed = _hash_combine(np.array([(seed ^ 0xD509) & _M64], dtype=np.uint64),
                              np.array([step], dtype=np.uint64))
    hs = _hash_combine(np.repeat(step_seed, len(rows)), np.asarray(rows, dtype=np.uint64))
    h = _hash_combine(hs[:, None] * np.ones((1, hidden), dtype=np.uint64),
                      np.arange(hidden, dtype=np.uint64)[None, :] * np.ones((len(rows), 1),
                                                                           dtype=np.uint64))
    u = (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return u >= np.float32(p)


# ------------------------------------------------------------------------------------------------
# Mini-batch training loop


def torch_train(
    params: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    *,
    permutation: Callable[[int, int, int], np.ndarray],
    head: str = "linear",
    num_classes: int,
    hidden_size: int = 0,
    activation: str = "relu",
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    schedule: str = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
    epochs: int = 10,
    batch_size: int = 256,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    dropout: float = 0.0,
    label_smoothing: float = 0.0,
    class_weights: Optional[np.ndarray] = None,
    dtype=torch.float32,
    device: str = "cpu",
) -> Tuple[np.ndarray, List[Dict[str, float]]]:
    """The training loop train_head documents, in plain PyTorch (on ``device``).

    Keyword names and defaults follow train_head's (``_core.train_head_options()``;
    tests/test_options.py holds them together).

    Returns (final flat float32 params, per-epoch history with train_loss and lr). The epoch's
    train_loss is sum_batches(batch mean loss * batch rows) / rows seen, with each batch loss taken
    before that batch's update, as the core reports it.
    """
    N, D = X.shape
    C, H = num_classes, hidden_size
    B = min(batch_size, N)
    spe = steps_per_epoch(N, batch_size, drop_last)
    total = spe * epochs
    model = torch_head(params, head, D, C, H, activation, dtype).to(device)
    weights, biases = split_decay(model)
    groups = [{"params": weights, "weight_decay": weight_decay},
              {"params": biases, "weight_decay": 0.0}]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                              nesterov=nesterov, foreach=False)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_factor(schedule, t, total, spe, warmup_steps, min_lr_ratio, step_size,
                                 gamma))
    weight = (None if class_weights is None
              else torch.as_tensor(class_weights, dtype=dtype, device=device))
    crit = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float64)).to(dtype).to(device)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    history = []
    step = 0
    for epoch in range(epochs):
        order = permutation(N, seed, epoch) if shuffle else np.arange(N)
        loss_sum, seen, last_lr = 0.0, 0, lr
        for s in range(spe):
            idx = order[s * B : (s + 1) * B]
            tidx = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(device)
            xb, yb = Xt[tidx], yt[tidx]
            if head == "linear" or dropout == 0.0:
                logits = model(xb)
            else:
                keep = torch.from_numpy(dropout_keep_mask(seed, step, idx, H, dropout)).to(device)
                h = model[1](model[0](xb))
                h = torch.where(keep, h / (1.0 - dropout), torch.zeros((), dtype=dtype))
                logits = model[2](h)
            loss = crit(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            last_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
        history.append({"train_loss": loss_sum / seen, "lr": last_lr})
    return module_flat(model), history


def make_data(n, d, c, seed=0, sep=0.8, dtype=np.float32):
    """Gaussian blobs: learnable but overlapping, so losses stay informative."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    centers = rng.normal(size=(c, d))
    X = sep * centers[y] + rng.normal(size=(n, d))
    return X.astype(dtype), y.astype(np.int64)
