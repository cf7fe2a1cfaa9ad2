"""One verified ONNX graph from a fine-tuned model.

:func:`export_onnx` writes body + new head as a single graph with a dynamic batch axis, checks it
with ``onnx.checker`` and compares onnxruntime with PyTorch on sample inputs before the file is
put in place. Running such a file is :mod:`pyft.inference`'s job (:class:`InferenceSession`,
:func:`predict_files`); those names are re-exported here, where they were first published.

The graph's interface (all batch axes dynamic):

======================  ================================  ===============================
model                   inputs                            outputs
======================  ================================  ===============================
image                   ``pixels`` float32 (n, 3, H, W),  ``logits`` float32 (n, classes)
                        normalised as the model expects   [``probabilities`` float32]
image, preprocessing    ``images`` uint8 (n, H, W, 3),    same
in the graph            RGB at the model's input size
text                    ``input_ids``, ``attention_mask``  same
                        int64 (n, tokens)
======================  ================================  ===============================

Everything a deployment needs besides the graph is in the model's metadata (``pyft.*`` keys:
class names, input spec with the preprocessing, pyft version, exporter) and, for text models, in
the tokenizer folder saved next to the file (``<name>.tokenizer/``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from pyft._checks import check_bool, check_choice, check_number, import_optional
from pyft.inference import (
    InferenceSession,
    PathLike,
    Prediction,
    _load_images,
    _ort,
    _softmax,
    _to_uint8_nhwc,
    predict_files,
)

__all__ = [
    "export_onnx", "ExportResult", "Verification", "ExportError", "VerificationError",
    "DEFAULT_OPSET",
    # the runtime moved to pyft.inference; `from pyft.export import InferenceSession` still works
    "InferenceSession", "Prediction", "predict_files",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
# protobuf cannot serialise a message over 2 GiB; keep room for the graph besides the weights.
EXTERNAL_DATA_BYTES = 2**31 - 2**27
VERIFY_BATCH_SIZES = (1, 7)
NUM_RANDOM_SAMPLES = 8
_EXPORTERS = ("auto", "dynamo", "torchscript")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# How the two exporters say that they have no translation for an operator.
_UNSUPPORTED = re.compile(r"No ONNX function|unrecognized namespace|not supported|[Uu]nsupported "
                          r"(?:operator|ONNX|FX)|Could not export operator|is not supported")


class ExportError(RuntimeError):
    """The model could not be exported to a valid ONNX graph (no file was written)."""


class VerificationError(ExportError):
    """The exported graph does not reproduce PyTorch's outputs (no file was written)."""


# ====================================================================== results
@dataclass
class Verification:
    """How onnxruntime's outputs compared with PyTorch's right after export.

    Attributes
    ----------
    samples : {"user", "random"}
        ``"user"``: the ``sample_inputs`` given; ``"random"``: deterministic random inputs of the
        right shape (no sample inputs were given, so the check says nothing about real data).
    num_samples : int
    batch_sizes : list of int
        Batch sizes run through onnxruntime (all samples at once, 1 and 7).
    tolerance : float
        1e-4 for float32 graphs, 1e-2 for float16 weights.
    max_abs_diff_probabilities : float
        Largest absolute difference of the class probabilities (softmax), the quantity the
        tolerance applies to.
    max_abs_diff_logits, max_abs_logit : float
        Largest absolute difference of the logits and largest PyTorch logit: logits must agree
        within ``tolerance * max(1, max_abs_logit)``.
    top1_agree : int
        Samples whose top-1 class is the same in both, out of every sample of every batch size.
    top1_ties : int
        Of those, samples where the classes differ but PyTorch's own scores for the two are
        within the logit tolerance (a tie at the graph's precision, counted as agreeing).
    """

    samples: str
    num_samples: int
    batch_sizes: List[int]
    tolerance: float
    max_abs_diff_probabilities: float
    max_abs_diff_logits: float
    max_abs_logit: float
    top1_agree: int
    top1_total: int
    top1_ties: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes
    ----------
    path : str
        The ONNX file.
    files : list of str
        Every file or folder written (the ONNX file, its external data, the tokenizer folder).
    exporter : {"dynamo", "torchscript"}
        The exporter that produced the graph.
    exporter_fallback : str or None
        Why the dynamo-based exporter was not used, when ``exporter="auto"`` fell back.
    opset : int
    inputs, outputs : dict
        Name -> (shape, dtype) of the graph's inputs and outputs (``"batch"`` marks dynamic axes).
    verification : Verification
    metadata : dict
        The ``pyft.*`` metadata stored in the file.
    """

    path: str
    files: List[str]
    exporter: str
    exporter_fallback: Optional[str]
    opset: int
    float16: bool
    preprocessing_in_graph: bool
    inputs: Dict[str, Tuple[Tuple[Union[int, str], ...], str]]
    outputs: Dict[str, Tuple[Tuple[Union[int, str], ...], str]]
    external_data: bool
    verification: Verification
    metadata: Dict[str, str] = field(repr=False)

    def __str__(self) -> str:
        v = self.verification
        fallback = f" (dynamo exporter failed: {self.exporter_fallback})" \
            if self.exporter_fallback else ""
        return (
            f"{self.path}: {self.exporter} exporter{fallback}, opset {self.opset}, "
            f"{'float16' if self.float16 else 'float32'} weights; verified on {v.num_samples} "
            f"{v.samples} samples at batch sizes {v.batch_sizes}: max |diff| probabilities "
            f"{v.max_abs_diff_probabilities:.2e}, logits {v.max_abs_diff_logits:.2e} "
            f"(tolerance {v.tolerance:g}), top-1 {v.top1_agree}/{v.top1_total}")


# ====================================================================== optional packages
def _onnx() -> Any:
    return import_optional("onnx", "pip install onnx onnxruntime", "ONNX export")


# ====================================================================== export
def export_onnx(model: Any, path: PathLike, *, class_names: Optional[Sequence[str]] = None,
                sample_inputs: Any = None, opset: int = DEFAULT_OPSET, exporter: str = "auto",
                float16: bool = False, preprocessing: bool = False, probabilities: bool = False,
                external_data: Optional[bool] = None) -> ExportResult:
    """Export a fine-tuned model (body + new head) to one ONNX graph, verified against PyTorch.

    The graph is traced in eval mode with a batch of 2 and a dynamic batch axis (and a dynamic
    token axis for text). Right after export it is checked with ``onnx.checker`` and run by
    onnxruntime (CPU) on the samples at once, at batch size 1 and at batch size 7; the class
    probabilities must match PyTorch within 1e-4 (1e-2 with ``float16=True``), the logits
    within the same tolerance times ``max(1, largest logit)``, and the top-1 class must be the
    same for every sample. Only then are the files moved into place: on any failure nothing new
    is left at ``path`` (a file already there is left as it was).

    Parameters
    ----------
    model : FineTunableModel
        From :func:`pyft.load_model` / :func:`pyft.wrap_model`. A model in training mode is
        exported in eval mode (with a warning) and its modes are restored afterwards; a model on
        a GPU is exported from a CPU copy.
    path : str or os.PathLike
        The ``.onnx`` file to write; its directory must exist. Beside it go ``<path>.data``
        (external weights, see ``external_data``) and, for text models, the tokenizer files in
        ``<name>.tokenizer/`` (``name`` is the file name without ``.onnx``).
    class_names : sequence of str, optional
        One name per output of the head (default ``"0"``, ``"1"``, ...); stored in the metadata and
        returned by :meth:`InferenceSession.predict`.
    sample_inputs : optional
        Real inputs for the verification: what ``model.preprocess`` takes (images as arrays,
        tensors, PIL images or file paths; a list of strings for text models). Default:
        deterministic random inputs of the right shape, and the result says so
        (``verification.samples == "random"``).
    opset : int
        ONNX opset (default 18; the dynamo exporter needs 18 or more).
    exporter : {"auto", "dynamo", "torchscript"}
        ``"auto"`` tries the dynamo-based exporter (``torch.onnx.export(dynamo=True)``) and falls
        back to the TorchScript one when it fails or its graph does not verify; the reason is
        recorded in the result and the metadata.
    float16 : bool
        Store weights (and compute) in float16; inputs and outputs stay float32 / uint8.
    preprocessing : bool
        Image models only: the graph takes uint8 RGB images of shape (n, H, W, 3) at the model's
        input size and does the scaling, normalisation and layout change itself, so that a
        deployment needs no Python. Resizing stays outside the graph
        (:meth:`InferenceSession.predict` does it).
    probabilities : bool
        Add a ``probabilities`` output (softmax over the classes, float32).
    external_data : bool, optional
        Keep the weights in ``<path>.data`` beside the graph. Default: only when they exceed what
        one protobuf file can hold (2 GB).

    Returns
    -------
    ExportResult

    Raises
    ------
    FileNotFoundError
        ``path`` is in a directory that does not exist.
    ExportError
        No exporter could produce a valid graph; names the operator that failed and the module
        that calls it when it can be identified.
    VerificationError
        The graph runs but does not reproduce PyTorch (the numbers are in the message).
    """
    import torch

    path, opset, names = _checked_arguments(model, path, class_names, opset, exporter, float16,
                                            preprocessing, probabilities, external_data)
    modes = {n: m.training for n, m in model.named_modules()}
    if any(modes.values()):
        warnings.warn(
            "the model is in training mode; exporting it in eval mode (dropout off, BatchNorm "
            "with its running statistics). Its training mode is restored afterwards.",
            UserWarning, stacklevel=2)
    try:
        model.eval()
        net = model.net
        if any(t.device.type != "cpu" for t in list(net.parameters()) + list(net.buffers())):
            net = copy.deepcopy(net).cpu()  # trace and compare on the CPU, onnxruntime's device
        with torch.no_grad():
            return _export(model, net, path, names, sample_inputs, opset, exporter, bool(float16),
                           bool(preprocessing), bool(probabilities), external_data)
    finally:
        for n, m in model.named_modules():
            m.training = modes[n]


def _checked_arguments(model: Any, path: Any, class_names: Any, opset: Any, exporter: Any,
                       float16: Any, preprocessing: Any, probabilities: Any,
                       external_data: Any) -> Tuple[str, int, List[str]]:
    """Check :func:`export_onnx`'s arguments (and that onnx and onnxruntime import) before
    anything is traced; return the absolute path, the opset and the class names."""
    from pyft.models import FineTunableModel

    if not isinstance(model, FineTunableModel):
        raise TypeError("model must be a FineTunableModel (from pyft.load_model or "
                        f"pyft.wrap_model); got {type(model).__name__}")
    path = _check_path(path)
    for name, flag in (("float16", float16), ("preprocessing", preprocessing),
                       ("probabilities", probabilities)):
        check_bool(name, flag)
    if external_data is not None and not isinstance(external_data, (bool, np.bool_)):
        # not check_bool: None (decide by size) is a value too, and the message says so
        raise TypeError(f"external_data must be None, True or False; got {external_data!r}")
    check_choice("exporter", exporter, _EXPORTERS)
    onnx = _onnx()
    _ort()
    max_opset = int(onnx.defs.onnx_opset_version())
    check_number("opset", opset, integer=True)
    if not 13 <= int(opset) <= max_opset:  # the bound's reason is part of the message
        raise ValueError(f"opset must be an int in [13, {max_opset}] (the installed onnx's "
                         f"newest); got {opset!r}")
    opset = int(opset)
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter needs opset >= 18; got opset={opset} "
                         "(use exporter='torchscript' for older opsets)")
    if model.kind not in ("image", "text"):
        raise ValueError(f"model.kind must be 'image' or 'text'; got {model.kind!r}")
    if preprocessing and model.kind != "image":
        raise ValueError("preprocessing=True puts image normalisation in the graph; this is a "
                         "text model, whose tokenizer is saved beside the graph instead")
    return path, opset, _check_class_names(class_names, model.num_classes)


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r} is in a directory that does not exist: {folder!r}; "
                                "create it first")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path must be a file name; {path!r} is a directory")
    return path


def _check_class_names(class_names: Any, num_classes: int) -> List[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if isinstance(class_names, str) or not isinstance(class_names, (list, tuple, np.ndarray)):
        raise TypeError(f"class_names must be a sequence of {num_classes} strings; "
                        f"got {type(class_names).__name__}")
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names must have one name per class ({num_classes}); "
                         f"got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct; got {names}")
    return names


# ---------------------------------------------------------------------- graph modules
def _graph_module(net: Any, kind: str, pre: Any, float16: bool, uint8_in: bool,
                  probabilities: bool) -> Any:
    import torch
    from torch import nn

    class ImageGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32)
                                 .view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32)
                                 .view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> Any:
            if uint8_in:  # the arithmetic of ImagePreprocessing, without the resize
                x = (x.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - self.mean) / self.std
            return _heads(self.net(x.to(torch.float16) if float16 else x))

    class TextGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return _heads(self.net(input_ids=input_ids, attention_mask=attention_mask))

    def _heads(logits: torch.Tensor) -> Any:
        logits = logits.to(torch.float32)
        if probabilities:
            return logits, torch.softmax(logits, dim=-1)
        return logits

    return (ImageGraph() if kind == "image" else TextGraph()).eval()


# ---------------------------------------------------------------------- samples
def _image_samples(model: Any, sample_inputs: Any, uint8_in: bool
                   ) -> Tuple[Dict[str, np.ndarray], Any, str]:
    """(graph feeds, PyTorch float32 NCHW reference input, "user"/"random")."""
    import torch

    pre = model.preprocessing
    h, w = pre.input_size
    if sample_inputs is None:
        rng = np.random.default_rng(0)
        u8 = rng.integers(0, 256, size=(NUM_RANDOM_SAMPLES, h, w, 3), dtype=np.uint8)
        source = "random"
    else:
        images = _load_images(sample_inputs)
        source = "user"
        if not uint8_in:
            x = pre(images).to(torch.float32)
            return {"pixels": x.numpy()}, x, source
        u8 = _to_uint8_nhwc(images, pre)
    ref = _normalise_uint8(u8, pre)
    if uint8_in:
        return {"images": u8}, ref, source
    return {"pixels": ref.numpy()}, ref, source


def _normalise_uint8(u8: np.ndarray, pre: Any) -> Any:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _text_samples(model: Any, sample_inputs: Any
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], str]:
    import torch

    if sample_inputs is not None:
        enc = model.preprocess(sample_inputs)
        feeds = {k: enc[k].to(torch.int64).numpy() for k in ("input_ids", "attention_mask")}
        return feeds, {k: torch.from_numpy(v) for k, v in feeds.items()}, "user"
    tok = model.preprocessing.tokenizer
    n, length = NUM_RANDOM_SAMPLES, min(16, int(model.preprocessing.max_length))
    rng = np.random.default_rng(0)
    special = {int(t) for t in (tok.all_special_ids or [])}
    vocab = len(tok)
    ids = rng.integers(0, vocab, size=(n, length), dtype=np.int64)
    for t in special:  # ordinary tokens in the body of each text
        ids[ids == t] = (t + 1000) % vocab
    mask = np.ones((n, length), dtype=np.int64)
    for i in range(n):
        valid = length - (i * (length // 2)) // n  # from full length down to about half
        if tok.cls_token_id is not None:
            ids[i, 0] = tok.cls_token_id
        if tok.sep_token_id is not None:
            ids[i, valid - 1] = tok.sep_token_id
        ids[i, valid:] = tok.pad_token_id if tok.pad_token_id is not None else 0
        mask[i, valid:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    return feeds, {k: torch.from_numpy(v) for k, v in feeds.items()}, "random"


def _first(feeds: Dict[str, np.ndarray], rows: Sequence[int]) -> Dict[str, np.ndarray]:
    idx = np.asarray(rows, dtype=np.int64)
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}


# ---------------------------------------------------------------------- the export itself
@dataclass
class _Plan:
    """What every exporter's attempt shares: the module to trace and an example batch, the
    verification samples with PyTorch's outputs on them, the graph's interface, and the files to
    write with their metadata."""

    model: Any
    graph: Any
    example: Tuple[Any, ...]
    feeds: Dict[str, np.ndarray]
    reference: np.ndarray
    source: str
    input_names: List[str]
    input_shapes: Dict[str, Tuple[Tuple[Union[int, str], ...], str]]
    output_names: List[str]
    dynamic_axes: Dict[str, Dict[int, str]]
    opset: int
    float16: bool
    uint8_in: bool
    tolerance: float
    folder: str
    base: str
    data_name: Optional[str]
    tokenizer_name: Optional[str]
    metadata: Dict[str, str]


@dataclass
class _Attempt:
    """One exporter's checked and verified graph, staged in ``final_dir``."""

    exporter: str
    final_dir: str
    metadata: Dict[str, str]
    verification: Verification
    opset: int
    data_name: Optional[str]  # the external data file, when one was written


def _export(model: Any, net: Any, path: str, class_names: List[str], sample_inputs: Any,
            opset: int, exporter: str, float16: bool, uint8_in: bool, probabilities: bool,
            external_data: Optional[bool]) -> ExportResult:
    """Try the exporters in turn in a scratch folder beside ``path``; publish the first graph
    that checks and verifies, or raise an account of every failure."""
    plan = _plan(model, net, path, class_names, sample_inputs, opset, float16, uint8_in,
                 probabilities, external_data)
    candidates = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: List[Tuple[str, BaseException]] = []
    work = tempfile.mkdtemp(prefix=f".{plan.base}.pyft-export-", dir=plan.folder)
    try:
        for name in candidates:
            stage = os.path.join(work, name)
            os.mkdir(stage)
            try:
                attempt = _attempt(plan, name, stage, failures[-1][1] if failures else None)
            except Exception as e:
                failures.append((name, e))
                logger.info("export_onnx: the %s exporter failed: %s", name, _reason(e))
                continue
            return _publish(plan, attempt, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raise _failure(failures, plan.graph, plan.example)


def _plan(model: Any, net: Any, path: str, class_names: List[str], sample_inputs: Any,
          opset: int, float16: bool, uint8_in: bool, probabilities: bool,
          external_data: Optional[bool]) -> _Plan:
    import torch

    kind, pre = model.kind, model.preprocessing
    feeds, reference, source = _samples_and_reference(model, net, sample_inputs, uint8_in)
    input_names, input_shapes, dynamic_axes = _graph_inputs(model, uint8_in)
    n = len(reference)
    trace_rows = [0, 1] if n >= 2 else [0, 0]  # trace with batch 2: batch 1 may be specialised
    example = tuple(torch.from_numpy(v) for v in _first(feeds, trace_rows).values())

    graph_net = copy.deepcopy(net).half() if float16 else net
    graph = _graph_module(graph_net, kind, pre, float16, uint8_in, probabilities)
    output_names = ["logits", "probabilities"] if probabilities else ["logits"]
    for o in output_names:
        dynamic_axes[o] = {0: "batch"}
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    use_external = bool(external_data) if external_data is not None \
        else weight_bytes > EXTERNAL_DATA_BYTES

    base = os.path.basename(path)
    tokenizer_name = os.path.splitext(base)[0] + ".tokenizer" if kind == "text" else None
    dtype_name = "float16" if float16 else "float32"
    spec = _input_spec(model, input_shapes, uint8_in, tokenizer_name)
    return _Plan(
        model=model, graph=graph, example=example, feeds=feeds, reference=reference,
        source=source, input_names=input_names, input_shapes=input_shapes,
        output_names=output_names, dynamic_axes=dynamic_axes, opset=opset, float16=float16,
        uint8_in=uint8_in, tolerance=TOLERANCE[dtype_name], folder=os.path.dirname(path),
        base=base, data_name=base + ".data" if use_external else None,
        tokenizer_name=tokenizer_name,
        metadata=_metadata(model, class_names, spec, output_names, dtype_name))


def _samples_and_reference(model: Any, net: Any, sample_inputs: Any, uint8_in: bool
                           ) -> Tuple[Dict[str, np.ndarray], np.ndarray, str]:
    """(graph feeds, PyTorch's logits on them, "user"/"random")."""
    if model.kind == "image":
        feeds, ref_input, source = _image_samples(model, sample_inputs, uint8_in)
        reference = _reference(net, (ref_input,), {}, source)
    else:
        feeds, ref_input, source = _text_samples(model, sample_inputs)
        reference = _reference(net, (), ref_input, source)
    if source == "random":
        logger.info("export_onnx: no sample_inputs given; verifying on %d deterministic random "
                    "%s inputs", len(reference), model.kind)
    if reference.ndim != 2 or reference.shape[1] != model.num_classes:
        raise ExportError(f"the model's output must have shape (n, {model.num_classes}); "
                          f"PyTorch returned {tuple(reference.shape)}")
    return feeds, reference, source


def _graph_inputs(model: Any, uint8_in: bool) -> Tuple[List[str], Dict[str, Any],
                                                       Dict[str, Dict[int, str]]]:
    """The graph's input names, their (shape, dtype) and their dynamic axes."""
    if model.kind == "image":
        input_names = ["images"] if uint8_in else ["pixels"]
        h, w = model.preprocessing.input_size
        input_shapes = {"images": (("batch", h, w, 3), "uint8")} if uint8_in else \
            {"pixels": (("batch", 3, h, w), "float32")}
        return input_names, input_shapes, {input_names[0]: {0: "batch"}}
    input_names = ["input_ids", "attention_mask"]
    input_shapes = {k: (("batch", "tokens"), "int64") for k in input_names}
    return input_names, input_shapes, {k: {0: "batch", 1: "tokens"} for k in input_names}


def _metadata(model: Any, class_names: List[str], input_spec: Dict[str, Any],
              output_names: List[str], dtype_name: str) -> Dict[str, str]:
    """The ``pyft.*`` keys every attempt stores (the exporter's own are added per attempt)."""
    import pyft

    return {
        "pyft.version": pyft.__version__,
        "pyft.model": json.dumps({"spec": model.spec, "kind": model.kind,
                                  "num_classes": model.num_classes, "head": model.head_name,
                                  # a file name, not the exporting machine's folders
                                  "weights": os.path.basename(str(model.weights_source))}),
        "pyft.class_names": json.dumps(class_names),
        "pyft.input_spec": json.dumps(input_spec),
        "pyft.outputs": json.dumps(output_names),
        "pyft.weights_dtype": dtype_name,
    }


def _attempt(plan: _Plan, name: str, stage: str, previous: Optional[BaseException]) -> _Attempt:
    """Export with exporter ``name`` into ``stage``, then check the graph, verify it against
    PyTorch and store the metadata; any failure raises."""
    import pyft

    onnx = _onnx()
    model = plan.model
    raw = _run_exporter(name, plan.graph, plan.example, plan.input_names, plan.output_names,
                        plan.dynamic_axes, plan.opset, stage, model.kind, model.preprocessing)
    proto = onnx.load(raw)
    _check_dynamic_axes(proto, plan.dynamic_axes)
    meta = dict(plan.metadata, **{"pyft.exporter": name})
    if previous is not None:
        meta["pyft.exporter_fallback"] = _reason(previous)
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"{model.spec} with a {model.num_classes}-way head, exported by "
                        f"pyft {pyft.__version__}")
    final_dir = os.path.join(stage, "final")
    os.mkdir(final_dir)
    final = os.path.join(final_dir, plan.base)
    if plan.data_name is not None:
        onnx.save_model(proto, final, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=plan.data_name,
                        size_threshold=1024)
    else:
        onnx.save_model(proto, final)
    del proto  # the weights, before onnxruntime loads another copy
    written = plan.data_name if plan.data_name is not None and \
        os.path.exists(os.path.join(final_dir, plan.data_name)) else None  # or all small
    try:
        onnx.checker.check_model(final, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the graph: {_reason(e)}") from e
    verification = _verify(final, plan.feeds, plan.reference, plan.tolerance, plan.source,
                           plan.output_names)
    meta["pyft.verification"] = json.dumps(verification.as_dict())
    _set_metadata(final, meta)
    return _Attempt(exporter=name, final_dir=final_dir, metadata=meta,
                    verification=verification, opset=_opset_of(final), data_name=written)


def _publish(plan: _Plan, attempt: _Attempt, path: str) -> ExportResult:
    """Save the tokenizer beside the staged graph, move everything into place, and describe it."""
    if plan.tokenizer_name is not None:
        tok_dir = os.path.join(attempt.final_dir, plan.tokenizer_name)
        plan.model.preprocessing.tokenizer.save_pretrained(tok_dir)
    files = _move_into_place(attempt.final_dir, plan.folder, plan.base, attempt.data_name,
                             plan.tokenizer_name)
    return ExportResult(
        path=path, files=files, exporter=attempt.exporter,
        exporter_fallback=attempt.metadata.get("pyft.exporter_fallback"), opset=attempt.opset,
        float16=plan.float16, preprocessing_in_graph=plan.uint8_in, inputs=plan.input_shapes,
        outputs={o: (("batch", plan.model.num_classes), "float32") for o in plan.output_names},
        external_data=attempt.data_name is not None, verification=attempt.verification,
        metadata=attempt.metadata)


def _check_dynamic_axes(proto: Any, dynamic_axes: Dict[str, Dict[int, str]]) -> None:
    """An exporter may quietly specialise an axis the model's code turns into a Python int."""
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis, name in dynamic_axes.get(inp.name, {}).items():
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                raise VerificationError(
                    f"the exporter fixed the {name} axis of input {inp.name!r} to "
                    f"{dims[axis].dim_value}: the model's code turns that size into a constant "
                    "(int(x.shape[0]), x.view(2, -1), a loop over the batch); use x.shape[0] "
                    "or x.flatten(1) unchanged")


def _reference(net: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], source: str
               ) -> np.ndarray:
    import torch

    n = len(args[0]) if args else len(next(iter(kwargs.values())))
    try:
        with torch.inference_mode():
            out = net(*args, **kwargs)
    except Exception as e:
        raise ExportError(f"the model fails in PyTorch on the {n} {source} verification samples "
                          f"(batch of {n}): {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ExportError("the model must return one tensor of logits (n, num_classes); it "
                          f"returned {type(out).__name__}")
    return out.detach().to(torch.float32).numpy()


def _input_spec(model: Any, shapes: Dict[str, Any], uint8_in: bool,
                tokenizer_name: Optional[str]) -> Dict[str, Any]:
    spec: Dict[str, Any] = {
        "kind": model.kind,
        "inputs": [{"name": k, "shape": list(s), "dtype": d} for k, (s, d) in shapes.items()],
        "preprocessing": model.preprocessing.key(),
    }
    if model.kind == "image":
        spec["layout"] = "NHWC uint8 RGB" if uint8_in else "NCHW float32, normalised"
        spec["preprocessing_in_graph"] = uint8_in
    else:
        tok = model.preprocessing.tokenizer
        spec["tokenizer"] = tokenizer_name
        spec["max_length"] = int(model.preprocessing.max_length)
        spec["vocab_size"] = int(len(tok))
        spec["pad_token_id"] = int(tok.pad_token_id) if tok.pad_token_id is not None else 0
    return spec


def _run_exporter(name: str, graph: Any, example: Tuple[Any, ...], input_names: List[str],
                  output_names: List[str], dynamic_axes: Dict[str, Dict[int, str]], opset: int,
                  stage: str, kind: str, pre: Any) -> str:
    import torch

    raw = os.path.join(stage, "raw.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if name == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            if kind == "text":
                tokens = torch.export.Dim("tokens", min=1, max=max(2, int(pre.max_length)))
                dynamic_shapes: Any = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
            else:
                dynamic_shapes = ({0: batch},)
            program = torch.onnx.export(
                graph, example, None, dynamo=True, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, opset_version=opset,
                verbose=False)
            program.save(raw, external_data=True)
        else:
            # On failure the TorchScript exporter dumps its graph on the log stream, stdout by
            # default: keep stdout clean for callers that print JSON there.
            _set_onnx_log_stream(torch, "stderr")
            try:
                torch.onnx.export(
                    graph, example, raw, dynamo=False, input_names=input_names,
                    output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                    do_constant_folding=True)
            finally:
                _set_onnx_log_stream(torch, "stdout")
    for w in caught:  # the exporters' deprecation and tracer notes: for debugging only
        logger.debug("%s exporter: %s: %s", name, w.category.__name__, w.message)
    return raw


def _set_onnx_log_stream(torch: Any, stream: str) -> None:
    setter = getattr(torch._C, "_jit_set_onnx_log_output_stream", None)
    if setter is not None:
        try:
            setter(stream)
        except Exception:  # a private hook: losing it only costs a noisier failure
            pass


def _set_metadata(path: str, meta: Dict[str, str]) -> None:
    onnx = _onnx()
    proto = onnx.load(path, load_external_data=False)  # external tensors stay where they are
    onnx.helper.set_model_props(proto, meta)
    onnx.save_model(proto, path)


def _opset_of(path: str) -> int:
    onnx = _onnx()
    proto = onnx.load(path, load_external_data=False)
    return int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


def _move_into_place(final_dir: str, folder: str, base: str, data_name: Optional[str],
                     tokenizer_name: Optional[str]) -> List[str]:
    """Companions first, the graph last: once ``base`` appears, everything it needs is there."""
    files = []
    if tokenizer_name is not None:
        dest = os.path.join(folder, tokenizer_name)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(final_dir, tokenizer_name), dest)
        files.append(dest)
    if data_name is not None:
        dest = os.path.join(folder, data_name)
        os.replace(os.path.join(final_dir, data_name), dest)
        files.append(dest)
    dest = os.path.join(folder, base)
    os.replace(os.path.join(final_dir, base), dest)
    return [dest] + files


# ---------------------------------------------------------------------- verification
def _verify(path: str, feeds: Dict[str, np.ndarray], reference: np.ndarray, tol: float,
            source: str, output_names: List[str]) -> Verification:
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures are reported in the exception, not also on stderr
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VerificationError(
            f"onnxruntime could not load the exported graph: {_reason(e)}") from e
    n = len(reference)
    runs = [(f"batch size {n} (all samples)", list(range(n)))]
    for b in VERIFY_BATCH_SIZES:
        if b != n:
            runs.append((f"batch size {b}", [i % n for i in range(b)]))
    ref_probs = _softmax(reference.astype(np.float64))
    if not np.isfinite(reference).all():
        raise VerificationError("PyTorch's outputs on the samples contain NaN or infinity")
    scale = max(1.0, float(np.abs(reference).max()))
    logit_tol = tol * scale
    worst_p = worst_l = 0.0
    agree = total = ties = 0
    where: List[str] = []
    for label, rows in runs:
        try:
            outs = sess.run(output_names, _first(feeds, rows))
        except Exception as e:
            raise VerificationError(
                f"the exported graph failed to run in onnxruntime at {label}: "
                f"{_reason(e)}. A fixed batch size in the model's code (x.view(2, -1), "
                "a Python int taken from a shape) is a common cause") from e
        logits = outs[0]
        expected = reference[rows]
        if logits.shape != expected.shape:
            raise VerificationError(f"at {label} the graph returned logits of shape "
                                    f"{tuple(logits.shape)}; PyTorch returned {expected.shape}")
        if not np.isfinite(logits).all():
            raise VerificationError(f"at {label} onnxruntime returned NaN or infinity where "
                                    "PyTorch's outputs are finite")
        probs = outs[1] if len(outs) > 1 else _softmax(logits.astype(np.float64))
        dl = float(np.abs(logits.astype(np.float64) - expected).max())
        dp = float(np.abs(probs - ref_probs[rows]).max())
        if len(outs) > 1:  # the in-graph softmax against the graph's own logits, too
            dp = max(dp, float(np.abs(probs - _softmax(logits.astype(np.float64))).max()))
        worst_l, worst_p = max(worst_l, dl), max(worst_p, dp)
        got, want = logits.argmax(1), expected.argmax(1)
        for i in np.flatnonzero(got != want):
            gap = float(expected[i, want[i]] - expected[i, got[i]])
            if gap <= logit_tol:
                ties += 1
            else:
                where.append(f"{label} row {i}: PyTorch class {want[i]}, onnxruntime {got[i]} "
                             f"(PyTorch's margin {gap:.3g})")
        total += len(rows)
    agree = total - len(where)
    result = Verification(samples=source, num_samples=n, batch_sizes=[len(r) for _, r in runs],
                          tolerance=tol, max_abs_diff_probabilities=worst_p,
                          max_abs_diff_logits=worst_l, max_abs_logit=scale, top1_agree=agree,
                          top1_total=total, top1_ties=ties)
    problems = []
    if worst_p > tol:
        problems.append(f"probabilities differ by up to {worst_p:.3g} (tolerance {tol:g})")
    if worst_l > logit_tol:
        problems.append(f"logits differ by up to {worst_l:.3g} (tolerance {logit_tol:.3g} = "
                        f"{tol:g} x largest |logit| {scale:.3g})")
    if where:
        problems.append(f"top-1 differs on {len(where)} of {total} samples: "
                        + "; ".join(where[:5]))
    if problems:
        raise VerificationError(
            f"onnxruntime does not reproduce PyTorch on {n} {source} samples: "
            + "; ".join(problems))
    return result


# ---------------------------------------------------------------------- failure reports
def _reason(e: BaseException, limit: int = 600) -> str:
    """A short, single-paragraph account of an exporter's exception."""
    text = _ANSI.sub("", str(e))
    if "## Exception summary" in text:  # the dynamo exporter's report: keep its summary
        text = text.split("## Exception summary", 1)[1].split("(Refer to the full stack", 1)[0]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _failure(failures: List[Tuple[str, BaseException]], graph: Any,
             example: Tuple[Any, ...]) -> ExportError:
    verification = [(n, e) for n, e in failures if isinstance(e, VerificationError)]
    accounts = "; ".join(f"{n} exporter: {_reason(e)}" for n, e in failures)
    unsupported = [_ANSI.sub("", str(e)) for _, e in failures
                   if not isinstance(e, VerificationError) and _UNSUPPORTED.search(str(e))]
    culprit = _culprit(" ".join(unsupported), graph, example) if unsupported else ""
    if verification and not culprit:
        err: ExportError = VerificationError(
            f"the exported graph does not match PyTorch, so no file was written. {accounts}")
    else:
        hint = f" {culprit}." if culprit else ""
        err = ExportError(f"could not export the model to ONNX; no file was written.{hint} "
                          f"{accounts}")
    err.__cause__ = failures[-1][1]
    return err


def _culprit(message: str, graph: Any, example: Tuple[Any, ...]) -> str:
    """'operator X (called by module Y)' for the operator an exporter's message names."""
    seen = _ops_by_module(graph, example)
    found = []
    for op, modules in seen.items():
        ns, _, name = op.partition("::")
        if re.search(rf"(?<![\w.]){re.escape(ns)}(?:::|\.){re.escape(name)}(?![\w])", message):
            found.append((op, modules))
    if not found:
        return ""
    parts = []
    for op, modules in found[:3]:
        where = ", ".join(f"{_strip_net(m)} ({cls})" for m, cls in list(modules.items())[:3])
        parts.append(f"The exporter cannot handle the operator '{op}', called by module {where}")
    return "; ".join(parts)


def _strip_net(name: str) -> str:
    """Names relative to ``model.net``, as the user sees them."""
    name = name[len("net."):] if name.startswith("net.") else ("" if name == "net" else name)
    return repr(f"net.{name}" if name else "net")


def _ops_by_module(graph: Any, example: Tuple[Any, ...]) -> Dict[str, Dict[str, str]]:
    """Operators the forward pass dispatches, each with the innermost modules calling it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: List[Tuple[str, str]] = []
    seen: Dict[str, Dict[str, str]] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                               ) -> Any:
            name, cls = stack[-1] if stack else ("", type(graph).__name__)
            seen.setdefault(func._schema.name, {}).setdefault(name, cls)
            return func(*args, **(kwargs or {}))

    handles = []
    for name, module in graph.named_modules():
        def pre(_m: Any, _a: Any, name: str = name, cls: str = type(module).__name__) -> None:
            stack.append((name, cls))

        def post(_m: Any, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), Recorder():
            graph(*example)
    except Exception as e:  # the report is best effort; the exporters' messages still stand
        logger.debug("could not trace operators to modules: %s", e)
    finally:
        for h in handles:
            h.remove()
    return seen


# ====================================================================== inference
