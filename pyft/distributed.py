"""Past one machine, on torch.distributed (torchrun; gloo on CPUs, NCCL on GPUs).

- :func:`init_from_env` joins the process group torchrun describes in the environment.
- Extraction: :func:`pyft.cache.extract_features` splits the chunks of one cache entry over the
  ranks when a process group is initialised (byte-identical to one process, resumable).
- Head grids: :func:`pyft.grid.fit_grid` splits the grid points over the ranks.
- One large head: :func:`train_head_data_parallel` -- each rank computes the gradient of its share
  of every global batch and an all-reduce sums them, so the result is the one-process run with
  the same global batch (up to float summation order).
- :class:`pyft.FineTuner` (and ``pyft fit``): rank 0 advises and fits the L-BFGS head
  (:func:`on_rank0`), PyTorch training is data-parallel (:func:`all_reduce_gradients`,
  :func:`sync_buffers`).

No sockets, schedulers or cluster code of pyft's own: everything goes through torch.distributed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["init_from_env", "rank_and_world", "process_group", "Ranks", "on_rank0",
           "check_same_on_all_ranks", "all_reduce_gradients",
           "sync_buffers", "broadcast_state", "train_head_data_parallel"]


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise torch.distributed from torchrun's variables (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless a group exists. Returns whether one is active.

    The default backend is gloo, and ``"cpu:gloo,cuda:nccl"`` (with the CUDA device set from
    ``LOCAL_RANK``) where CUDA is available."""
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
        # pyft's own collectives (gradients of CPU-trained heads, validation sums, objects) are
        # on CPU tensors: gloo carries those, NCCL the CUDA tensors of a GPU run.
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised group, (0, 1) without one."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class Ranks(NamedTuple):
    """This process's place in the group pyft splits work over."""

    rank: int  # in ``group``
    world: int  # size of ``group``
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group (or none)

    @property
    def src0(self) -> int:
        """The global rank of the group's rank 0 (what ``src=`` of a broadcast takes)."""
        if self.group is None:
            return 0
        import torch.distributed as dist

        return dist.get_global_rank(self.group, 0)


def process_group(distributed: Any) -> Ranks:
    """The ranks to split work over for a ``distributed=`` argument.

    ``False``: this process alone. A :class:`Ranks`: itself. A ``torch.distributed``
    ``ProcessGroup`` (e.g. from ``dist.new_group``): its members, which must all call the same
    pyft function. ``None`` (the
    default of pyft's functions) and ``True``: the initialised default group; without one, a group
    is initialised from torchrun's environment (:func:`init_from_env`) when it describes several
    processes. ``None`` then falls back to this process alone; ``True`` raises a RuntimeError.
    """
    if distributed is False:
        return Ranks(0, 1)
    if isinstance(distributed, Ranks):  # already resolved (a caller handing on its ranks)
        return distributed
    import sys

    # A process group can only exist if torch.distributed was imported, or under torchrun:
    # otherwise torch is not imported here (fit_grid runs without it).
    dist = sys.modules.get("torch.distributed")
    if distributed is not None and distributed is not True:
        if dist is not None and distributed is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("this process is not a member of the process group passed as "
                             "distributed= (new_group() returned NON_GROUP_MEMBER here); call "
                             "pyft only on the group's ranks")
        if dist is None or not isinstance(distributed, dist.ProcessGroup):
            raise TypeError("distributed must be None, True, False or a torch.distributed "
                            f"ProcessGroup; got {distributed!r}")
        return Ranks(dist.get_rank(distributed), dist.get_world_size(distributed), distributed)
    ready = dist is not None and dist.is_available() and dist.is_initialized()
    if not ready and int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        ready = init_from_env()
        import torch.distributed as dist
    if distributed and not ready:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or run under torchrun)")
    if not ready:
        return Ranks(0, 1)
    return Ranks(dist.get_rank(), dist.get_world_size())


def on_rank0(fn: Callable[[], Any], what: str, ranks: Ranks) -> Any:
    """Run ``fn`` on the group's rank 0 only and hand its (picklable) result to every rank.

    Every rank must call it (it is a collective). When ``fn`` raises on rank 0, rank 0 re-raises
    the exception and the other ranks raise a RuntimeError that names ``what`` and the error,
    instead of waiting for a result that never comes.
    """
    if ranks.world <= 1:
        return fn()
    import torch.distributed as dist

    payload: List[Any] = [None]
    error: Optional[BaseException] = None
    if ranks.rank == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # handed to the other ranks, then re-raised here
            error = e
            payload = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=ranks.src0, group=ranks.group)
    status, value = payload[0]
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed while {what}: {value}")
    return value


def check_same_on_all_ranks(parts: Dict[str, Any], what: str, ranks: Ranks) -> None:
    """Raise the same ValueError on every rank when ``parts`` (a dict of picklable values: data
    fingerprints, settings, weight hashes) differs between ranks; names the differing entries
    and ranks. A collective: every rank calls it."""
    import torch.distributed as dist

    every: List[Any] = [None] * ranks.world
    dist.all_gather_object(every, parts, group=ranks.group)
    differ = sorted({name for p in every for name in set(p) | set(every[0])
                     if p.get(name) != every[0].get(name)})
    if differ:
        bad = [r for r, p in enumerate(every) if p != every[0]]
        raise ValueError(f"the ranks disagree on the {', '.join(differ)} of {what}: rank(s) {bad} "
                         "differ from rank 0. Every rank must pass the same model weights, data "
                         "and options")


def all_reduce_gradients(params: List[Any], ranks: Ranks) -> None:
    """Sum the gradients of ``params`` over the ranks, in one flat buffer (a parameter without a
    gradient on this rank -- e.g. an empty share of a batch -- contributes zeros)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ranks.group)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype)
        off += n


def sync_buffers(module: Any, ranks: Ranks) -> None:
    """Make the buffers of ``module`` (BatchNorm running statistics) equal on every rank: floating
    buffers are averaged, others (step counters) are rank 0's."""
    import torch
    import torch.distributed as dist

    for b in module.buffers():
        if torch.is_floating_point(b):
            t = b.detach().double()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ranks.group)
            b.data.copy_(t / ranks.world)
        else:
            dist.broadcast(b.data, src=ranks.src0, group=ranks.group)


def broadcast_state(module: Any, ranks: Ranks) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    import torch.distributed as dist

    for t in module.state_dict().values():
        dist.broadcast(t.data, src=ranks.src0, group=ranks.group)


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
    ``distributed`` chooses the ranks as in :func:`process_group` (default: the initialised
    group, or one from torchrun's environment; a ``ProcessGroup`` for a subset of the ranks).

    Returns
    -------
    params : ndarray, float32
        The flat head, laid out as :func:`pyft.init_head_params` lays it out.
    history : list of dict
        Per-epoch mean training loss and learning rate.
    """
    import torch

    from pyft import _core
    from pyft._arrays import as_feature_array
    from pyft._checks import check_choice, check_number
    from pyft.heads import init_head_params

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
    X, bf16 = as_feature_array(features)
    y = np.asarray(labels)
    n, d = X.shape
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be 1-D with {n} entries to match features; got shape "
                         f"{y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers in [0, {num_classes}); got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}); got values in "
                         f"[{y.min()}, {y.max()}]")
    ranks = process_group(distributed)
    rank, world = ranks.rank, ranks.world
    C, H = int(num_classes), int(hidden_size)
    p = init_head_params(head, d, C, H, seed=seed) if params is None else \
        np.array(params, dtype=np.float32).ravel()
    n_params = C * d + C if head == "linear" else H * d + H + C * H + C
    if p.size != n_params:
        raise ValueError(f"params must hold {n_params} values for a {head} head on {d} features "
                         f"and {C} classes; got {p.size}")
    m_buf = np.zeros_like(p)
    v_buf = np.zeros_like(p) if optimizer == "adamw" else None
    opts = dict(head=head, num_classes=C, hidden_size=H, activation=activation,
                n_threads=n_threads)
    step_opts = dict(head=head, in_features=d, num_classes=C, hidden_size=H, optimizer=optimizer,
                     weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                     beta1=beta1, beta2=beta2, eps=eps)
    steps_per_epoch = -(-n // batch_size)
    total = steps_per_epoch * epochs
    buf = np.empty((min(batch_size, n), d), np.float32)
    grad = torch.zeros(n_params + 1, dtype=torch.float32)  # | this rank's loss sum
    history = []
    step = 0
    for epoch in range(epochs):
        order = np.asarray(_core.epoch_permutation(n, seed, epoch))
        total_loss = 0.0
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            mine = np.sort(batch[rank::world])
            grad.zero_()
            if len(mine):
                xb = _core.gather_rows(X, mine, out=buf[:len(mine)], n_threads=n_threads,
                                       bfloat16=bf16)
                f, g = _core.objective(p, xb, y[mine], **opts)
                grad[:n_params] = torch.from_numpy(g)
                grad[:n_params] *= len(mine)  # the gradient of the summed loss of these rows
                grad[n_params] = f * len(mine)
            if world > 1:  # one float32 all-reduce of C x d (+ C) values per step
                import torch.distributed as dist

                dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ranks.group)
            g_mean = (grad[:n_params] / len(batch)).numpy()
            loss_sum = float(grad[n_params])
            lr_t = lr * _core.lr_factor(schedule, step, total, steps_per_epoch,
                                        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
            step += 1
            _core.optimizer_step(p, g_mean, m_buf, v_buf, step=step, lr=lr_t, **step_opts)
            total_loss += loss_sum
        history.append({"epoch": epoch, "train_loss": total_loss / max(n, 1), "lr": lr_t})
    return p, history

