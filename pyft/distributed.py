"""Past one machine, on torch.distributed (torchrun; gloo on CPUs, NCCL on GPUs).

- :func:`init_from_env` joins the process group torchrun describes in the environment.
- Extraction: :func:`pyft.cache.extract_features` splits the chunks of one cache entry over the
  ranks when a process group is initialised (byte-identical to one process, resumable).
- Head grids: :func:`pyft.grid.fit_grid` splits the grid points over the ranks.
- One large head: :func:`train_head_data_parallel` -- each rank computes the gradient of its share
  of every global batch and an all-reduce sums them, so the result is the one-process run with
  the same global batch (up to float summation order).

No sockets, schedulers or cluster code of pyft's own: everything goes through torch.distributed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["init_from_env", "rank_and_world", "process_group", "train_head_data_parallel"]


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise torch.distributed from torchrun's variables (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless a group exists. Returns whether one is active."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {missing} are not set; "
                           "launch with torchrun --nproc-per-node N")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised group, (0, 1) without one."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def process_group(distributed: Optional[bool]) -> Tuple[int, int]:
    """(rank, world size) to split work over for a ``distributed=`` argument: ``False`` -> (0, 1);
    ``None`` -> the initialised group if there is one, else (0, 1); ``True`` -> the group, or a
    RuntimeError when none is initialised."""
    if distributed is False:
        return 0, 1
    import sys

    # A process group can only exist if torch.distributed was imported: never import torch here.
    dist = sys.modules.get("torch.distributed")
    if distributed and dist is None:
        import torch.distributed as dist
    ready = dist is not None and dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or run under torchrun)")
    if not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def on_rank0(fn: Callable[[], Any], what: str, rank: int, world: int) -> Any:
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank.

    Every rank must call it (it is a collective). When ``fn`` raises on rank 0, rank 0 re-raises
    the exception and the other ranks raise a RuntimeError that names ``what`` and the error,
    instead of waiting for a result that never comes.
    """
    if world <= 1:
        return fn()
    import torch.distributed as dist

    payload: List[Any] = [None]
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # handed to the other ranks, then re-raised here
            error = e
            payload = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed while {what}: {value}")
    return value


def all_reduce_gradients(params: List[Any]) -> None:
    """Sum the gradients of ``params`` over the ranks, in one flat buffer (a parameter without a
    gradient on this rank -- e.g. an empty share of a batch -- contributes zeros)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype)
        off += n


def sync_buffers(module: Any) -> None:
    """Make the buffers of ``module`` (BatchNorm running statistics) equal on every rank: floating
    buffers are averaged, others (step counters) are rank 0's."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    for b in module.buffers():
        if torch.is_floating_point(b):
            t = b.detach().double()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            b.data.copy_(t / world)
        else:
            dist.broadcast(b.data, src=0)


def broadcast_state(module: Any) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    import torch.distributed as dist

    for t in module.state_dict().values():
        dist.broadcast(t.data, src=0)


def train_head_data_parallel(features: Any, labels: Any, num_classes: int, *, lr: float = 0.1,
                             momentum: float = 0.9, weight_decay: float = 0.0, epochs: int = 10,
                             batch_size: int = 256, seed: int = 0,
                             params: Optional[np.ndarray] = None
                             ) -> Tuple[np.ndarray, List[Dict[str, float]]]:
    """Train one linear head with SGD, data-parallel over the process group's ranks.

    Every rank holds the same ``features`` (e.g. the cache entry's memmap) and walks the same
    global batches (``pyft._core.epoch_permutation``); rank ``r`` computes the summed loss
    gradient of rows ``r::world`` of each batch, an all-reduce adds the ranks' gradients, and each
    rank applies the same step. Without a group it is the one-process run. The semantics are the
    native trainer's SGD (momentum, L2 weight decay on the weights only, mean loss over the
    global batch).

    Returns
    -------
    params : ndarray (C*D + C,), float32
        ``W (C x D) | b (C)``, as :func:`pyft.init_head_params` lays it out.
    history : list of dict
        Per-epoch mean training loss.
    """
    import torch
    import torch.distributed as dist

    from pyft import _core
    from pyft.heads import init_head_params

    X = features
    y = np.asarray(labels, dtype=np.int64)
    n, d = X.shape
    if len(y) != n:
        raise ValueError(f"labels must have {n} entries to match features; got {len(y)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got values in [{y.min()}, {y.max()}]")
    rank, world = rank_and_world()
    p = init_head_params("linear", d, num_classes, seed=seed) if params is None else \
        np.array(params, dtype=np.float32)
    W = torch.nn.Parameter(torch.from_numpy(p[: num_classes * d].reshape(num_classes, d).copy()))
    b = torch.nn.Parameter(torch.from_numpy(p[num_classes * d:].copy()))
    opt = torch.optim.SGD([{"params": [W], "weight_decay": weight_decay},
                           {"params": [b], "weight_decay": 0.0}], lr=lr, momentum=momentum)
    yt = torch.from_numpy(y)
    history = []
    for epoch in range(epochs):
        order = np.asarray(_core.epoch_permutation(n, seed, epoch))
        total = 0.0
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            mine = np.sort(batch[rank::world])
            xb = torch.from_numpy(np.asarray(X[mine], dtype=np.float32))
            loss = torch.nn.functional.cross_entropy(xb @ W.T + b, yt[mine], reduction="sum")
            opt.zero_grad(set_to_none=False)
            (loss / len(batch)).backward()
            if world > 1:
                for t in (W.grad, b.grad):
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
                red = torch.tensor([float(loss)])
                dist.all_reduce(red, op=dist.ReduceOp.SUM)
                total += float(red)
            else:
                total += float(loss.detach())
            opt.step()
        history.append({"epoch": epoch, "train_loss": total / n})
    out = np.concatenate([W.detach().numpy().ravel(), b.detach().numpy()]).astype(np.float32)
    return out, history
