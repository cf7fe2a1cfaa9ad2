"""Blocks: a network's body cut into named pieces in forward order, so "the first k blocks" means
something. One function per architecture family says where its blocks are; the family adapters
(:mod:`pyft.models.adapters`) pick the function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import nn


@dataclass(frozen=True)
class Block:
    """One block of a network's body, in forward order.

    Attributes
    ----------
    name : str
        The name used by freezing policies (``freeze_first("layer2")``).
    modules : tuple of str
        Qualified names (as in ``net.named_modules()``) of the modules that make up the block.
    tap : (str, str)
        Where the block's output can be observed: ``(module name, "output")`` or the ``"input"``
        of the module that follows it.
    """

    name: str
    modules: Tuple[str, ...]
    tap: Tuple[str, str]


def _param_modules(net: nn.Module) -> List[str]:
    return [n for n, m in net.named_modules()
            if n and any(True for _ in m.parameters(recurse=False))]


def _collapse(net: nn.Module, leaf_names: Sequence[str], exclude: Sequence[str]) -> Tuple[str, ...]:
    """The largest modules whose parameter-holding descendants all belong to ``leaf_names``."""
    group = set(leaf_names)
    owners = _param_modules(net)
    excluded = tuple(exclude)

    def inside(n: str, anc: str) -> bool:
        return n == anc or n.startswith(anc + ".")

    result: List[str] = []
    for leaf in leaf_names:
        if any(inside(leaf, r) for r in result):
            continue
        best = leaf
        parts = leaf.split(".")
        for j in range(len(parts) - 1, 0, -1):
            anc = ".".join(parts[:j])
            desc = [o for o in owners if inside(o, anc)]
            if any(inside(e, anc) or inside(anc, e) for e in excluded):
                break
            if desc and all(o in group for o in desc):
                best = anc
            else:
                break
        result.append(best)
    return tuple(result)


def generic_blocks(net: nn.Module, head_name: str) -> List[Block]:
    """Top-level children in order, with Sequential/ModuleList containers opened one level."""
    blocks: List[Block] = []

    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def visit(prefix: str, module: nn.Module, depth: int) -> bool:
        for name, child in module.named_children():
            q = f"{prefix}{name}"
            if q == head_name:
                return True
            if head_name.startswith(q + "."):
                if visit(q + ".", child, depth + 1):
                    return True
                continue
            if not has_params(child):
                continue
            opened = isinstance(child, (nn.Sequential, nn.ModuleList)) and depth == 0 and \
                sum(1 for c in child.children() if has_params(c)) >= 2
            if opened:
                for n2, c2 in child.named_children():
                    if has_params(c2):
                        blocks.append(Block(f"{q}.{n2}", (f"{q}.{n2}",), (f"{q}.{n2}", "output")))
            else:
                blocks.append(Block(q, (q,), (q, "output")))
        return False

    visit("", net, 0)
    return blocks


def timm_blocks(net: nn.Module, head_name: str) -> List[Block]:
    from timm.models import group_modules

    groups = group_modules(net, net.group_matcher(coarse=True))
    blocks: List[Block] = []
    order = {n: i for i, n in enumerate(dict(net.named_modules()))}
    for gid in sorted(groups):
        leaves = [n for n in groups[gid] if not (n == head_name or n.startswith(head_name + "."))]
        if not leaves:
            continue
        mods = _collapse(net, leaves, exclude=[head_name])
        last = max(mods, key=lambda n: order.get(n, -1))
        name = "+".join(mods) if len(mods) <= 3 else f"{mods[0]}+...+{mods[-1]}"
        if len(blocks) == 0 and len(mods) > 1:
            name = "stem"
        blocks.append(Block(name, mods, (last, "output")))
    return blocks


def resnet_blocks(net: nn.Module) -> List[Block]:
    blocks = [Block("stem", ("conv1", "bn1", "relu", "maxpool"), ("maxpool", "output"))]
    for i in range(1, 5):
        blocks.append(Block(f"layer{i}", (f"layer{i}",), (f"layer{i}", "output")))
    return blocks


def vgg_blocks(net: nn.Module, head_name: str) -> List[Block]:
    blocks: List[Block] = []
    current: List[str] = []
    for name, m in net.features.named_children():
        current.append(f"features.{name}")
        if isinstance(m, nn.MaxPool2d):
            blocks.append(Block(f"conv{len(blocks) + 1}", tuple(current), (current[-1], "output")))
            current = []
    if current:
        blocks.append(Block(f"conv{len(blocks) + 1}", tuple(current), (current[-1], "output")))
    fc: List[str] = []
    k = 6
    for name, m in net.classifier.named_children():
        q = f"classifier.{name}"
        if q == head_name:
            break
        if isinstance(m, nn.Linear) and fc:
            blocks.append(Block(f"fc{k}", tuple(fc), (fc[-1], "output")))
            k += 1
            fc = []
        fc.append(q)
    if fc:
        blocks.append(Block(f"fc{k}", tuple(fc), (fc[-1], "output")))
    return blocks


def efficientnet_lite0_blocks(net: nn.Module) -> List[Block]:
    blocks = [Block("stem", ("_conv_stem", "_bn0"), ("_blocks.0", "input"))]
    for i in range(len(net._blocks)):
        blocks.append(Block(f"blocks.{i}", (f"_blocks.{i}",), (f"_blocks.{i}", "output")))
    blocks.append(Block("head_conv", ("_conv_head", "_bn1"), ("_avg_pooling", "input")))
    return blocks


def text_blocks(net: nn.Module, spec: str) -> List[Block]:
    """The embeddings, then each layer of the encoder's (largest) layer list."""
    encoder = net.encoder
    blocks: List[Block] = []
    if hasattr(encoder, "embeddings"):
        blocks.append(Block("embeddings", ("encoder.embeddings",),
                            ("encoder.embeddings", "output")))
    layers = _largest_modulelist(encoder)
    if layers is None:
        raise ValueError(f"{spec!r}: could not find the encoder's layer list")
    for i in range(len(encoder.get_submodule(layers))):
        q = f"encoder.{layers}.{i}"
        blocks.append(Block(f"layer{i}", (q,), (q, "output")))
    return blocks


def _largest_modulelist(m: nn.Module) -> Optional[str]:
    best, size = None, -1
    for n, c in m.named_modules():
        if isinstance(c, nn.ModuleList):
            s = sum(p.numel() for p in c.parameters())
            if s > size:
                best, size = n, s
    return best

