"""Extraction: run the frozen part of a model over a dataset once, into a feature-cache entry.

:func:`extract_features` checks its arguments, resolves the cut, builds the entry's key (frozen
weights, cut, preprocessing, numerics options, data fingerprint, augmentation) and hands a
batch-wise forward pass to :meth:`pyft.cache.FeatureCache.get_or_compute`, which stores,
checksums and resumes. Under torch.distributed the ranks (:class:`pyft.distributed.Ranks`) split
the chunks of one entry.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from pyft._checks import check_number
from pyft.cache import CacheEntry, FeatureCache, data_fingerprint

__all__ = ["extract_features"]


def _frozen_part_hash(model: Any, cut: Optional[int]) -> str:
    """SHA-256 of the weights the activations at ``cut`` depend on (``None``: the whole body)."""
    return model.adapter.frozen_hash(model, cut)


@dataclass(frozen=True)
class _Cut:
    """Where the cached activations are taken."""

    k: Optional[int]  # blocks run; None: the whole body, pooled (the head's input)
    probe_blocks: Optional[List[int]]  # several depths, pooled, side by side in one row
    name: str  # the key's "cut"


def _resolve_cut(model: Any, cut: Any) -> _Cut:
    if isinstance(cut, (list, tuple)):
        if not cut:
            raise ValueError("cut must name at least one block")
        probe_blocks = sorted({model.block_index(c, argument="cut") for c in cut})
        if probe_blocks[0] == 0:
            raise ValueError("cut=0 names no block; blocks count from 1")
        names = ",".join(model.blocks[i - 1].name for i in probe_blocks)
        return _Cut(probe_blocks[-1], probe_blocks, "pooled:" + names)
    if cut == "head":
        return _Cut(None, None, "head")
    k = model.block_index(cut, argument="cut")
    if k == 0:
        raise ValueError("cut=0 leaves nothing frozen to cache; use cut >= 1 or 'head'")
    return _Cut(k, None, model.blocks[k - 1].name)


def _check_inputs(model: Any, data: Any, labels: Any, batch_size: Any, transform: Any,
                  augment_views: Any) -> Tuple[int, Optional[np.ndarray], int]:
    """(samples, labels as an array, augmented views per sample), or an error naming the
    argument."""
    from pyft.models import FineTunableModel

    if not isinstance(model, FineTunableModel):
        raise TypeError("model must be a FineTunableModel (pyft.load_model); got "
                        f"{type(model).__name__}")
    check_number("batch_size", batch_size, low=1, integer=True)
    n = len(data) if not hasattr(data, "shape") else int(data.shape[0])
    if n == 0:
        raise ValueError("data must not be empty")
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or len(lab) != n:
            raise ValueError(f"labels must have shape ({n},) to match data; got {lab.shape}")
    views = 1
    if augment_views is not None:
        check_number("augment_views", augment_views, low=1, integer=True)
        if transform is None:
            raise ValueError("augment_views needs a transform: the random augmentation to cache")
        views = int(augment_views)
    elif transform is not None:
        import warnings

        warnings.warn(
            "a random transform with the feature cache: each sample is augmented once and the same "
            "augmented features are reused every epoch, so the augmentation is lost. Pass "
            "augment_views=K to cache K views per sample, or train end to end without the cache",
            UserWarning, stacklevel=3)  # the caller of extract_features
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable; got {type(transform).__name__}")
    if transform is not None and model.kind != "image":
        raise ValueError(f"transform applies to image models; {model.spec} is a {model.kind} model")
    return n, lab, views


def _key_parts(model: Any, data: Any, cut: _Cut, *, channels_last: bool, autocast_bf16: bool,
               transform: Any, views: int, seed: int) -> Dict[str, Any]:
    """What the activations depend on (FeatureCache adds the storage dtype and the row count)."""
    parts = {
        "spec": model.spec,
        "weights": _frozen_part_hash(model, cut.k),
        "cut": cut.name,
        "preprocessing": model.preprocessing.key(),
        "channels_last": bool(channels_last),
        "autocast_bf16": bool(autocast_bf16),
        "data": data_fingerprint(data),
    }
    if transform is not None:
        parts["augment"] = {"transform": repr(transform), "views": views, "seed": int(seed)}
    return parts


def _pads_texts(model: Any, cut: _Cut, cut_arg: Any) -> bool:
    """Whether rows are text hidden states between encoder layers: then every row is padded to
    the longest text of the data (one activation shape per entry), and the suffix needs each
    row's attention mask."""
    if not (model.kind == "text" and cut.k is not None and cut.probe_blocks is None):
        return False
    if not hasattr(model.preprocessing, "lengths"):
        raise ValueError(f"cut={cut_arg!r} on a text model needs a TextPreprocessing (it pads "
                         "every text to the longest one); this model's preprocessing is a "
                         f"{type(model.preprocessing).__name__}")
    return True


class _Forward:
    """``compute(start, stop)`` for :meth:`FeatureCache.get_or_compute`: the float32 activations
    of rows ``start:stop``, where row ``v * n + i`` is view ``v`` of sample ``i``."""

    def __init__(self, model: Any, data: Any, n: int, cut: _Cut, *, text_rows: bool,
                 transform: Any, seed: int, channels_last: bool, autocast_bf16: bool) -> None:
        self.model, self.data, self.n, self.cut = model, data, n, cut
        self.text_rows, self.transform, self.seed = text_rows, transform, seed
        self.channels_last, self.autocast_bf16 = channels_last, autocast_bf16
        self.meta: Dict[str, Any] = {}  # stored in the manifest: probing's column blocks
        self._pad_len: Optional[int] = None

    def __call__(self, start: int, stop: int) -> np.ndarray:
        # Rows of view v are v * n .. v * n + n - 1; a batch may straddle two views.
        n = self.n
        outs = []
        row = start
        while row < stop:
            v, i = divmod(row, n)
            j = min(stop - v * n, n)
            outs.append(self._batch(i, j, view=v if self.transform is not None else None))
            row = v * n + j
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def masks(self) -> Dict[str, np.ndarray]:
        """The attention mask of every (padded) text row, stored beside the hidden states."""
        out = [np.asarray(self._padded(i, min(i + 1024, self.n))["attention_mask"], np.uint8)
               for i in range(0, self.n, 1024)]
        return {"attention_mask": np.concatenate(out)}

    def _take(self, start: int, stop: int) -> Any:
        if isinstance(self.data, (list, tuple)):
            return list(self.data[start:stop])
        return self.data[start:stop]

    def _padded(self, start: int, stop: int) -> Any:
        if self._pad_len is None:  # computed when the backbone runs, not when an entry is reused
            self._pad_len = max(self.model.preprocessing.lengths(list(self.data)))
        return self.model.preprocessing(self._take(start, stop), pad_to=self._pad_len)

    def _batch(self, start: int, stop: int, view: Optional[int] = None) -> np.ndarray:
        import torch

        if self.text_rows:
            x = self._padded(start, stop)
        else:
            x = self.model.preprocess(self._take(start, stop))
        if view is not None:
            # Seeded by (seed, view, first sample): a resumed run draws the same augmentation.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{int(self.seed)}/{view}/{start}".encode()))
                x = torch.stack([self.transform(xi) for xi in x])
        if self.channels_last:
            from pyft.models.model import to_channels_last

            x = to_channels_last(x)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=self.autocast_bf16):
            out = self._activations(x)
        return out.float().contiguous().numpy()

    def _activations(self, x: Any) -> Any:
        import torch

        model, probe_blocks, k = self.model, self.cut.probe_blocks, self.cut.k
        if probe_blocks is not None:
            outs = model.block_outputs(x, [i - 1 for i in probe_blocks], pool=True)
            if "columns" not in self.meta:
                cols, col = {}, 0
                for i in probe_blocks:
                    w = int(outs[i - 1].shape[1])
                    cols[model.blocks[i - 1].name] = [col, col + w]
                    col += w
                self.meta["columns"] = cols
            return torch.cat([outs[i - 1].float() for i in probe_blocks], dim=1)
        if k is None:
            return model.features(x)
        return model.block_outputs(x, [k - 1], pool=False)[k - 1]


def extract_features(model: Any, data: Any, labels: Any = None, *, cut: Union[str, int] = "head",
                     cache_dir: Optional[Union[str, os.PathLike]] = None, dtype: str = "float16",
                     batch_size: int = 64, channels_last: bool = False, autocast_bf16: bool = False,
                     progress: bool = True, rebuild: bool = False,
                     transform: Any = None, augment_views: Optional[int] = None, seed: int = 0,
                     distributed: Any = None,
                     cache: Optional[FeatureCache] = None) -> CacheEntry:
    """Run the frozen part of ``model`` over ``data`` once and cache the activations.

    Parameters
    ----------
    model : FineTunableModel
    data : array, tensor or list
        What ``model.preprocess`` accepts, indexable by sample (images or texts).
    labels : array of shape (n,), optional
        Stored beside the features.
    cut : "head", int, str or list
        ``"head"``: the head's input (the pooled body output; for ``head_only``). An int ``k`` or a
        block name: the output of the first ``k`` blocks (for ``freeze_first(k)``), unpooled. A
        list of them: the pooled outputs of those depths, side by side in one row, from one pass
        (for probing; ``entry.columns`` says which columns hold which block).
    dtype : {"float16", "bfloat16", "float32"}
        Storage type.
    channels_last, autocast_bf16 : bool
        Numerics options of the forward pass (part of the key).
    rebuild : bool
        Recompute even when a complete entry exists (e.g. after a damaged-entry error).
    transform : callable, optional
        A random augmentation applied to each preprocessed image tensor (C, H, W), e.g. a
        torchvision ``transforms.v2`` pipeline. Caching computes an augmented image once and
        reuses it every epoch, which defeats random augmentation: pass ``augment_views=K`` to
        cache K augmented views per sample (training then draws one view per sample and epoch),
        or train end to end. A transform without ``augment_views`` warns.
    augment_views : int, optional
        Number of augmented views per sample; rows ``v * n + i`` hold view ``v`` of sample ``i``.
    seed : int
        Seeds the augmentation (each batch of each view gets its own seed, so an interrupted
        extraction resumes bit-identically).
    distributed : bool or ProcessGroup, optional
        Split the extraction over the ranks of the initialised ``torch.distributed`` process group,
        or of the ``ProcessGroup`` given (default: when one is initialised, or initialise it from
        ``torchrun``'s environment; see :func:`pyft.distributed.process_group`). Every rank
        passes the same data and cache folder (a shared file system); each computes a disjoint,
        deterministic set of chunks, rank 0 writes the manifest after a barrier, and the entry is
        byte for byte the single-process one. A rerun after a rank died reuses the finished
        chunks.

    Returns
    -------
    CacheEntry
        ``entry.features`` is a read-only memmap; ``entry.reused`` tells whether the backbone ran.
    """
    from pyft.distributed import check_same_on_all_ranks, process_group

    n, lab, views = _check_inputs(model, data, labels, batch_size, transform, augment_views)
    where = _resolve_cut(model, cut)
    parts = _key_parts(model, data, where, channels_last=channels_last,
                       autocast_bf16=autocast_bf16, transform=transform, views=views, seed=seed)
    text_rows = _pads_texts(model, where, cut)
    if text_rows:
        parts["rows"] = "padded to the longest text, attention_mask stored"
    forward = _Forward(model, data, n, where, text_rows=text_rows, transform=transform, seed=seed,
                       channels_last=channels_last, autocast_bf16=autocast_bf16)
    ranks = process_group(distributed)
    if ranks.world > 1:
        # One entry for all ranks: the key parts (weights, data, cut, options) must agree.
        check_same_on_all_ranks(parts, "the cache entry", ranks)
    was_training = model.training
    model.eval()
    try:
        store = cache or FeatureCache(cache_dir)
        if views > 1 and lab is not None:
            lab = np.tile(lab, views)
        return store.get_or_compute(parts, n * views, forward, labels=lab, dtype=dtype,
                                    batch_size=batch_size, rebuild=rebuild, progress=progress,
                                    desc=f"{model.spec} -> {where.name}", meta=forward.meta,
                                    ranks=ranks, extras=forward.masks if text_rows else None)
    finally:
        model.train(was_training)
