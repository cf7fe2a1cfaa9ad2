"""FineTuner end to end on real digits and the bundled EfficientNet-Lite0; data loading."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

import pyft  # noqa: E402
from pyft.data import ImageFiles, load_data  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.target))
    return (d.images[idx] * (255 / 16)).astype(np.uint8), d.target[idx]


def _tuner(tmp_path, strategy, **kw):
    opts = dict(image_size=32, epochs=2, cache_dir=str(tmp_path / "cache"), progress=False)
    opts.update(kw)
    return pyft.FineTuner("efficientnet_lite0", strategy=strategy, **opts)


def test_head_only_through_the_cache(tmp_path, digits):
    X, y = digits
    ft = _tuner(tmp_path, "head_only").fit(X[:500], labels=y[:500])
    assert ft.strategy_ == "head_only" and ft.classes_ == [str(i) for i in range(10)]
    assert ft.val_metrics_["accuracy"] > 0.7
    ev = ft.evaluate(X[500:800], y[500:800])
    assert ev["accuracy"] > 0.7 and np.asarray(ev["confusion_matrix"]).sum() == 300
    # The head's weights are in the torch model: predictions come from model.run.
    m = ft.model_
    with torch.inference_mode():
        logits = m.run(m.preprocess(X[500:510]))
    np.testing.assert_array_equal(ft.predict(X[500:510]), logits.argmax(1).numpy().astype(str))
    # A second fit reuses the cached features.
    ft2 = _tuner(tmp_path, "head_only").fit(X[:500], labels=y[:500])
    assert ft2.history_[0]["cache_reused"]


def test_freeze_first_and_full_train_and_restore_best(tmp_path, digits):
    X, y = digits
    ft = _tuner(tmp_path, "freeze_first", k="blocks.13", epochs=3, lr=3e-3).fit(
        X[:400], labels=y[:400])
    assert ft.strategy_ == "freeze_first" and ft.k_ == ft.model_.block_index("blocks.13")
    assert len(ft.history_) >= 1 and all("val_loss" in h for h in ft.history_)
    best = min(h["val_loss"] for h in ft.history_)
    assert ft.val_metrics_["loss"] == pytest.approx(best, rel=1e-3, abs=1e-4)
    full = _tuner(tmp_path, "full", epochs=1).fit(X[:200], labels=y[:200])
    assert full.strategy_ == "full" and len(full.history_) == 1


def test_save_and_load_roundtrip(tmp_path, digits):
    X, y = digits
    ft = _tuner(tmp_path, "head_only").fit(X[:300], labels=y[:300])
    path = ft.save(tmp_path / "model")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    back = pyft.FineTuner.load(path)
    np.testing.assert_array_equal(back.predict_proba(X[300:340]), ft.predict_proba(X[300:340]))
    assert back.classes_ == ft.classes_ and back.strategy_ == "head_only"
    # damaged / foreign files
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    cfg["format"] = 999
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format"):
        pyft.FineTuner.load(path)
    (tmp_path / "model" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="damaged"):
        pyft.FineTuner.load(path)
    cfg["format"] = 1
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    with open(tmp_path / "model" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="damaged"):
        pyft.FineTuner.load(path)
    with pytest.raises(FileNotFoundError):
        pyft.FineTuner.load(tmp_path / "nothing")


def test_image_folder_and_csv(tmp_path, digits):
    from PIL import Image

    X, y = digits
    root = tmp_path / "imgs"
    rows = ["path,label"]
    for i in range(60):
        c = f"class_{y[i] % 3}"
        (root / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i]).resize((24, 24)).save(root / c / f"{i}.png")
        rows.append(f"imgs/{c}/{i}.png,{c}")
    (root / "class_0" / "notes.txt").write_text("not an image")
    (root / "class_1" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="skipped"):
        d = load_data(str(root))
    assert isinstance(d.inputs, ImageFiles) and len(d) == 60 and d.skipped == 2
    assert d.classes == ["class_0", "class_1", "class_2"]
    assert d.inputs[0].shape == (24, 24, 3)
    with pytest.raises(ValueError, match="not an image file"):
        load_data(str(root), on_error="raise")
    (tmp_path / "data.csv").write_text("\n".join(rows))
    c = load_data(str(tmp_path / "data.csv"))
    assert len(c) == 60 and c.classes == d.classes
    (tmp_path / "bad.csv").write_text("path,target\nimgs/x.png,1\n")
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_data(str(tmp_path / "bad.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_data(str(empty))
    (empty / "a").mkdir()
    with pytest.raises(ValueError, match="no files"):
        load_data(str(empty))
    # training from the folder (the broken files skipped with a warning)
    with pytest.warns(UserWarning, match="skipped"):
        ft = _tuner(tmp_path, "head_only").fit(str(root))
    assert ft.classes_ == d.classes


def test_bad_input(tmp_path, digits):
    X, y = digits
    with pytest.raises(ValueError, match="strategy"):
        pyft.FineTuner(strategy="head_onyl")
    with pytest.raises(ValueError, match="epochs"):
        pyft.FineTuner(epochs=0)
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        _tuner(tmp_path, "head_only").fit(X[:21], labels=np.r_[np.zeros(20, int), 1])
    with pytest.raises(ValueError, match="not among the training classes"):
        _tuner(tmp_path, "head_only").fit(X[:40], labels=y[:40] % 3, val=(X[40:60], y[40:60]))
    with pytest.raises(ValueError, match="num_classes"):
        pyft.FineTuner(num_classes=4, strategy="head_only", image_size=32,
                       progress=False).fit(X[:40], labels=y[:40] % 3)
    with pytest.raises(TypeError, match="text"):
        _tuner(tmp_path, "head_only").fit(["a text"] * 20, labels=np.arange(20) % 2)
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        pyft.FineTuner().predict(X[:2])


def _phases_add_up(fs):
    assert set(fs) == {"setup", "advise", "extract", "train", "evaluate", "total"}
    assert all(v >= 0 for v in fs.values())
    parts = sum(v for key, v in fs.items() if key != "total")
    assert parts <= fs["total"] + 1e-6
    assert parts == pytest.approx(fs["total"], rel=0.05, abs=0.05)


def test_fit_seconds_by_phase(tmp_path, digits):
    X, y = digits
    ft = _tuner(tmp_path, "head_only").fit(X[:300], labels=y[:300])
    fs = ft.fit_seconds_
    _phases_add_up(fs)
    assert fs["advise"] == 0.0 and fs["extract"] > 0 and fs["train"] > 0
    ft = _tuner(tmp_path, "freeze_first", k="blocks.13", epochs=1).fit(X[:200], labels=y[:200])
    _phases_add_up(ft.fit_seconds_)
    assert ft.fit_seconds_["extract"] > 0 and ft.fit_seconds_["train"] > 0
    assert ft.lr_ == 1e-3  # the default outside auto


def _small_cnn():
    from torch import nn

    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return wrap_model(net, 10, preprocessing=ImagePreprocessing((8, 8), (0.5,) * 3, (0.25,) * 3))


def test_auto_follows_the_advice_and_its_learning_rate(tmp_path, digits):
    X, y = digits
    ft = pyft.FineTuner(_small_cnn(), strategy="auto", epochs=2, cache_dir=str(tmp_path),
                        progress=False, advise_budget=20).fit(X[:400], labels=y[:400])
    adv = ft.advice_
    assert adv is not None and adv.lr is not None
    assert ft.strategy_ == adv.strategy and ft.k_ == adv.k
    assert ft.lr_ == adv.lr  # the rate the trials found best
    fs = ft.fit_seconds_
    _phases_add_up(fs)
    assert fs["advise"] > 0 and fs["advise"] == pytest.approx(adv.seconds, rel=0.2, abs=0.5)
    # auto's run is the run of its choice: the same strategy, k and rate given explicitly train
    # the same model.
    same = pyft.FineTuner(_small_cnn(), strategy=ft.strategy_, k=ft.k_, lr=ft.lr_, epochs=2,
                          cache_dir=str(tmp_path), progress=False).fit(X[:400], labels=y[:400])
    assert [h.get("val_loss") for h in same.history_] == [h.get("val_loss") for h in ft.history_]
    for p, q in zip(same.model_.net.parameters(), ft.model_.net.parameters()):
        assert torch.equal(p, q)
    # An explicit rate wins over the advice's.
    ft2 = pyft.FineTuner(_small_cnn(), strategy="auto", epochs=1, lr=0.05, cache_dir=str(tmp_path),
                         progress=False, advise_budget=20).fit(X[:400], labels=y[:400])
    assert ft2.lr_ == 0.05 and ft2.advice_ is not None


@pytest.mark.parametrize("strategy", ["freeze_first", "full"])
def test_channels_last_trains_the_same_model(tmp_path, digits, strategy):
    """channels_last changes the memory format, not the run: the same epochs give the same losses
    (up to float rounding of the reordered convolutions, which later steps amplify: one epoch),
    and the fitted model comes back in the default format."""
    X, y = digits
    fits = {cl: _tuner(tmp_path, strategy, k="blocks.13", epochs=1, lr=3e-3, patience=0,
                       channels_last=cl).fit(X[:200], labels=y[:200]) for cl in (False, True)}
    a, b = fits[False].history_, fits[True].history_
    assert len(a) == len(b) == 1
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=2e-3, abs=1e-4)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=2e-3, abs=1e-4)
    for p in fits[True].model_.net.parameters():
        assert p.is_contiguous()
    pa = fits[False].predict_proba(X[300:340])
    np.testing.assert_allclose(fits[True].predict_proba(X[300:340]), pa, atol=2e-3)
    with pytest.raises(TypeError, match="channels_last must be True or False; got 'yes'"):
        pyft.FineTuner(channels_last="yes")


def test_seed_fixes_the_run(tmp_path, digits):
    """The same settings give the same model (dropout included), whatever the global random
    state; the caller's random state is not consumed."""
    X, y = digits
    runs = []
    for junk in (1, 2):
        torch.manual_seed(junk)
        before = torch.random.get_rng_state()
        ft = _tuner(tmp_path, "full", epochs=1, lr=3e-3, seed=5).fit(X[:150], labels=y[:150])
        assert torch.equal(torch.random.get_rng_state(), before)
        runs.append(ft)
    assert runs[0].history_[0]["train_loss"] == runs[1].history_[0]["train_loss"]
    for p, q in zip(runs[0].model_.net.parameters(), runs[1].model_.net.parameters()):
        assert torch.equal(p, q)
