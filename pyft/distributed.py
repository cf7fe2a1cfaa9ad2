"""Past one machine, on torch.distributed (torchrun; gloo on CPUs, NCCL on GPUs).

- :func:`init_from_env` joins the process group torchrun describes in the environment.
- Extraction: :func:`pyft.features.extract_features` splits the chunks of one cache entry over the
  ranks when a process group is initialised (byte-identical to one process, resumable).
- Head grids: :func:`pyft.grid.fit_grid` splits the grid points over the ranks.
- One large head: :func:`pyft.training.train_head_data_parallel` -- each rank computes the
  gradient of its share of every global batch and an all-reduce sums them, so the result is the
  one-process run with the same global batch (up to float summation order).
- :class:`pyft.FineTuner` (and ``pyft fit``): rank 0 advises and fits the L-BFGS head
  (:func:`on_rank0`), PyTorch training is data-parallel (:func:`all_reduce_gradients`,
  :func:`sync_buffers`).

No sockets, schedulers or cluster code of pyft's own: everything goes through torch.distributed.
This module holds that plumbing only; the trainers that use it live with their kind of training.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from pyft._checks import ArgumentTypeError

__all__ = ["init_from_env", "rank_and_world", "process_group", "Ranks", "on_rank0",
           "check_same_on_all_ranks", "all_reduce_gradients",
           "sync_buffers", "broadcast_state"]


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
            raise ArgumentTypeError("distributed must be None, True, False or a "
                                    f"torch.distributed ProcessGroup; got {distributed!r}")
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


def __getattr__(name: str) -> Any:
    # train_head_data_parallel moved to pyft.training; the README's old path keeps working.
    # Resolved on use: pyft.training imports this module.
    if name == "train_head_data_parallel":
        from pyft.training import train_head_data_parallel

        return train_head_data_parallel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
