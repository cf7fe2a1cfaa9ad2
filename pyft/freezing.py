"""Freezing policies: which parameters train, at which learning rate, and frozen BatchNorm.

=================  ==========================================================================
``head_only``      everything but the new head frozen (small data, similar domain)
``freeze_first``   the first ``k`` blocks frozen, the rest trainable (small data, dissimilar)
``full``           all trainable; pretrained parameters at ``lr_ratio`` x the head's learning
                   rate (default 0.1), optionally decayed geometrically towards the input
``scratch``        same architecture, re-initialised, one learning rate
=================  ==========================================================================

Frozen modules run in inference mode: BatchNorm uses (and never updates) its running statistics
and dropout is off, also after ``model.train()``, so a frozen prefix is a pure function of its
input -- what makes caching its output exact. ``train_bn=True`` lets BatchNorm layers inside the
frozen part train (affine parameters and batch statistics) instead.

:func:`freeze` (``model.freeze`` calls it) is the one owner of a model's frozen state: it makes
the :class:`FrozenState` that the model holds, and nothing else writes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Union

import torch
from torch import nn

from pyft._checks import ArgumentTypeError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from pyft.models import FineTunableModel

__all__ = ["Policy", "head_only", "freeze_first", "full", "scratch", "freeze",
           "FrozenState", "POLICIES"]

POLICIES = ("head_only", "freeze_first", "full", "scratch")


@dataclass(frozen=True)
class Policy:
    """A freezing policy; build one with :func:`head_only`, :func:`freeze_first`, :func:`full`
    or :func:`scratch`."""

    name: str
    k: Union[int, str, None] = None
    lr_ratio: float = 0.1
    layer_decay: Optional[float] = None
    train_bn: bool = False
    seed: int = 0

    def describe(self) -> Dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def head_only(*, train_bn: bool = False) -> Policy:
    """Train only the new head."""
    return _validated(Policy("head_only", train_bn=train_bn))


def freeze_first(k: Union[int, str], *, lr_ratio: float = 0.1, train_bn: bool = False) -> Policy:
    """Freeze the first ``k`` blocks (or up to and including the block named ``k``)."""
    return _validated(Policy("freeze_first", k=k, lr_ratio=lr_ratio, train_bn=train_bn))


def full(*, lr_ratio: float = 0.1, layer_decay: Optional[float] = None) -> Policy:
    """Train everything; pretrained parameters at ``lr_ratio`` times the head's learning rate.

    With ``layer_decay`` (in (0, 1]), block ``i`` of ``n`` trains at
    ``lr * lr_ratio * layer_decay ** (n - 1 - i)``: the closer to the input, the smaller.
    """
    return _validated(Policy("full", lr_ratio=lr_ratio, layer_decay=layer_decay))


def scratch(*, seed: int = 0) -> Policy:
    """Re-initialise every parameter (same architecture) and train all at one learning rate."""
    return _validated(Policy("scratch", seed=seed))


def _in_unit_interval(x: Any) -> bool:
    """Whether ``x`` is a real number (not a bool) in (0, 1]."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1


def _validated(p: Policy) -> Policy:
    if p.name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {p.name!r}")
    if not _in_unit_interval(p.lr_ratio):
        raise ValueError(f"lr_ratio must be a number in (0, 1]; got {p.lr_ratio!r}")
    if p.layer_decay is not None and not _in_unit_interval(p.layer_decay):
        raise ValueError(f"layer_decay must be None or a number in (0, 1]; got {p.layer_decay!r}")
    if not isinstance(p.train_bn, bool):  # np.bool_ too: a Policy is part of saved configs
        raise ArgumentTypeError(f"train_bn must be True or False; got {p.train_bn!r}")
    if p.name == "freeze_first" and p.k is None:
        raise ValueError("freeze_first needs k: a number of blocks or a block name")
    return p


def _as_policy(policy: Union[str, Policy], options: Dict[str, Any]) -> Policy:
    if isinstance(policy, Policy):
        if options:
            raise TypeError("pass options to the policy constructor, not with a Policy: "
                            f"{sorted(options)}")
        return _validated(policy)
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name ({', '.join(POLICIES)}) or a Policy; "
                        f"got {type(policy).__name__}")
    makers = {"head_only": head_only, "freeze_first": freeze_first, "full": full,
              "scratch": scratch}
    if policy not in makers:
        hint = did_you_mean(policy, POLICIES, n=1, cutoff=0.6)
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}{hint}")
    try:
        return makers[policy](**options)
    except TypeError as e:
        raise TypeError(f"bad options for policy {policy!r}: {e}") from None


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _keep_in_eval(module: nn.Module, _args: Any) -> None:
    module.training = False


@dataclass
class FrozenState:
    """What a policy froze in a model: its one owner is this module.

    :func:`freeze` makes one and stores it on the model (``model.frozen_state``); the model only
    calls :meth:`restore_modes` from its ``train()``.

    Attributes
    ----------
    policy : Policy
    modules : list of str
        The frozen part's root modules (qualified names in ``model.net``); they run in inference
        mode whatever ``model.train()`` says.
    hooks : list
        Forward pre-hooks that keep every frozen module in inference mode also when the network
        is called directly (``model.net.train(); model.net(x)``).
    """

    policy: Policy
    modules: List[str] = field(default_factory=list)
    hooks: List[Any] = field(default_factory=list)

    @classmethod
    def install(cls, net: nn.Module, policy: Policy, modules: List[str]) -> "FrozenState":
        state = cls(policy, list(modules))
        # A hook on every module of the frozen part, not only on its roots: a container such as
        # a ModuleList is never called itself, so a hook on it would never run.
        hooked = set()
        for name in modules:
            for m in net.get_submodule(name).modules():
                if id(m) not in hooked and not (policy.train_bn and _is_bn(m)):
                    hooked.add(id(m))
                    state.hooks.append(m.register_forward_pre_hook(_keep_in_eval))
        return state

    def release(self) -> None:
        """Remove the hooks (before another policy is applied)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def restore_modes(self, net: nn.Module, mode: bool) -> None:
        """After ``net.train(mode)``: frozen modules back to inference mode, except BatchNorm
        layers when ``train_bn`` lets them train."""
        for name in self.modules:
            frozen = net.get_submodule(name)
            frozen.train(False)
            if self.policy.train_bn:
                for m in frozen.modules():
                    if _is_bn(m):
                        m.train(mode)


def _check_rates(lr: Any, weight_decay: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}")


def freeze(model: "FineTunableModel", policy: Union[str, Policy] = "head_only", *,
           lr: float = 1e-3, weight_decay: float = 0.0, **options: Any) -> List[Dict[str, Any]]:
    """Apply ``policy`` to ``model`` and return parameter groups for a torch optimizer.

    Parameters
    ----------
    model : FineTunableModel
    policy : str or Policy
        ``"head_only"``, ``"freeze_first"`` (with ``k=``), ``"full"``, ``"scratch"``, or a Policy.
    lr : float
        The new head's learning rate; pretrained parameters get ``lr * lr_ratio``.
    weight_decay : float
        Applied to weight matrices and kernels only (never to biases or normalisation parameters).
    **options
        Policy options (``k``, ``lr_ratio``, ``layer_decay``, ``train_bn``, ``seed``).

    Returns
    -------
    list of dict
        ``{"params", "lr", "weight_decay", "name"}`` groups of trainable parameters, ready for
        ``torch.optim.AdamW(groups)``.
    """
    p = _as_policy(policy, options)
    _check_rates(lr, weight_decay)
    k = model.block_index(p.k, argument="k") if p.name == "freeze_first" else None

    # Validation is done: from here on the model changes.
    if model.frozen_state is not None:
        model.frozen_state.release()
        model.frozen_state = None
    if p.name == "scratch":
        _reinitialise(model, p.seed)
        model.pretrained = False
    head_ids = {id(q) for q in model.head.parameters()}
    block_of: Dict[int, int] = {}  # parameter id -> index of the first block holding it
    for i in range(len(model.blocks)):
        for q in model.block_parameters(i):
            block_of.setdefault(id(q), i)

    frozen_modules = _frozen_modules(model, p, k)
    frozen_ids = _frozen_parameters(model, p, k, frozen_modules, head_ids, block_of)
    for q in model.parameters():
        q.requires_grad_(id(q) not in frozen_ids)
    model.frozen_state = FrozenState.install(model.net, p, frozen_modules)
    model.train(model.training)
    return _parameter_groups(model, p, lr, weight_decay, head_ids, block_of)




def _frozen_modules(model: "FineTunableModel", p: Policy, k: Optional[int]) -> List[str]:
    if p.name == "head_only":
        return _modules_off_path(model.net, model.head_name)
    if p.name == "freeze_first":
        return [m for b in model.blocks[:k] for m in b.modules]
    return []


def _frozen_parameters(model: "FineTunableModel", p: Policy, k: Optional[int],
                       frozen_modules: List[str], head_ids: Set[int],
                       block_of: Dict[int, int]) -> Set[int]:
    """Ids of the parameters the policy freezes."""
    net = model.net
    frozen_ids = set()
    for name in frozen_modules:
        for q in net.get_submodule(name).parameters():
            frozen_ids.add(id(q))
    if p.name == "head_only":
        # Also parameters held directly by the modules on the path to the head (e.g. a ViT's
        # cls_token and pos_embed on the root module).
        frozen_ids |= {id(q) for q in net.parameters() if id(q) not in head_ids}
    elif p.name == "freeze_first" and k:
        # Parameters outside every block (e.g. a position embedding on the root module) go
        # with the first block.
        frozen_ids |= {id(q) for q in net.parameters()
                       if id(q) not in block_of and id(q) not in head_ids}
    if p.train_bn:
        for name in frozen_modules:
            for m in net.get_submodule(name).modules():
                if _is_bn(m):
                    frozen_ids -= {id(q) for q in m.parameters()}
    return frozen_ids


def _parameter_groups(model: "FineTunableModel", p: Policy, lr: float, weight_decay: float,
                      head_ids: Set[int], block_of: Dict[int, int]) -> List[Dict[str, Any]]:
    """Optimizer groups of the trainable parameters: the head at ``lr``, each block at its
    policy's rate, with weight decay on matrices and kernels only."""
    n_blocks = len(model.blocks)

    def body_lr(block: Optional[int]) -> float:
        if p.name == "scratch":
            return float(lr)
        base = lr * p.lr_ratio
        if p.layer_decay is not None and p.name == "full":
            i = 0 if block is None else block
            base *= p.layer_decay ** (n_blocks - 1 - i)
        return float(base)

    groups: Dict[Any, Dict[str, Any]] = {}
    for _name, q in model.net.named_parameters():
        if not q.requires_grad:
            continue
        if id(q) in head_ids:
            key, group_lr, label = ("head",), float(lr), "head"
        else:
            b = block_of.get(id(q))
            label = model.blocks[b].name if b is not None else "other"
            key, group_lr = ("body", b), body_lr(b)
        decay = weight_decay if q.ndim >= 2 else 0.0
        g = groups.setdefault(key + (decay > 0,), {"params": [], "lr": group_lr,
                                                   "weight_decay": float(decay), "name": label})
        g["params"].append(q)
    return list(groups.values())


def _modules_off_path(net: nn.Module, head_name: str) -> List[str]:
    """The largest modules that neither are nor contain the head."""
    out: List[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            q = f"{prefix}{name}"
            if q == head_name:
                continue
            if head_name.startswith(q + "."):
                visit(q + ".", child)
            else:
                out.append(q)

    visit("", net)
    return out


def _reinitialise(model: "FineTunableModel", seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        covered = set()
        for m in model.net.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
                covered |= {id(q) for q in m.parameters(recurse=False)}
        with torch.no_grad():
            for q in model.net.parameters():  # raw parameters no module knows how to reset
                if id(q) not in covered:
                    nn.init.trunc_normal_(q, std=0.02)
