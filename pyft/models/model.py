"""The fine-tunable model: a pretrained body with a new N-way head, its blocks in forward order,
the preprocessing its weights expect, and the adapter of its architecture family.

Freezing state is owned by :mod:`pyft.freezing`: the model only holds the
:class:`~pyft.freezing.FrozenState` that :func:`pyft.freezing.freeze` made, and asks it to keep
the frozen part in inference mode when :meth:`FineTunableModel.train` is called.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from pyft._checks import did_you_mean
from pyft.models.adapters import Adapter
from pyft.models.blocks import Block

__all__ = ["FineTunableModel", "Block"]


class _Stop(Exception):
    """Raised inside a forward hook to end a forward pass once everything needed was captured."""


class FineTunableModel(nn.Module):
    """A pretrained body with a new N-way head, its blocks in order and its preprocessing.

    ``model(x)`` runs the network (``x`` prepared by ``model.preprocess``); for text models
    ``model(input_ids=..., attention_mask=...)``. The wrapped network is ``model.net`` and keeps its
    own parameter names (``net.layer1.0.conv1.weight``).

    Attributes
    ----------
    spec : str
        What it was loaded from (``"efficientnet_lite0"``, ``"torchvision:resnet50"``, ...).
    kind : {"image", "text"}
    num_classes : int
        Outputs of the head.
    head_name : str
        Qualified name of the head inside ``net``.
    blocks : list of Block
        The body's blocks in forward order.
    preprocessing : ImagePreprocessing or TextPreprocessing
    pretrained : bool
        Whether the body holds pretrained weights (False after the ``scratch`` policy).
    adapter : Adapter
        What its architecture family means by a cut: blocks, split, frozen-part hash
        (:mod:`pyft.models.adapters`).
    frozen_state : FrozenState or None
        What :meth:`freeze` froze (:class:`pyft.freezing.FrozenState`); ``None`` before.
    """

    def __init__(self, net: nn.Module, *, spec: str, kind: str, num_classes: int, head_name: str,
                 blocks: Sequence[Block], preprocessing: Any, pretrained: bool,
                 weights_source: str, adapter: Optional[Adapter] = None) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.kind = kind
        self.num_classes = int(num_classes)
        self.head_name = head_name
        self.blocks = list(blocks)
        self.preprocessing = preprocessing
        self.pretrained = pretrained
        self.weights_source = weights_source
        self.adapter = adapter if adapter is not None else Adapter()
        self.frozen_state: Any = None  # a pyft.freezing.FrozenState, made by freeze()
        # Loaded networks come back in inference mode, whatever their library's habit (torchvision
        # builds in train mode, Hugging Face loads in eval mode); training loops call model.train().
        self.eval()

    # ------------------------------------------------------------------ structure
    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    @property
    def block_names(self) -> List[str]:
        return [b.name for b in self.blocks]

    def block_index(self, block: Union[int, str], *, argument: str = "k") -> int:
        """Number of blocks up to and including ``block`` (an int is returned as given, checked)."""
        n = len(self.blocks)
        if isinstance(block, (bool, np.bool_)):
            raise TypeError(f"{argument} must be an int or a block name; got {block!r}")
        if isinstance(block, (int, np.integer)):
            if not 0 <= int(block) <= n:
                raise ValueError(
                    f"{argument} must be in [0, {n}] for {self.spec}, which has {n} blocks "
                    f"({_short_list(self.block_names)}); got {int(block)}"
                )
            return int(block)
        if isinstance(block, str):
            # A block name, or the name of a module or parameter inside a block.
            real = block in dict(self.net.named_modules()) or \
                block in dict(self.net.named_parameters())
            for i, b in enumerate(self.blocks):
                if block == b.name or (real and any(block == m or block.startswith(m + ".")
                                                    for m in b.modules)):
                    return i + 1
            hint = did_you_mean(block, self.block_names, n=3, cutoff=0.6)
            raise ValueError(
                f"{argument}={block!r} names no block of {self.spec}; blocks are "
                f"{_short_list(self.block_names)}{hint}"
            )
        raise TypeError(f"{argument} must be an int or a block name; got {type(block).__name__}")

    def block_parameters(self, i: int) -> List[nn.Parameter]:
        return _unique_params(self.net.get_submodule(m) for m in self.blocks[i].modules)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net(*args, **kwargs)

    def preprocess(self, inputs: Any) -> Any:
        """Raw images (arrays, tensors, PIL) or texts to what ``forward`` takes."""
        return self.preprocessing(inputs)

    def uses_channels_last(self, flag: Optional[bool] = None) -> bool:
        """Whether to run in the channels-last memory format: ``flag`` when given, else for
        image models (4-D convolution inputs), which oneDNN and cuDNN run faster in NHWC."""
        return bool(self.kind == "image" if flag is None else flag)

    def run(self, prepared: Any) -> torch.Tensor:
        """``forward`` on the output of :meth:`preprocess` (a tensor, or a dict for text)."""
        if isinstance(prepared, dict):
            return self(**prepared)
        return self(prepared)

    def features(self, prepared: Any) -> torch.Tensor:
        """The head's input (pooled body output), shape (n, head.in_features)."""
        captured: Dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, args: Tuple[Any, ...]) -> None:
            captured["x"] = args[0]
            raise _Stop

        handle = self.head.register_forward_pre_hook(grab)
        try:
            self.run(prepared)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["x"]

    def block_outputs(self, prepared: Any, blocks: Iterable[int], pool: bool = True
                      ) -> Dict[int, torch.Tensor]:
        """Outputs of the given block indices (0-based) in one forward pass that stops early.

        With ``pool=True`` each output is reduced to one vector per sample: spatial mean for
        (n, C, H, W) maps, mean over the attention mask for (n, tokens, width) sequences.
        """
        wanted = sorted(set(int(i) for i in blocks))
        for i in wanted:
            if not 0 <= i < len(self.blocks):
                raise ValueError(f"blocks must be in [0, {len(self.blocks)}); got {i}")
        mask = prepared.get("attention_mask") if isinstance(prepared, dict) else None
        captured: Dict[int, torch.Tensor] = {}
        handles = []
        last = wanted[-1] if wanted else -1

        def make_hook(i: int, where: str) -> Callable[..., None]:
            def hook(_m: nn.Module, args: Tuple[Any, ...], out: Any = None) -> None:
                x = args[0] if where == "input" else out
                if isinstance(x, (tuple, list)):
                    x = x[0]
                if i not in captured:
                    y = _pool(x, mask) if pool else x
                    # A copy unless the pass stops here: a later in-place operation (a
                    # ReLU(inplace=True) after the tap) would change the captured tensor.
                    captured[i] = y if i == last else y.clone()
                if i == last:
                    raise _Stop
            return hook

        for i in wanted:
            name, where = self.blocks[i].tap
            mod = self.net.get_submodule(name)
            hook = make_hook(i, where)
            handles.append(mod.register_forward_pre_hook(hook) if where == "input"
                           else mod.register_forward_hook(hook))
        try:
            self.run(prepared)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    # ------------------------------------------------------------------ freezing
    @property
    def policy(self) -> Any:
        """The :class:`pyft.freezing.Policy` last applied by :meth:`freeze`, or ``None``."""
        return None if self.frozen_state is None else self.frozen_state.policy

    def freeze(self, policy: Any = "head_only", **options: Any) -> List[Dict[str, Any]]:
        """Apply a freezing policy and return optimizer parameter groups; see
        :func:`pyft.freezing.freeze`."""
        # Imported when called: pyft.freezing imports pyft.models only for type checking, so
        # neither module needs the other to load.
        from pyft.freezing import freeze

        return freeze(self, policy, **options)

    def train(self, mode: bool = True) -> "FineTunableModel":
        super().train(mode)
        if self.frozen_state is not None:  # the frozen part keeps inference behaviour
            self.frozen_state.restore_modes(self.net, mode)
        return self

    # ------------------------------------------------------------------ identity
    def weights_hash(self, modules: Optional[Sequence[str]] = None) -> str:
        """SHA-256 over parameters and buffers (optionally only those of ``modules``)."""
        h = hashlib.sha256()
        sd = self.net.state_dict()
        names = sorted(sd)
        if modules is not None:
            names = [k for k in names if any(k == m or k.startswith(m + ".") for m in modules)]
        for k in names:
            t = sd[k].detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def describe(self) -> Dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "head": self.head_name,
            "blocks": self.block_names,
            "preprocessing": self.preprocessing.key(),
            "parameters": self.num_parameters(),
            "trainable_parameters": self.num_parameters(trainable_only=True),
            "weights": self.weights_source,
            "policy": None if self.policy is None else self.policy.describe(),
        }

    def extra_repr(self) -> str:
        return (f"spec={self.spec!r}, num_classes={self.num_classes}, head={self.head_name!r}, "
                f"blocks={len(self.blocks)}")


# ====================================================================== helpers
def _short_list(names: Sequence[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(list(names[:limit // 2]) + ["..."] + list(names[-limit // 2:]))


def _unique_params(modules: Iterable[nn.Module]) -> List[nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def to_channels_last(x: Any) -> Any:
    """``x`` in the channels-last memory format if it is a 4-D tensor, else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _pool(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        if mask is not None and mask.shape[:2] == x.shape[:2]:
            m = mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return x.mean(1)
    if x.ndim == 2:
        return x
    return x.flatten(1)


