"""onnxruntime inference for graphs written by :func:`pyft.export.export_onnx`, on GPU or CPU.

:class:`InferenceSession` runs such a file with onnxruntime (the CUDA execution provider when
``onnxruntime-gpu`` and a GPU are there, else the CPU) and turns arrays, image files or texts into
labels and probabilities. :func:`predict_files` is the same for a command line. The graph's
interface and metadata are described in :mod:`pyft.export`; this module needs neither PyTorch's
exporters nor the ``onnx`` package, only onnxruntime (and PyTorch for image preprocessing).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from pyft._checks import check_choice, check_number, expand_image_paths, import_optional

__all__ = ["InferenceSession", "Prediction", "predict_files"]

logger = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}

PathLike = Union[str, "os.PathLike[str]"]


def _ort() -> Any:
    return import_optional("onnxruntime",
                           "pip install onnxruntime (or pyft[gpu] for onnxruntime-gpu)",
                           "ONNX inference")


@dataclass
class Prediction:
    """Labels and probabilities for a batch of inputs.

    Attributes
    ----------
    labels : list of str
        The top-1 class name of each input.
    indices : ndarray of shape (n,), int64
        The top-1 class index of each input.
    probabilities : ndarray of shape (n, num_classes), float32
    logits : ndarray of shape (n, num_classes), float32
    class_names : list of str
    """

    labels: List[str]
    indices: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    class_names: List[str]

    def __len__(self) -> int:
        return len(self.labels)

    def top_k(self, k: int = 5) -> List[List[Tuple[str, float]]]:
        """The ``k`` most probable (class name, probability) pairs of each input."""
        check_number("k", k, low=1, integer=True)
        k = min(int(k), self.probabilities.shape[1])
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(self.probabilities[i, j])) for j in row]
                for i, row in enumerate(order)]


class InferenceSession:
    """Run a graph written by :func:`export_onnx` with onnxruntime, on a GPU or the CPU.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.onnx`` file (its ``.data`` file and tokenizer folder beside it).
    device : {"auto", "cpu", "cuda"} or "cuda:<index>"
        ``"auto"``: the CUDA execution provider when ``onnxruntime-gpu`` is installed and a GPU
        is present, else the CPU. ``"cuda"`` fails when CUDA cannot be used.
    intra_op_num_threads : int, optional
        CPU threads onnxruntime uses within an operator (default: its own choice, one per
        physical core).
    cudnn_conv_algo_search : {"EXHAUSTIVE", "HEURISTIC", "DEFAULT"}
        How the CUDA provider picks convolution algorithms. ``"EXHAUSTIVE"`` benchmarks them once
        per input shape (slow first call per batch size, fastest afterwards).

    Attributes
    ----------
    provider : str
        The execution provider onnxruntime actually uses (``"CUDAExecutionProvider"`` or
        ``"CPUExecutionProvider"``).
    fallback_reason : str or None
        Why ``device="auto"`` ended on the CPU although ``onnxruntime-gpu`` is installed.
    kind : {"image", "text"}
    class_names : list of str
    input_spec : dict
        The graph's inputs and preprocessing, as stored in its metadata.
    input_names, output_names : list of str
    """

    def __init__(self, path: PathLike, device: str = "auto", *,
                 intra_op_num_threads: Optional[int] = None,
                 cudnn_conv_algo_search: str = "EXHAUSTIVE") -> None:
        ort = _ort()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
        path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {path!r}")
        kind_of_device, device_id = _parse_device(device)
        check_choice("cudnn_conv_algo_search", cudnn_conv_algo_search,
                     ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"))
        if intra_op_num_threads is not None:
            check_number("intra_op_num_threads", intra_op_num_threads, low=1, integer=True)
        self.path = path
        self.fallback_reason: Optional[str] = None
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if kind_of_device == "cuda" and not has_cuda:
            raise RuntimeError(
                f"device={device!r} needs onnxruntime's CUDA execution provider, which this "
                f"onnxruntime does not have (providers: {', '.join(available)}); install "
                "'onnxruntime-gpu' instead of 'onnxruntime' (pip install pyft[gpu])")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if intra_op_num_threads is not None:
            so.intra_op_num_threads = int(intra_op_num_threads)
        want_cuda = kind_of_device == "cuda" or (kind_of_device == "auto" and has_cuda)
        session = None
        if want_cuda:
            cuda_options = {
                "device_id": str(device_id),
                "cudnn_conv_algo_search": cudnn_conv_algo_search,
                # let cuDNN use as much workspace as its fastest algorithms want
                "cudnn_conv_use_max_workspace": "1",
                "do_copy_in_default_stream": "1",
                "arena_extend_strategy": "kSameAsRequested",
            }
            try:
                session = ort.InferenceSession(
                    path, so, providers=[("CUDAExecutionProvider", cuda_options),
                                         "CPUExecutionProvider"])
            except Exception as e:
                if kind_of_device == "cuda":
                    raise RuntimeError(f"onnxruntime could not start its CUDA provider: {e}") from e
                self.fallback_reason = f"the CUDA provider failed to start: {e}"
            if session is not None and session.get_providers()[0] != "CUDAExecutionProvider":
                if kind_of_device == "cuda":
                    raise RuntimeError("onnxruntime could not start its CUDA provider (no GPU, "
                                       "or a CUDA/cuDNN that does not match onnxruntime-gpu)")
                self.fallback_reason = "the CUDA provider did not start (no GPU found?)"
        if session is None:
            try:
                session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ValueError(f"onnxruntime cannot load {path!r}: {e}") from e
        self._session = session
        self.provider = session.get_providers()[0]
        self.device_id = device_id
        if self.fallback_reason:
            logger.info("InferenceSession: using the CPU: %s", self.fallback_reason)
        self._read_metadata()

    # ------------------------------------------------------------------ metadata
    def _read_metadata(self) -> None:
        meta = self._session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("pyft.class_names", "pyft.input_spec") if k not in meta]
        if missing:
            raise ValueError(f"{self.path!r} has no pyft metadata ({', '.join(missing)}); "
                             "InferenceSession runs graphs written by pyft.export_onnx")
        self.metadata: Dict[str, str] = dict(meta)
        self.class_names: List[str] = json.loads(meta["pyft.class_names"])
        self.input_spec: Dict[str, Any] = json.loads(meta["pyft.input_spec"])
        self.kind: str = self.input_spec["kind"]
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._inputs = {i.name: (list(i.shape), i.type) for i in self._session.get_inputs()}
        self._preprocessing: Any = None
        self._tokenizer: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"InferenceSession({self.path!r}, kind={self.kind!r}, "
                f"classes={self.num_classes}, provider={self.provider!r})")

    # ------------------------------------------------------------------ running
    def run(self, inputs: Any) -> Dict[str, np.ndarray]:
        """Run the graph on inputs already in its format; no resizing or conversion.

        Parameters
        ----------
        inputs : ndarray, torch.Tensor or dict of them
            For image graphs the one input (``pixels`` float32 (n, 3, H, W) or ``images`` uint8
            (n, H, W, 3)); for text graphs ``{"input_ids", "attention_mask"}`` int64 (n, tokens).
            On a CUDA session, CUDA tensors are read in place.

        Returns
        -------
        dict of str to ndarray
            ``logits`` (and ``probabilities``), float32 (n, num_classes).
        """
        if not isinstance(inputs, dict):
            if len(self.input_names) != 1:
                raise TypeError(f"this graph takes {', '.join(self.input_names)}: pass a dict "
                                f"of arrays; got {type(inputs).__name__}")
            inputs = {self.input_names[0]: inputs}
        feeds = self._check_feeds(inputs)
        if self.provider == "CUDAExecutionProvider":
            outs = self._run_cuda(feeds)
        else:
            outs = self._session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

    def _run_cuda(self, feeds: Dict[str, Any]) -> List[np.ndarray]:
        io = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            elif value.device.type == "cuda":  # a CUDA tensor: bound in place, no copy
                value = value.contiguous()
                feeds[name] = value  # keep it alive until the run ends
                io.bind_input(name, device_type="cuda", device_id=value.device.index or 0,
                              element_type=_ORT_DTYPES[self._inputs[name][1]],
                              shape=tuple(value.shape), buffer_ptr=value.data_ptr())
            else:
                io.bind_cpu_input(name, value.numpy())
        for name in self.output_names:
            io.bind_output(name, "cuda", self.device_id)
        self._session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def _check_feeds(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        wanted, given = set(self.input_names), set(inputs)
        if wanted != given:
            raise ValueError(f"inputs must be {sorted(wanted)}; got {sorted(given)}")
        feeds: Dict[str, Any] = {}
        for name in self.input_names:
            x = inputs[name]
            shape, onnx_type = self._inputs[name]
            want_dtype = np.dtype(_ORT_DTYPES.get(onnx_type, np.float32))
            is_tensor = type(x).__module__.startswith("torch")
            if is_tensor and not (x.device.type == "cuda"
                                  and self.provider == "CUDAExecutionProvider"):
                if str(x.dtype) == "torch.bfloat16":
                    raise TypeError(f"input {name!r} must have dtype {want_dtype}; got "
                                    "torch.bfloat16")
                x = x.detach().cpu().numpy()  # CUDA tensors stay on the GPU for a CUDA session
                is_tensor = False
            if is_tensor:
                dtype = np.dtype(str(x.dtype).replace("torch.", "")) \
                    if str(x.dtype) in ("torch.float32", "torch.uint8", "torch.int64") else None
            elif isinstance(x, np.ndarray):
                dtype = x.dtype
            else:
                raise TypeError(f"input {name!r} must be a NumPy array or a torch tensor; got "
                                f"{type(x).__name__} (predict() takes lists, files and texts)")
            if dtype != want_dtype:
                hint = ""
                if self.kind == "image" and want_dtype == np.uint8:
                    hint = " (uint8 RGB pixels in [0, 255]; predict() converts other images)"
                elif self.kind == "image":
                    hint = (" (normalised pixels; use x.astype(np.float32), or predict() for raw "
                            "images)")
                raise TypeError(f"input {name!r} must have dtype {want_dtype}; got "
                                f"{x.dtype}{hint}")
            got = tuple(int(s) for s in x.shape)
            self._check_shape(name, got, shape)
            if isinstance(x, np.ndarray):
                x = np.ascontiguousarray(x)
            feeds[name] = x
        if self.kind == "text":
            self._check_tokens(feeds)
        return feeds

    def _check_shape(self, name: str, got: Tuple[int, ...], shape: List[Any]) -> None:
        expected = "(" + ", ".join(str(s) if isinstance(s, int) else "n" for s in shape) + ")"
        if len(got) != len(shape):
            raise ValueError(f"input {name!r} must have shape {expected}; got {got}")
        if got and got[0] == 0:
            raise ValueError(f"input {name!r} must hold at least one sample; got shape {got}")
        if self.kind == "image" and len(got) == 4:
            channels_first = isinstance(shape[1], int) and shape[1] == 3
            if channels_first and got[1] != 3 and got[3] == 3:
                raise ValueError(
                    f"input {name!r} must be channels-first {expected} (NCHW); got {got}, which "
                    "is channels-last (NHWC): transpose with x.transpose(0, 3, 1, 2)")
            if not channels_first and got[3] != 3 and got[1] == 3:
                raise ValueError(
                    f"input {name!r} must be channels-last {expected} (NHWC, uint8 RGB); got "
                    f"{got}, which is channels-first (NCHW): transpose with "
                    "x.transpose(0, 2, 3, 1)")
        for axis, (g, s) in enumerate(zip(got, shape)):
            if isinstance(s, int) and g != s:
                hint = " (predict() resizes images to the input size)" if self.kind == "image" \
                    else ""
                raise ValueError(f"input {name!r} must have shape {expected}; got {got} "
                                 f"(axis {axis} is {g}, expected {s}){hint}")

    def _check_tokens(self, feeds: Dict[str, Any]) -> None:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        if tuple(ids.shape) != tuple(mask.shape):
            raise ValueError("input_ids and attention_mask must have the same shape; got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        vocab = int(self.input_spec.get("vocab_size", 0))
        if vocab and isinstance(ids, np.ndarray) and ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids must be token ids in [0, {vocab}); got values in "
                                 f"[{lo}, {hi}]")
        if isinstance(mask, np.ndarray) and mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")

    # ------------------------------------------------------------------ predict
    def predict(self, inputs: Any, *, batch_size: int = 32) -> Prediction:
        """Labels and probabilities for raw inputs, in batches of ``batch_size``.

        Image models take what ``FineTunableModel.preprocess`` takes (arrays or tensors of
        shape (n, H, W), (n, H, W, C) or (n, C, H, W), uint8 or float in [0, 1]; lists of images
        of any sizes; PIL images) and image file paths (a path, or a list of them). Each image
        goes through the model's evaluation transform (resize / centre crop to the input size)
        in NumPy/PyTorch before it is fed; with preprocessing in the graph it is then rounded to
        uint8 for the graph, which normalises it. To feed images that are already exactly what
        the graph takes, use :meth:`run`. Text models take a string or a list of strings,
        tokenized with the tokenizer saved beside the graph.

        Returns
        -------
        Prediction
        """
        check_number("batch_size", batch_size, integer=True)
        if batch_size < 1:  # not check_number's wording: callers match this message
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        chunks = self._prepared_batches(inputs, int(batch_size))
        logits, probs = [], []
        for feeds in chunks:
            out = self.run(feeds)
            logits.append(out["logits"].astype(np.float32, copy=False))
            if "probabilities" in out:
                probs.append(out["probabilities"].astype(np.float32, copy=False))
        if not logits:
            raise ValueError("inputs must not be empty")
        all_logits = np.concatenate(logits)
        all_probs = np.concatenate(probs) if probs else \
            _softmax(all_logits.astype(np.float64)).astype(np.float32)
        idx = all_logits.argmax(axis=1).astype(np.int64)
        return Prediction(labels=[self.class_names[i] for i in idx], indices=idx,
                          probabilities=all_probs, logits=all_logits,
                          class_names=list(self.class_names))

    def _prepared_batches(self, inputs: Any, batch_size: int) -> Any:
        if self.kind == "text":
            texts = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise TypeError("this is a text model: inputs must be a string or a list of "
                                f"strings; got {type(inputs).__name__}")
            for i in range(0, len(texts), batch_size):
                yield self._tokenize(texts[i:i + batch_size])
            return
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)):
            inputs = expand_image_paths(inputs)
            n = len(inputs)
        elif isinstance(inputs, np.ndarray) or type(inputs).__module__.startswith("torch"):
            shape = tuple(inputs.shape)
            if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
                # checked here: batches would cut one image into slices of rows
                raise ValueError(f"images of shape {shape} look like one (H, W, C) image, not a "
                                 f"batch of {shape[0]} grayscale images; pass images[None]")
            n = int(shape[0]) if shape else 0
        else:
            inputs = [inputs]  # a PIL image
            n = 1
        if n == 0:
            raise ValueError("inputs must not be empty")
        for i in range(0, n, batch_size):
            yield self._prepare_images(_load_images(inputs[i:i + batch_size]))

    def _prepare_images(self, images: Any) -> Dict[str, np.ndarray]:
        pre = self._image_preprocessing()
        name = self.input_names[0]
        if self.input_spec.get("preprocessing_in_graph"):
            return {name: _to_uint8_nhwc(images, pre)}
        return {name: pre(images).numpy()}

    def _image_preprocessing(self) -> Any:
        if self._preprocessing is None:
            from pyft.preprocessing import ImagePreprocessing

            key = self.input_spec["preprocessing"]
            self._preprocessing = ImagePreprocessing(
                tuple(key["input_size"]), tuple(key["mean"]), tuple(key["std"]), key["resize"])
        return self._preprocessing

    def _tokenize(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        if not texts:
            raise ValueError("inputs must not be empty")
        if self._tokenizer is None:
            folder = os.path.join(os.path.dirname(self.path), self.input_spec["tokenizer"])
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"the tokenizer of {self.path!r} should be in {folder!r}, which does not "
                    "exist; keep the folder export_onnx wrote beside the graph")
            transformers = import_optional("transformers", "pip install transformers",
                                           "tokenizing texts")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(folder,
                                                                         local_files_only=True)
        enc = self._tokenizer(list(texts), padding=True, truncation=True,
                              max_length=int(self.input_spec["max_length"]), return_tensors="np")
        return {k: np.ascontiguousarray(enc[k], dtype=np.int64)
                for k in ("input_ids", "attention_mask")}


def _parse_device(device: Any) -> Tuple[str, int]:
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'; got "
                        f"{type(device).__name__}")
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'; got {device!r}")
    return m.group(1), int(m.group(2) or 0)


# ---------------------------------------------------------------------- image files


def _load_images(images: Any) -> Any:
    """Image file paths (alone or in a list) replaced by RGB uint8 arrays; the rest as given."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        return images
    if not any(isinstance(im, (str, os.PathLike)) for im in images):
        return images
    return [_read_image(im) if isinstance(im, (str, os.PathLike)) else im
            for im in expand_image_paths(images)]


def _read_image(path: Any) -> np.ndarray:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist (image models read strings "
                                "as image file paths; texts go to text models)")
    image_module = import_optional("PIL.Image", "pip install pillow", "reading image files")
    try:
        with image_module.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"{path!r} could not be read as an image: {e}") from e


def predict_files(path: PathLike, inputs: Sequence[str], *, device: str = "auto",
                  batch_size: int = 32, top_k: int = 1,
                  session: Optional[InferenceSession] = None) -> Dict[str, Any]:
    """Predict for image files (or folders of them) or texts, for a command line.

    Parameters
    ----------
    path : str
        A graph written by :func:`export_onnx`.
    inputs : sequence of str
        Image models: image file paths or directories (their image files, sorted). Text models:
        the texts themselves.
    device, batch_size
        As for :class:`InferenceSession` and :meth:`InferenceSession.predict`.
    top_k : int
        How many classes to list per input.
    session : InferenceSession, optional
        Reuse an open session instead of opening ``path``.

    Returns
    -------
    dict
        JSON-ready: ``{"model", "provider", "kind", "predictions": [{"input", "label", "index",
        "probability", "top_k": [{"label", "probability"}, ...]}, ...]}``.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError("inputs must be a non-empty list of image paths or texts")
    sess = session if session is not None else InferenceSession(path, device=device)
    items: List[Any] = list(inputs)
    if sess.kind == "image":
        items = expand_image_paths(items)
        for it in items:
            if not isinstance(it, (str, os.PathLike)):
                raise TypeError(f"inputs must be image file paths; got {type(it).__name__}")
    pred = sess.predict(items, batch_size=batch_size)
    tops = pred.top_k(top_k)
    rows = []
    for item, label, index, top in zip(items, pred.labels, pred.indices, tops):
        rows.append({"input": os.fspath(item) if not isinstance(item, str) else item,
                     "label": label, "index": int(index),
                     "probability": float(pred.probabilities[len(rows), index]),
                     "top_k": [{"label": lab, "probability": p} for lab, p in top]})
    return {"model": sess.path, "provider": sess.provider, "kind": sess.kind, "predictions": rows}


# ---------------------------------------------------------------------- shared with export
def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _to_uint8_nhwc(images: Any, pre: Any) -> np.ndarray:
    """Images through ``pre``'s resize/crop (not its normalisation), as uint8 (n, H, W, 3)."""
    h, w = pre.input_size
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 \
            and images.shape[1:] == (h, w, 3) and pre.resize is None:
        return np.ascontiguousarray(images)  # already what the graph takes
    import torch

    from pyft.preprocessing import ImagePreprocessing

    same_size = ImagePreprocessing(tuple(pre.input_size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                   pre.resize)
    x = same_size(images)  # float32 (n, 3, H, W) in [0, 1]
    u8 = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())
