"""The input transform a network's pretrained weights expect: image size and normalisation, or a
tokenizer.

A preprocessing object is part of a fine-tunable model: features computed with one preprocessing are
never mixed with another (its :meth:`key` goes into the feature-cache key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pyft._checks import check_number

__all__ = ["ImagePreprocessing", "TextPreprocessing", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is not None:
        return f"{type(x).__name__} of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(x, (list, tuple)):
        inner = type(x[0]).__name__ if len(x) else "nothing"
        return f"{type(x).__name__} of {len(x)} {inner}"
    return type(x).__name__


@dataclass(frozen=True)
class ImagePreprocessing:
    """Turn images into the normalised float32 NCHW batch a vision network expects.

    Parameters
    ----------
    input_size : (height, width)
        Size the network sees.
    mean, std : 3 floats
        Per-channel normalisation of pixel values scaled to [0, 1].
    resize : int or None
        ImageNet-style evaluation transform: scale the shorter side to ``resize`` pixels, then take
        the centre ``input_size`` crop. ``None`` resizes the whole image straight to ``input_size``
        (right for small, tightly framed images such as digits).
    """

    input_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: Optional[int] = None
    kind: str = field(default="image", init=False)

    def key(self) -> Dict[str, Any]:
        """Everything that changes the output, for cache keys and saved configs."""
        return {
            "kind": "image",
            "input_size": list(self.input_size),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "resize": self.resize,
            "interpolation": "bilinear-antialias",
        }

    def with_input_size(self, size: int | Tuple[int, int]) -> "ImagePreprocessing":
        """The same normalisation at another resolution (``resize`` scaled with it)."""
        hw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        if min(hw) < 8:
            raise ValueError(f"image_size must be at least 8 pixels; got {size}")
        resize = None
        if self.resize is not None:
            resize = int(round(self.resize * max(hw) / max(self.input_size)))
        return ImagePreprocessing(hw, self.mean, self.std, resize)

    def __call__(self, images: Any) -> "Any":
        """Return a float32 tensor of shape (n, 3, height, width).

        ``images`` is a batch: an array or tensor of shape (n, H, W) (grayscale), (n, H, W, C) or
        (n, C, H, W) with C in {1, 3, 4} (alpha is dropped, gray is repeated to RGB), uint8 in
        [0, 255] or float in [0, 1]; or a list of such single images / PIL images of any sizes.
        """
        import torch

        if isinstance(images, (str, os.PathLike)) or (
            isinstance(images, (list, tuple)) and images and isinstance(images[0], str)
        ):
            raise TypeError(
                "this is an image model: images must be an array, a tensor or a list of images; "
                f"got {_describe(images)} (a text model such as 'minilm-l6' takes strings)"
            )
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images must not be empty")
            return torch.cat([self(_single_as_batch(im)) for im in images])
        x = _as_nchw_float(images)
        return self._resize_normalise(x)

    def _resize_normalise(self, x: "Any") -> "Any":
        import torch
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        th, tw = self.input_size
        if self.resize is not None:
            scale = self.resize / min(h, w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=True)
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, :, top:top + th, left:left + tw]
        elif (h, w) != (th, tw):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


def _single_as_batch(im: Any) -> Any:
    if type(im).__module__.startswith("PIL"):
        im = np.asarray(im.convert("RGB"))
    shape = getattr(im, "shape", None)
    if shape is None:
        raise TypeError("each image must be an array, a tensor or a PIL image; "
                        f"got {_describe(im)}")
    return im[None]


def _as_nchw_float(images: Any) -> Any:
    """A batch of images as float32 NCHW in [0, 1] with 3 channels."""
    import torch

    if isinstance(images, torch.Tensor):
        x = images.detach()
    elif isinstance(images, np.ndarray):
        arr = np.ascontiguousarray(images)
        if not arr.flags.writeable:  # np.asarray(PIL image), read-only memory maps
            arr = arr.copy()  # torch warns about (and would share) read-only memory
        x = torch.from_numpy(arr)
    else:
        raise TypeError(
            "images must be a NumPy array, a torch tensor or a list of images; "
            f"got {_describe(images)}"
        )
    if x.dtype == torch.bool or x.is_complex() or \
            not (x.is_floating_point() or x.dtype == torch.uint8):
        if x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16) and x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"integer images must hold values in [0, 255]; got values in [{lo}, {hi}]"
                )
            x = x.to(torch.uint8)
        else:
            raise TypeError(f"images must be uint8 or floating point; got dtype {x.dtype}")
    if x.ndim == 3:  # (n, H, W) grayscale
        if x.shape[-1] in (3, 4) and min(x.shape[0], x.shape[1]) > 4:
            raise ValueError(
                f"images of shape {tuple(x.shape)} look like one (H, W, C) image, not a batch of "
                f"{x.shape[0]} grayscale images {x.shape[-1]} pixels wide; pass images[None]"
            )
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
            pass  # NCHW
        elif x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        else:
            raise ValueError(
                "images must have 1, 3 or 4 channels, first (n, C, H, W) or last (n, H, W, C); "
                f"got shape {tuple(x.shape)}"
            )
    else:
        raise ValueError(
            "images must be a batch of shape (n, H, W), (n, H, W, C) or (n, C, H, W); "
            f"got shape {tuple(x.shape)} (wrap a single image as images[None])"
        )
    if x.shape[0] == 0:
        raise ValueError("images must not be empty; got a batch of 0 images")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    else:
        x = x.to(torch.float32)
        if x.numel():
            if not bool(torch.isfinite(x).all()):
                raise ValueError("images contain NaN or infinity")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(
                    f"float images must be scaled to [0, 1]; got values in [{lo:g}, {hi:g}] "
                    "(pass uint8 pixels, or divide by 255)"
                )
    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c == 4:
        x = x[:, :3]
    return x


@dataclass(frozen=True)
class TextPreprocessing:
    """Tokenize texts for a Hugging Face encoder (loaded from a local directory, never downloaded).

    Parameters
    ----------
    tokenizer_path : str
        Directory holding the tokenizer files.
    max_length : int
        Longer texts are truncated to this many tokens.
    """

    tokenizer_path: str
    max_length: int = 256
    kind: str = field(default="text", init=False)

    def key(self) -> Dict[str, Any]:
        files = {}
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json"):
            p = os.path.join(self.tokenizer_path, name)
            if os.path.exists(p):
                files[name] = os.path.getsize(p)
        return {"kind": "text", "tokenizer_files": files, "max_length": self.max_length}

    @property
    def tokenizer(self) -> Any:
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
            object.__setattr__(self, "_tokenizer", tok)
        return tok

    def lengths(self, texts: Sequence[str]) -> List[int]:
        """Tokens per text after truncation (special tokens included)."""
        enc = self.tokenizer(list(texts), padding=False, truncation=True,
                             max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def __call__(self, texts: Sequence[str], pad_to: Optional[int] = None) -> Dict[str, Any]:
        """Return ``{"input_ids", "attention_mask"}`` int64 tensors of shape (n, length).

        ``length`` is the longest text's (after truncation to ``max_length``), or ``pad_to``
        when given (the feature cache pads a dataset's rows to one length).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                "this is a text model: texts must be a list of strings; "
                f"got {_describe(texts)} (image models such as 'efficientnet_lite0' take arrays)"
            )
        if not texts:
            raise ValueError("texts must not be empty")
        if pad_to is None:
            enc = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        else:
            check_number("pad_to", pad_to, low=1, high=self.max_length, integer=True)
            enc = self.tokenizer(list(texts), padding=False, truncation=True,
                                 max_length=self.max_length)
            longest = max(len(ids) for ids in enc["input_ids"])
            if longest > pad_to:
                raise ValueError(f"pad_to={pad_to} is shorter than a text of {longest} tokens")
            enc = self.tokenizer.pad(enc, padding="max_length", max_length=pad_to,
                                     return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
