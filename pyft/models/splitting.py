"""The two generic ways to split a model after block k: a Hugging Face encoder entered at layer k
with its embeddings bypassed (:func:`text_split`), and a ``torch.fx`` trace cut at the block's
output (:func:`fx_split`). Family adapters (:mod:`pyft.models.adapters`) fall back on them when
they know no hand-written split; :func:`pyft.split.split_model` is the public entry.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["SplitError", "text_split", "fx_split"]


class SplitError(NotImplementedError):
    """The model cannot be split after this block; the message says why."""



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


def text_split(model: Any, k: int) -> Tuple[nn.Module, nn.Module]:
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
        if (n.op == "placeholder" and n not in free) or \
                any(i in on_data for i in n.all_input_nodes):
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


def fx_split(model: Any, k: int) -> Tuple[nn.Module, nn.Module]:
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

