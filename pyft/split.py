"""Split a fine-tunable model after its first k blocks: ``suffix(prefix(x)) == model(x)``.

The feature cache stores block ``k``'s output (its tap) once; ``freeze_first(k)`` then trains
``suffix`` on the cached activations. :func:`split_model` finds the suffix in one of three ways:

- a hand-written adapter for the networks whose forward pyft knows: EfficientNet-Lite0,
  torchvision ResNets (and ResNeXt / Wide ResNet), VGG, the torchvision networks built as
  ``features`` + ``avgpool`` + ``classifier`` when the cut lies inside ``features``, and
  ``nn.Sequential`` networks;
- Hugging Face text encoders (``minilm-l6``, ``hf:<dir>``): the suffix runs the encoder's own
  forward from layer ``k`` on with the embeddings bypassed, so the model's own attention-mask
  code runs; it takes ``(features, attention_mask)``: the cache stores each row's mask beside its
  hidden states;
- any other network whose forward ``torch.fx`` can trace with the blocks as leaf modules (timm,
  torchvision, most user modules): the traced graph is cut at the block's output. When another
  value also crosses the cut (a skip connection around the cut, a shape read from the input)
  the cut is rejected, since the cache holds one activation per sample.

When a model cannot be split, :func:`split_model` raises :class:`SplitError` saying why, and
:func:`split_support` returns ``(False, why)``; :class:`pyft.FineTuner` then trains
``freeze_first`` end to end and says so (``cache_used_``, ``split_reason_``). Nothing falls back
silently.

The modules returned share their parameters with the model (nothing is copied).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["split_model", "split_support", "check_split", "SplitError"]


class SplitError(NotImplementedError):
    """The model cannot be split after this block; the message says why."""


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


def _stages(model: Any) -> Optional[Tuple[List[nn.Module], nn.Module]]:
    """One module per block and the tail (pooling + head) for the architectures with a
    hand-written adapter; ``None`` for the others."""
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
    return None


def _hand_split(model: Any, k: int) -> Optional[Tuple[nn.Module, nn.Module]]:
    net = model.net
    if model.spec.startswith("torchvision:") and all(b.name.startswith("features.")
                                                      for b in model.blocks[:k]) \
            and hasattr(net, "features") and isinstance(net.features, nn.Sequential) \
            and not model.spec.startswith("torchvision:vgg"):
        feats = list(net.features.children())
        n_feat_blocks = sum(1 for b in model.blocks if b.name.startswith("features."))
        if n_feat_blocks == len(feats) and k <= len(feats):
            return nn.Sequential(*feats[:k]), _RestAfterFeatures(net, k)
    found = _stages(model)
    if found is None:
        return None
    stages, tail = found
    if len(stages) != len(model.blocks):  # pragma: no cover - adapter bug
        raise RuntimeError(f"{model.spec}: {len(stages)} stages for {len(model.blocks)} blocks")
    return nn.Sequential(*stages[:k]), nn.Sequential(*stages[k:], tail)


# ---------------------------------------------------------------------------- text encoders
@contextlib.contextmanager
def _swapped(root: nn.Module, path: str, new: nn.Module) -> Iterator[None]:
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent._modules[attr]
    parent._modules[attr] = new
    try:
        yield
    finally:
        parent._modules[attr] = old


class _Given(nn.Module):
    """Stands in for the embeddings: returns the activations handed to the suffix."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


class _TapPrefix(nn.Module):
    """The model run up to block ``k``'s tap: exactly what the cache stores."""

    def __init__(self, model: Any, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        prepared = dict(kwargs, input_ids=input_ids)
        if attention_mask is not None:
            prepared["attention_mask"] = attention_mask
        return self.model.block_outputs(prepared, [self.k - 1], pool=False)[self.k - 1]


class _TextSuffix(nn.Module):
    """Layers ``start:`` of a Hugging Face encoder, mean pooling over the mask, and the head.

    The encoder's own forward runs with the embeddings replaced by the given hidden states and
    the layer list cut, so its attention-mask code (eager, SDPA, ...) is the model's.
    """

    def __init__(self, net: nn.Module, layers_path: str, start: int) -> None:
        super().__init__()
        self.net, self.layers_path, self.start = net, layers_path, start

    def forward(self, features: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        enc = self.net.encoder
        if attention_mask is None:
            attention_mask = torch.ones(features.shape[:2], dtype=torch.long,
                                        device=features.device)
        rest = nn.ModuleList(list(enc.get_submodule(self.layers_path))[self.start:])
        with _swapped(enc, "embeddings", _Given(features)), \
                _swapped(enc, self.layers_path, rest):
            out = enc(inputs_embeds=features, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return self.net.classify(hidden, attention_mask)


def _text_split(model: Any, k: int) -> Tuple[nn.Module, nn.Module]:
    net = model.net
    where = f"{model.spec} after block {model.blocks[k - 1].name!r}"
    if not (hasattr(net, "encoder") and hasattr(net, "classify")):
        raise SplitError(f"cannot split {where}: it is not an encoder loaded by pyft "
                         "(minilm-l6 or hf:<dir>), so pyft does not know how its forward pools")
    enc = net.encoder
    if model.blocks[0].name != "embeddings" or not hasattr(enc, "embeddings"):
        raise SplitError(f"cannot split {where}: the encoder has no 'embeddings' module to "
                         "bypass, so its layers cannot be entered with cached hidden states")
    layer_mods = [b.modules[0] for b in model.blocks[1:]]
    layers_path = layer_mods[0].rpartition(".")[0] if layer_mods else ""
    if not layers_path.startswith("encoder.") or \
            layer_mods != [f"{layers_path}.{i}" for i in range(len(layer_mods))]:
        raise SplitError(f"cannot split {where}: its blocks are not the embeddings followed by "
                         "one list of layers")
    layers_path = layers_path[len("encoder."):]
    if len(enc.get_submodule(layers_path)) != len(layer_mods):
        raise SplitError(f"cannot split {where}: its layer list has other members than its blocks")
    suffix = _TextSuffix(net, layers_path, k - 1)
    return _TapPrefix(model, k), suffix


# ---------------------------------------------------------------------------- torch.fx
class _ByMode(nn.Module):
    """Two traces of one graph piece, for training and inference: a forward's Python control
    flow on ``self.training`` (functional dropout in a head) is fixed when it is traced."""

    def __init__(self, net: nn.Module, eval_graph: nn.Module, train_graph: nn.Module) -> None:
        super().__init__()
        self.eval_graph, self.train_graph = eval_graph, train_graph
        self._root = [net]  # not a submodule: only its mode is read

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        graph = self.train_graph if self._root[0].training else self.eval_graph
        return graph(*args, **kwargs)


def _tracer(leaves: set) -> Any:
    import math

    import torch.fx as fx

    leaf_types: Tuple[type, ...] = ()
    functions: Tuple[Any, ...] = ()
    try:  # timm registers the modules and functions that torch.fx must not trace into
        from timm.layers import _fx as timm_fx

        leaf_types = tuple(timm_fx.get_notrace_modules())
        functions = tuple(timm_fx.get_notrace_functions())
    except ImportError:
        pass

    class BlockTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if qualname in leaves or (leaf_types and isinstance(m, leaf_types)):
                return True
            return super().is_leaf_module(m, qualname)

    return BlockTracer(autowrap_modules=(math,), autowrap_functions=functions)


def _inside(name: str, modules: Any) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _ancestors(start: List[Any]) -> set:
    seen, stack = set(), list(start)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _cut_graph(graph: Any, model: Any, k: int) -> Tuple[Any, Any]:
    """The traced forward cut at block ``k``'s tap: (prefix graph, suffix graph)."""
    import torch.fx as fx

    block = model.blocks[k - 1]
    where = f"{model.spec} after block {block.name!r}"
    tap_name, side = block.tap
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == tap_name]
    if len(calls) != 1:
        why = (f"{tap_name!r} runs {len(calls)} times in the forward" if calls else
               f"the block's output ({tap_name!r}) is computed inside a module the trace does "
               "not enter")
        raise SplitError(f"cannot split {where}: {why}")
    tap = calls[0] if side == "output" else calls[0].args[0]
    if not isinstance(tap, fx.Node):
        raise SplitError(f"cannot split {where}: the input of {tap_name!r} is not a traced value")
    ancestors = _ancestors([tap])
    placeholders = [n for n in nodes if n.op == "placeholder"]
    # Later arguments with defaults (timm's attn_mask=None) are arguments of both pieces; the
    # first one is the data.
    free = {n for n in placeholders[1:] if n.args}
    on_data = set()  # nodes whose value depends on the input
    for n in nodes:
        if (n.op == "placeholder" and n not in free) or any(i in on_data for i in n.all_input_nodes):
            on_data.add(n)
    later = [m for b in model.blocks[k:] for m in b.modules]
    for n in ancestors:
        if n.op in ("call_module", "get_attr") and _inside(n.target, later):
            raise SplitError(f"cannot split {where}: {n.target!r}, part of a later block, runs "
                             "before the block's output")
    before = (ancestors & on_data) | (set(placeholders) - free)
    # Nodes nothing uses (torch._assert on the input's size) run in the prefix when they can.
    used = _ancestors([n for n in nodes if n.op == "output"])
    in_prefix = set(ancestors)
    for n in nodes:
        if n not in used and n not in in_prefix and n.op != "placeholder" and \
                all(i in in_prefix or i not in on_data for i in n.all_input_nodes):
            in_prefix.add(n)
            if n in on_data:
                before.add(n)
    crossing: List[Any] = []
    for n in nodes:
        if n in before:
            continue
        for i in n.all_input_nodes:
            if i in before and i is not tap and i not in crossing:
                crossing.append(i)
    if crossing:
        names = ", ".join(("the input " if c.op == "placeholder" else "") + repr(c.name)
                          for c in crossing[:4])
        raise SplitError(
            f"cannot split {where}: besides the block's output, {names} computed before the cut "
            "is used after it (a skip connection around the cut, or a size read from the input); "
            "the cache holds one activation per sample")

    prefix = fx.Graph()
    env: Dict[Any, Any] = {}
    for n in nodes:
        if n.op == "placeholder" or n in in_prefix:
            env[n] = prefix.node_copy(n, lambda a: env[a])
    prefix.output(env[tap])
    suffix = fx.Graph()
    env = {tap: suffix.placeholder("features")}
    for n in nodes:
        if n in before or (n in in_prefix and n not in used):
            continue
        if n.op == "output":
            suffix.output(fx.map_arg(n.args[0], lambda a: env[a]))
        else:
            env[n] = suffix.node_copy(n, lambda a: env[a])
    return prefix, suffix


def _fx_split(model: Any, k: int) -> Tuple[nn.Module, nn.Module]:
    import torch.fx as fx

    net = model.net
    names = dict(net.named_modules())
    leaves = {m for b in model.blocks for m in b.modules if m in names} | {model.head_name}
    modes = {n: m.training for n, m in net.named_modules()}
    graphs = {}
    try:
        for training in (False, True):
            net.train(training)
            try:
                graphs[training] = _tracer(leaves).trace(net)
            except Exception as e:  # torch.fx raises many types for untraceable Python
                raise SplitError(
                    f"cannot split {model.spec}: torch.fx cannot trace its forward between the "
                    f"blocks ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    finally:
        for n, m in net.named_modules():
            m.training = modes[n]
    pieces = {t: _cut_graph(g, model, k) for t, g in graphs.items()}
    out = []
    for i, cls in enumerate(("Prefix", "Suffix")):
        gms = {}
        for t in (False, True):
            gm = fx.GraphModule(net, pieces[t][i], class_name=cls)
            gm.graph.eliminate_dead_code()  # e.g. parameters the other side uses
            gm.graph.lint()
            gm.recompile()
            gms[t] = gm
        if gms[False].code == gms[True].code:
            out.append(gms[False])
        else:
            out.append(_ByMode(net, gms[False], gms[True]))
    return out[0], out[1]


# ---------------------------------------------------------------------------- public API
def split_model(model: Any, k: Any) -> Tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)``: the first ``k`` blocks, and the rest of the network with its head.

    Parameters
    ----------
    model : FineTunableModel
    k : int or str
        A number of blocks or a block name, as for ``freeze_first``; ``1 <= k <= len(blocks)``.

    Returns
    -------
    prefix, suffix : nn.Module
        ``prefix(x)`` is block ``k``'s output (what ``extract_features(model, ..., cut=k)``
        stores). For image models ``suffix(features)`` gives the logits; for text encoders
        ``suffix(features, attention_mask)`` does (``features`` of shape (n, tokens, width)).
        ``suffix.split_method`` says how the split was found: ``"adapter"``, ``"text layers"``
        or ``"torch.fx"``.

    Raises
    ------
    SplitError
        (a ``NotImplementedError``) when the model cannot be split there; the message says why.
    """
    k = model.block_index(k, argument="k")
    if k == 0:
        raise ValueError("k must be >= 1: a split after 0 blocks has an empty prefix")
    if model.kind == "text":
        prefix, suffix = _text_split(model, k)
        method = "text layers"
    else:
        found = _hand_split(model, k)
        if found is not None:
            (prefix, suffix), method = found, "adapter"
        else:
            prefix, suffix = _fx_split(model, k)
            method = "torch.fx"
    suffix.split_method = method
    return prefix, suffix


def _example(model: Any) -> Any:
    if model.kind == "text":
        return model.preprocess(["pyft checks a split of the encoder on this sentence.",
                                 "And on a second one, a few words longer than the first one."])
    size = getattr(model.preprocessing, "input_size", None)
    if size is None:
        return None
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, 3) + tuple(size), generator=gen)


def check_split(model: Any, k: Any, suffix: nn.Module, example: Any = None, *,
                rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """Check that ``suffix`` on block ``k``'s cached output gives the model's logits.

    Runs in inference mode on ``example`` (prepared inputs, as ``model.preprocess`` returns;
    default: two random images at the model's input size, or two sentences). Raises
    :class:`SplitError` when the logits differ by more than ``atol * max|logits| + rtol * |logit|``
    or the suffix fails.
    """
    k = model.block_index(k, argument="k")
    if example is None:
        example = _example(model)
        if example is None:
            return
    device = next(iter(model.parameters())).device
    if isinstance(example, dict):
        example = {key: v.to(device) for key, v in example.items()}
    else:
        example = example.to(device)
    where = f"{model.spec} after block {model.blocks[k - 1].name!r}"
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ref = model.run(example).float()
            tap = model.block_outputs(example, [k - 1], pool=False)[k - 1]
            mask = example.get("attention_mask") if isinstance(example, dict) else None
            out = suffix(tap) if mask is None else suffix(tap, mask)
            out = out.float()
    except SplitError:
        raise
    except Exception as e:  # any failure of the suffix means there is no usable split
        raise SplitError(f"cannot split {where}: the suffix fails on the block's output "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    finally:
        model.train(was_training)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=rtol, atol=atol * max(scale, 1.0)):
        diff = float((out - ref).abs().max()) if out.shape == ref.shape else float("nan")
        raise SplitError(f"cannot split {where}: the suffix on the block's output gives logits "
                         f"of shape {tuple(out.shape)} differing from the model's "
                         f"{tuple(ref.shape)} by up to {diff:.3g}")


def split_support(model: Any, k: Any, example: Any = None) -> Tuple[bool, str]:
    """Whether ``freeze_first(k)`` can train on a cached prefix of ``model``, and why (not).

    Builds the split (:func:`split_model`) and checks it numerically (:func:`check_split`, on
    ``example`` or two synthetic inputs: one forward pass of two samples). For the strategy
    advice's cost estimate: when ``ok`` is False, ``freeze_first`` recomputes the prefix every
    epoch (end-to-end training with the prefix frozen).

    Returns
    -------
    ok : bool
    reason : str
        How the split is done (``"torch.fx"``, ...) when ``ok``, else why there is none.
    """
    k = model.block_index(k, argument="k")
    if k == 0:
        return False, "k=0 freezes no block: there is no prefix to cache"
    try:
        _, suffix = split_model(model, k)
        check_split(model, k, suffix, example)
    except SplitError as e:
        return False, str(e)
    return True, (f"split after block {model.blocks[k - 1].name!r} by {suffix.split_method}; "
                  "the suffix on the cached output matches the model")
