"""Split a fine-tunable model after its first k blocks: ``suffix(prefix(x)) == model(x)``.

The feature cache stores block ``k``'s output (its tap) once; ``freeze_first(k)`` then trains
``suffix`` on the cached activations. :func:`split_model` asks the adapter of the model's
architecture family (:mod:`pyft.models.adapters`), which finds the suffix in one of three ways:

- a hand-written split for the networks whose forward pyft knows: EfficientNet-Lite0,
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

from typing import Any, Tuple

import torch
from torch import nn

from pyft.models.splitting import SplitError

__all__ = ["split_model", "split_support", "check_split", "SplitError"]

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
    prefix, suffix, method = model.adapter.split(model, k)
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
    if out.shape != ref.shape or \
            not torch.allclose(out, ref, rtol=rtol, atol=atol * max(scale, 1.0)):
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
