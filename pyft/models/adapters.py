"""One adapter per architecture family: what a cut after block k means for that family.

An adapter says

- where the family's blocks are (:meth:`Adapter.blocks`, at load time);
- how the model splits after block ``k`` into a prefix (what the feature cache stores) and a
  suffix (what ``freeze_first(k)`` trains): a hand-written split built from the network's own
  modules where pyft knows the forward (:meth:`Adapter.stages`, :meth:`Adapter.hand_split`),
  else the generic splits of :mod:`pyft.models.splitting` (Hugging Face encoder layers, or a
  ``torch.fx`` trace);
- which weights the activations at a cut depend on (:meth:`Adapter.frozen_hash`, the feature
  cache's key).

The loaders of :mod:`pyft.models.loading` pick the adapter; a module given to
:func:`pyft.wrap_model` gets the generic :class:`Adapter`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from pyft.models.blocks import (
    Block,
    efficientnet_lite0_blocks,
    generic_blocks,
    resnet_blocks,
    text_blocks,
    timm_blocks,
    vgg_blocks,
)
from pyft.models.splitting import fx_split, text_split

__all__ = ["Adapter", "EfficientNetLiteAdapter", "TorchvisionResNetAdapter",
           "TorchvisionVGGAdapter", "TorchvisionAdapter", "TimmAdapter", "HFTextAdapter"]

Stages = Tuple[List[nn.Module], nn.Module]


# ---------------------------------------------------------------------------- stage modules
class _Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _MBBlock(nn.Module):
    """An EfficientNet block with the drop-connect rate its position in the network gives it."""

    def __init__(self, block: nn.Module, rate: float) -> None:
        super().__init__()
        self.block, self.rate = block, rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.rate)


class _PoolHead(nn.Module):
    def __init__(self, pool: nn.Module, dropout: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.pool, self.dropout, self.fc = pool, dropout, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


class _RestAfterFeatures(nn.Module):
    """``net.forward`` with ``net.features`` replaced by its last blocks (torchvision's pattern)."""

    def __init__(self, net: nn.Module, start: int) -> None:
        super().__init__()
        self.net = net
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.net.features
        try:
            self.net._modules["features"] = nn.Sequential(*list(full.children())[self.start:])
            return self.net(x)
        finally:
            self.net._modules["features"] = full


# ---------------------------------------------------------------------------- the generic module
class Adapter:
    """A network pyft knows nothing special about (:func:`pyft.wrap_model`): its top-level
    children are the blocks, ``nn.Sequential`` networks split by hand, others by ``torch.fx``.
    Text models (``kind == "text"``) split between encoder layers whatever their family."""

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        """The body's blocks in forward order (computed once, when the model is loaded)."""
        return generic_blocks(net, head_name)

    def stages(self, model: Any) -> Optional[Stages]:
        """One module per block and the tail (pooling + head) when pyft knows the forward,
        else ``None`` (the split then comes from ``torch.fx``)."""
        net = model.net
        if not (isinstance(net, nn.Sequential) and all(b.name.isdigit() for b in model.blocks)):
            return None
        children = list(net.named_children())
        idx = {name: i for i, (name, _) in enumerate(children)}
        cuts = [idx[b.name] for b in model.blocks]
        # A stage ends with its block's module, so the prefix's output is the block's tap (what
        # the cache stores for a cut); parameter-free modules after a block (activation,
        # flatten) run at the start of the next stage, those after the last block in the tail.
        stages = []
        for j, stop in enumerate(cuts):
            start = cuts[j - 1] + 1 if j else 0
            stages.append(nn.Sequential(*[m for _, m in children[start:stop + 1]]))
        return stages, nn.Sequential(*[m for _, m in children[cuts[-1] + 1:]])

    def hand_split(self, model: Any, k: int) -> Optional[Tuple[nn.Module, nn.Module]]:
        """(prefix, suffix) from :meth:`stages`, or ``None`` when there are none."""
        found = self.stages(model)
        if found is None:
            return None
        stages, tail = found
        if len(stages) != len(model.blocks):  # pragma: no cover - adapter bug
            raise RuntimeError(f"{model.spec}: {len(stages)} stages for {len(model.blocks)} blocks")
        return nn.Sequential(*stages[:k]), nn.Sequential(*stages[k:], tail)

    def split(self, model: Any, k: int) -> Tuple[nn.Module, nn.Module, str]:
        """``(prefix, suffix, method)`` for a cut after block ``k`` (``1 <= k <= len(blocks)``);
        raises :class:`~pyft.models.splitting.SplitError` when there is no split there."""
        if model.kind == "text":
            prefix, suffix = text_split(model, k)
            return prefix, suffix, "text layers"
        found = self.hand_split(model, k)
        if found is not None:
            return found[0], found[1], "adapter"
        prefix, suffix = fx_split(model, k)
        return prefix, suffix, "torch.fx"

    def frozen_hash(self, model: Any, cut: Optional[int]) -> str:
        """SHA-256 of the weights the activations at ``cut`` depend on (``None``: the whole body).

        The value is part of every feature-cache key: changing what it covers orphans the
        entries users have on disk."""
        head = model.head_name
        if cut is None:
            names = [n for n in model.net.state_dict()
                     if not (n == head or n.startswith(head + "."))]
            return model.weights_hash(names)
        in_blocks = [m for b in model.blocks for m in b.modules]
        prefix = [m for b in model.blocks[:cut] for m in b.modules]
        outside = [n for n in model.net.state_dict()
                   if not any(n == m or n.startswith(m + ".") for m in in_blocks)
                   and not (n == head or n.startswith(head + "."))]
        return model.weights_hash(prefix + outside)


# ---------------------------------------------------------------------------- families
class EfficientNetLiteAdapter(Adapter):
    """``efficientnet_lite0`` (the ``efficientnet_lite_pytorch`` network): stem, MBConv blocks
    with their position's drop-connect rate, head convolution."""

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        return efficientnet_lite0_blocks(net)

    def stages(self, model: Any) -> Optional[Stages]:
        net = model.net
        n = len(net._blocks)
        rate = net._global_params.drop_connect_rate or 0.0
        stages: List[nn.Module] = [_Stem(net._conv_stem, net._bn0, net._swish)]
        stages += [_MBBlock(b, rate * i / n if rate else None) for i, b in enumerate(net._blocks)]
        stages.append(_Stem(net._conv_head, net._bn1, net._swish))
        return stages, _PoolHead(net._avg_pooling, net._dropout, net._fc)


class TorchvisionResNetAdapter(Adapter):
    """torchvision ResNets (and ResNeXt, Wide ResNet): stem, then ``layer1`` to ``layer4``."""

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        return resnet_blocks(net)

    def stages(self, model: Any) -> Optional[Stages]:
        net = model.net
        names = model.block_names
        if not (names == ["stem", "layer1", "layer2", "layer3", "layer4"]
                and hasattr(net, "avgpool") and hasattr(net, "fc")):
            return super().stages(model)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4], \
            _PoolHead(net.avgpool, nn.Identity(), net.fc)


class TorchvisionVGGAdapter(Adapter):
    """torchvision VGGs: convolution groups up to each max-pool, then the classifier's layers."""

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        return vgg_blocks(net, head_name)

    def stages(self, model: Any) -> Optional[Stages]:
        net = model.net
        stages = []
        for b in model.blocks:
            mods = [net.get_submodule(m) for m in b.modules]
            if b.name == "fc6":
                mods = [net.avgpool, _Flatten()] + mods
            stages.append(nn.Sequential(*mods))
        return stages, net.get_submodule(model.head_name)


class TorchvisionAdapter(Adapter):
    """Other torchvision classifiers: generic blocks; built as ``features`` + ``avgpool`` +
    ``classifier`` (MobileNet, EfficientNet, ConvNeXt, ...), a cut inside ``features`` splits
    by hand, other cuts by ``torch.fx``."""

    def hand_split(self, model: Any, k: int) -> Optional[Tuple[nn.Module, nn.Module]]:
        net = model.net
        if all(b.name.startswith("features.") for b in model.blocks[:k]) \
                and hasattr(net, "features") and isinstance(net.features, nn.Sequential):
            feats = list(net.features.children())
            n_feat_blocks = sum(1 for b in model.blocks if b.name.startswith("features."))
            if n_feat_blocks == len(feats) and k <= len(feats):
                return nn.Sequential(*feats[:k]), _RestAfterFeatures(net, k)
        return super().hand_split(model, k)


class TimmAdapter(Adapter):
    """timm models: the blocks of timm's own coarse group matcher; splits by ``torch.fx``."""

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        return timm_blocks(net, head_name)


class HFTextAdapter(Adapter):
    """Hugging Face text encoders (``minilm-l6``, ``hf:<dir>``): the embeddings, then each
    encoder layer; splits between layers with the attention mask."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def blocks(self, net: nn.Module, head_name: str) -> List[Block]:
        return text_blocks(net, self.spec)
