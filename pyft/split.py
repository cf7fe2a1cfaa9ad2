"""Split a fine-tunable model after its first k blocks: ``suffix(prefix(x)) == model(x)``.

The feature cache stores ``prefix(x)`` once; ``freeze_first(k)`` then trains ``suffix`` on the
cached activations. A split needs to know how the network's forward chains its blocks, so it
exists for the architectures whose forward pyft knows: EfficientNet-Lite0, torchvision ResNets
(and ResNeXt / Wide ResNet), VGG and the torchvision networks built as ``features`` +
``avgpool`` + ``classifier`` (EfficientNet, MobileNet, ConvNeXt, ...) when the cut lies inside
``features``, and ``nn.Sequential`` networks. For others :func:`split_model` raises
``NotImplementedError`` and ``freeze_first`` trains end to end with the prefix frozen.

The modules returned share their parameters with the model (nothing is copied).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

__all__ = ["split_model", "can_split"]


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


def _stages(model: Any) -> Tuple[List[nn.Module], nn.Module]:
    """One module per block and the tail (pooling + head), for the architectures pyft knows."""
    net = model.net
    names = model.block_names
    if model.spec == "efficientnet_lite0":
        n = len(net._blocks)
        rate = net._global_params.drop_connect_rate or 0.0
        stages: List[nn.Module] = [_Stem(net._conv_stem, net._bn0, net._swish)]
        stages += [_MBBlock(b, rate * i / n if rate else None) for i, b in enumerate(net._blocks)]
        stages.append(_Stem(net._conv_head, net._bn1, net._swish))
        return stages, _PoolHead(net._avg_pooling, net._dropout, net._fc)
    if names[:1] == ["stem"] and names[1:] == ["layer1", "layer2", "layer3", "layer4"] \
            and hasattr(net, "avgpool") and hasattr(net, "fc") and model.spec.startswith("torchvision:"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4], \
            _PoolHead(net.avgpool, nn.Identity(), net.fc)
    if model.spec.startswith("torchvision:vgg"):
        stages = []
        for b in model.blocks:
            mods = [net.get_submodule(m) for m in b.modules]
            if b.name == "fc6":
                mods = [net.avgpool, _Flatten()] + mods
            stages.append(nn.Sequential(*mods))
        return stages, net.get_submodule(model.head_name)
    if isinstance(net, nn.Sequential) and all(b.name.isdigit() for b in model.blocks):
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
    raise NotImplementedError(
        f"pyft cannot split {model.spec} between blocks: its forward is not a chain pyft knows. "
        "freeze_first trains it end to end with the prefix frozen (no cached prefix)")


def can_split(model: Any, k: int) -> bool:
    """Whether :func:`split_model` supports ``model`` at ``k``."""
    try:
        split_model(model, k)
        return True
    except NotImplementedError:
        return False


def split_model(model: Any, k: Any) -> Tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)``: the first ``k`` blocks, and the rest of the network with its head.

    ``k`` is a number of blocks or a block name, as for ``freeze_first``; ``1 <= k <= len(blocks)``.
    """
    k = model.block_index(k, argument="k")
    if k == 0:
        raise ValueError("k must be >= 1: a split after 0 blocks has an empty prefix")
    net = model.net
    if model.spec.startswith("torchvision:") and all(b.name.startswith("features.")
                                                      for b in model.blocks[:k]) \
            and hasattr(net, "features") and isinstance(net.features, nn.Sequential) \
            and not model.spec.startswith("torchvision:vgg"):
        feats = list(net.features.children())
        n_feat_blocks = sum(1 for b in model.blocks if b.name.startswith("features."))
        if n_feat_blocks == len(feats) and k <= len(feats):
            return nn.Sequential(*feats[:k]), _RestAfterFeatures(net, k)
    stages, tail = _stages(model)
    if len(stages) != len(model.blocks):  # pragma: no cover - adapter bug
        raise RuntimeError(f"{model.spec}: {len(stages)} stages for {len(model.blocks)} blocks")
    return nn.Sequential(*stages[:k]), nn.Sequential(*stages[k:], tail)
