"""HeadClassifier as a scikit-learn estimator: sklearn's own checks plus pyft-specific behaviour."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from pyft import HeadClassifier

# --------------------------------------------------------------------------------------------
# scikit-learn's estimator checks

ESTIMATORS = [
    HeadClassifier(random_state=0),  # linear head, L-BFGS
    HeadClassifier(head="mlp", hidden_size=32, epochs=60, lr=1e-2, random_state=0),  # AdamW
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------------------------
# helpers


def _blobs(n=120, d=6, c=3, seed=0, dtype=np.float32, sep=3.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=sep, size=(c, d))
    y = np.arange(n) % c
    X = centers[y] + rng.normal(size=(n, d))
    return X.astype(dtype), y


CONFIGS = {
    "lbfgs": dict(random_state=0),
    "adamw": dict(solver="adamw", epochs=20, lr=1e-2, batch_size=32, random_state=0),
    "sgd": dict(solver="sgd", epochs=10, lr=0.05, batch_size=32, random_state=0),
    "mlp": dict(head="mlp", hidden_size=16, epochs=20, lr=1e-2, batch_size=32, random_state=0),
}


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]


# --------------------------------------------------------------------------------------------
# labels, fitted attributes, outputs


@pytest.mark.parametrize(
    "labels",
    [
        np.array(["cat", "dog", "eel"]),
        np.array([-7, -1, 3]),
        np.array([-1.0, 0.0, 2.0]),
        np.array([10, 20, 30], dtype=np.uint8),
        np.array(["b", "a", "c"], dtype=object),
    ],
    ids=["str", "neg-int", "float", "uint8", "object"],
)
def test_arbitrary_label_values(labels, config):
    X, y = _blobs()
    yl = labels[y]
    clf = HeadClassifier(**config).fit(X, yl)
    np.testing.assert_array_equal(clf.classes_, np.unique(labels))
    pred = clf.predict(X)
    assert pred.dtype == clf.classes_.dtype
    assert set(pred.tolist()) <= set(labels.tolist())
    assert clf.score(X, yl) > 0.9
    # the same fit on integer codes gives the same predictions, relabelled
    ref = HeadClassifier(**config).fit(X, np.searchsorted(np.unique(labels), yl))
    np.testing.assert_array_equal(pred, clf.classes_[ref.predict(X)])


def test_continuous_float_labels_rejected():
    X, y = _blobs()
    with pytest.raises(ValueError, match="Unknown label type"):
        HeadClassifier(random_state=0).fit(X, y + 0.5 * np.arange(len(y)) / len(y))


def test_binary_string_labels_and_decision_function(config):
    X, y = _blobs(c=2)
    yl = np.array(["no", "yes"])[y]
    clf = HeadClassifier(**config).fit(X, yl)
    d = clf.decision_function(X)
    assert d.shape == (X.shape[0],)
    # positive margin means classes_[1]
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[(d > 0).astype(int)])
    p = clf.predict_proba(X)
    assert p.shape == (X.shape[0], 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_multiclass_outputs(config):
    X, y = _blobs(c=4)
    clf = HeadClassifier(**config).fit(X, y)
    n = X.shape[0]
    d = clf.decision_function(X)
    assert d.shape == (n, 4)
    p = clf.predict_proba(X)
    assert p.shape == (n, 4)
    assert np.all(p >= 0) and np.all(p <= 1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    lp = clf.predict_log_proba(X)
    np.testing.assert_allclose(np.exp(lp), p, atol=1e-5)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[np.argmax(p, axis=1)])
    np.testing.assert_array_equal(np.argmax(d, axis=1), np.argmax(p, axis=1))
    s = clf.score(X, y)
    assert s == pytest.approx(np.mean(clf.predict(X) == y))
    assert s > 0.8


@pytest.mark.parametrize("c", [2, 3, 5])
def test_linear_coef_intercept_shapes(c):
    X, y = _blobs(d=7, c=c)
    for cfg in (CONFIGS["lbfgs"], CONFIGS["adamw"]):
        clf = HeadClassifier(**cfg).fit(X, y)
        assert clf.coef_.shape == (c, 7)
        assert clf.intercept_.shape == (c,)
        assert clf.params_.dtype == np.float32
        assert clf.params_.shape == (c * 7 + c,)
        assert clf.n_features_in_ == 7
        # coef_/intercept_ reproduce the logits
        logits = X @ clf.coef_.T + clf.intercept_
        z = clf._native_predict(X, "logits")
        np.testing.assert_allclose(z, logits, rtol=1e-4, atol=1e-4)


def test_mlp_has_no_coef():
    X, y = _blobs()
    clf = HeadClassifier(**CONFIGS["mlp"]).fit(X, y)
    assert not hasattr(clf, "coef_")
    d, h, c = 6, 16, 3
    assert clf.params_.shape == (h * d + h + c * h + c,)
    assert clf.solver_ == "adamw"


def test_solver_auto():
    X, y = _blobs()
    assert HeadClassifier(random_state=0).fit(X, y).solver_ == "lbfgs"
    assert HeadClassifier(head="mlp", hidden_size=4, epochs=2, random_state=0).fit(
        X, y
    ).solver_ == "adamw"


def test_n_iter_and_history_lbfgs():
    X, y = _blobs()
    clf = HeadClassifier(random_state=0).fit(X, y)
    assert clf.n_iter_ >= 1
    assert len(clf.history_) >= 1
    assert {"iteration", "objective", "grad_max"} <= set(clf.history_[0])
    assert clf.converged_
    assert np.isfinite(clf.objective_)


@pytest.mark.parametrize("name", ["adamw", "sgd", "mlp"])
def test_n_iter_and_history_minibatch(name):
    X, y = _blobs()
    cfg = CONFIGS[name]
    clf = HeadClassifier(**cfg).fit(X, y)
    assert clf.n_iter_ == cfg["epochs"]
    assert len(clf.history_) == cfg["epochs"]
    keys = {"epoch", "train_loss", "train_accuracy", "lr", "seconds"}
    for i, h in enumerate(clf.history_):
        assert keys <= set(h)
        assert h["epoch"] == i
        assert np.isfinite(h["train_loss"])
        assert "val_loss" not in h
    assert clf.history_[-1]["train_loss"] < clf.history_[0]["train_loss"]
    assert clf.stopped_early_ is False


def test_callback_called_per_epoch():
    X, y = _blobs()
    seen = []
    clf = HeadClassifier(**CONFIGS["adamw"], callback=seen.append).fit(X, y)
    assert len(seen) == clf.n_iter_ == CONFIGS["adamw"]["epochs"]
    assert [s["epoch"] for s in seen] == list(range(len(seen)))
    assert seen == clf.history_


def test_callback_called_per_lbfgs_iteration():
    X, y = _blobs()
    seen = []
    clf = HeadClassifier(random_state=0, callback=seen.append).fit(X, y)
    assert len(seen) == len(clf.history_) >= 1
    assert "objective" in seen[0]


def test_callback_returning_false_stops():
    X, y = _blobs()
    seen = []

    def cb(info):
        seen.append(info)
        return info["epoch"] < 2

    clf = HeadClassifier(**CONFIGS["adamw"], callback=cb).fit(X, y)
    assert len(seen) == 3
    assert clf.n_iter_ == 3


def test_callback_exception_propagates():
    X, y = _blobs()

    class Boom(Exception):
        pass

    def cb(info):
        raise Boom("from callback")

    with pytest.raises(Boom, match="from callback"):
        HeadClassifier(**CONFIGS["adamw"], callback=cb).fit(X, y)
    with pytest.raises(Boom, match="from callback"):
        HeadClassifier(random_state=0, callback=cb).fit(X, y)


def test_callback_not_callable():
    X, y = _blobs()
    with pytest.raises(TypeError, match="callback"):
        HeadClassifier(callback=3).fit(X, y)


@pytest.mark.parametrize("name", ["lbfgs", "adamw"])
def test_verbose_progress_bar(name, capsys):
    X, y = _blobs()
    clf = HeadClassifier(**CONFIGS[name], verbose=True).fit(X, y)
    assert clf.score(X, y) > 0.9
    err = capsys.readouterr().err
    assert "pyft" in err


# --------------------------------------------------------------------------------------------
# params API


def test_get_set_params_clone():
    clf = HeadClassifier(head="mlp", hidden_size=8, lr=0.01, class_weight={0: 1.0, 1: 2.0})
    params = clf.get_params()
    assert params["head"] == "mlp"
    assert params["hidden_size"] == 8
    assert params["class_weight"] == {0: 1.0, 1: 2.0}
    c2 = clone(clf)
    assert c2 is not clf
    assert c2.get_params() == params
    c2.set_params(hidden_size=12, solver="sgd")
    assert c2.hidden_size == 12 and c2.solver == "sgd"
    assert clf.hidden_size == 8
    assert HeadClassifier(**params).get_params() == params
    with pytest.raises(ValueError):
        clf.set_params(not_a_param=1)


def test_clone_of_fitted_is_unfitted():
    X, y = _blobs()
    clf = HeadClassifier(random_state=0).fit(X, y)
    c2 = clone(clf)
    assert not hasattr(c2, "params_")
    assert not hasattr(c2, "classes_")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pickle_roundtrip(name):
    X, y = _blobs()
    yl = np.array(["a", "b", "c"])[y]
    clf = HeadClassifier(**CONFIGS[name]).fit(X, yl)
    clf2 = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(clf2.predict(X), clf.predict(X))
    np.testing.assert_array_equal(clf2.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(clf2.params_, clf.params_)
    assert clf2.get_params() == clf.get_params()


def test_predict_with_readonly_params():
    """A model loaded from a read-only memmap (joblib mmap_mode='r') must still predict."""
    X, y = _blobs()
    clf = HeadClassifier(random_state=0).fit(X, y)
    expected = clf.predict_proba(X)
    clf.params_ = clf.params_.copy()
    clf.params_.flags.writeable = False
    np.testing.assert_array_equal(clf.predict_proba(X), expected)


def test_determinism_fixed_seed(config):
    X, y = _blobs()
    a = HeadClassifier(**config, n_threads=1).fit(X, y)
    b = HeadClassifier(**config, n_threads=1).fit(X, y)
    np.testing.assert_array_equal(a.params_, b.params_)


def test_refit_resets_state():
    X, y = _blobs(d=6, c=3)
    clf = HeadClassifier(random_state=0).fit(X, y)
    X2, y2 = _blobs(d=4, c=2, seed=1)
    clf.fit(X2, y2)
    assert clf.n_features_in_ == 4
    assert clf.coef_.shape == (2, 4)
    with pytest.raises(ValueError, match="features"):
        clf.predict(X)


# --------------------------------------------------------------------------------------------
# validation data, early stopping, class weights


def test_early_stopping_stops():
    # noisy, overlapping classes + high lr: validation loss stops improving quickly
    X, y = _blobs(n=400, d=10, c=3, sep=0.3)
    clf = HeadClassifier(
        solver="adamw", lr=0.5, epochs=300, batch_size=16, schedule="constant",
        early_stopping=True, patience=3, random_state=0,
    ).fit(X, y)
    assert clf.stopped_early_ is True
    assert clf.n_iter_ < 300
    assert 0 <= clf.best_epoch_ < clf.n_iter_
    assert clf.n_iter_ == clf.best_epoch_ + 1 + 3
    assert all("val_loss" in h for h in clf.history_)
    best = min(h["val_loss"] for h in clf.history_)
    assert clf.history_[clf.best_epoch_]["val_loss"] == pytest.approx(best)


def test_early_stopping_mlp_runs():
    X, y = _blobs(n=200)
    clf = HeadClassifier(
        head="mlp", hidden_size=16, lr=1e-2, epochs=15, early_stopping=True,
        validation_fraction=0.2, patience=2, random_state=0,
    ).fit(X, y)
    assert isinstance(clf.stopped_early_, bool)
    assert 0 <= clf.best_epoch_ < clf.n_iter_ <= 15
    assert clf.score(X, y) > 0.8


def test_early_stopping_with_lbfgs_warns():
    X, y = _blobs()
    with pytest.warns(UserWarning, match="ignored"):
        HeadClassifier(early_stopping=True, random_state=0).fit(X, y)


def test_explicit_validation_set():
    X, y = _blobs(n=150, c=3)
    yl = np.array(["x", "y", "z"])[y]
    Xv, yv = X[100:], yl[100:]
    clf = HeadClassifier(**CONFIGS["adamw"]).fit(X[:100], yl[:100], X_val=Xv, y_val=yv)
    assert len(clf.history_) == clf.n_iter_
    for h in clf.history_:
        assert np.isfinite(h["val_loss"])
        assert 0.0 <= h["val_accuracy"] <= 1.0
    # val accuracy of the last epoch equals the model's score on the val split
    assert clf.history_[-1]["val_accuracy"] == pytest.approx(clf.score(Xv, yv), abs=1e-6)


def test_explicit_validation_set_with_early_stopping():
    X, y = _blobs(n=300, sep=0.3)
    clf = HeadClassifier(
        solver="adamw", lr=0.5, epochs=200, batch_size=16, schedule="constant",
        early_stopping=True, patience=2, random_state=0,
    ).fit(X[:200], y[:200], X_val=X[200:], y_val=y[200:])
    assert clf.stopped_early_ is True
    assert clf.n_iter_ < 200


def test_validation_set_errors():
    X, y = _blobs()
    clf = HeadClassifier(**CONFIGS["adamw"])
    with pytest.raises(ValueError, match="together"):
        clf.fit(X, y, X_val=X)
    with pytest.raises(ValueError, match="y_val"):
        clf.fit(X, y, X_val=X[:5], y_val=np.array([0, 1, 2, 7, 0]))
    with pytest.raises(ValueError, match="features"):
        clf.fit(X, y, X_val=X[:, :3], y_val=y)
    with pytest.raises(ValueError, match="y_val"):
        clf.fit(X, y, X_val=X[:5], y_val=y[:4])


@pytest.mark.parametrize("name", ["lbfgs", "adamw", "mlp"])
def test_class_weight_balanced_and_dict(name):
    # imbalanced: 90 of class 0, 10 of class 1, overlapping
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(90, int), np.ones(10, int)]
    X = (rng.normal(size=(100, 4)) + 0.8 * y[:, None]).astype(np.float32)
    base = HeadClassifier(**CONFIGS[name]).fit(X, y)
    bal = HeadClassifier(**CONFIGS[name], class_weight="balanced").fit(X, y)
    heavy = HeadClassifier(**CONFIGS[name], class_weight={0: 1.0, 1: 9.0}).fit(X, y)
    n_base = np.sum(base.predict(X) == 1)
    assert np.sum(bal.predict(X) == 1) > n_base
    assert np.sum(heavy.predict(X) == 1) > n_base
    # uniform dict weights change nothing
    same = HeadClassifier(**CONFIGS[name], class_weight={0: 1.0, 1: 1.0}).fit(X, y)
    np.testing.assert_allclose(same.params_, base.params_, rtol=1e-4, atol=1e-5)


def test_class_weight_dict_string_labels():
    X, y = _blobs(c=2)
    yl = np.array(["neg", "pos"])[y]
    clf = HeadClassifier(random_state=0, class_weight={"neg": 1.0, "pos": 3.0}).fit(X, yl)
    assert clf.score(X, yl) > 0.9


def test_class_weight_invalid():
    X, y = _blobs()
    with pytest.raises(ValueError, match="class_weight"):
        HeadClassifier(class_weight="heavy").fit(X, y)
    with pytest.raises(TypeError, match="class_weight"):
        HeadClassifier(class_weight=[1.0, 2.0, 3.0]).fit(X, y)


# --------------------------------------------------------------------------------------------
# input containers: torch tensors, memmaps, strided views


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["lbfgs", "adamw", "mlp"])
@pytest.mark.parametrize("tdtype", ["float32", "float16"])
def test_torch_tensor_matches_numpy(name, tdtype):
    X, y = _blobs(dtype=getattr(np, tdtype))
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    a = HeadClassifier(**CONFIGS[name]).fit(X, y)
    b = HeadClassifier(**CONFIGS[name]).fit(Xt, yt)
    np.testing.assert_array_equal(a.params_, b.params_)
    np.testing.assert_array_equal(a.predict(X), b.predict(Xt))
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(Xt))
    np.testing.assert_array_equal(a.predict(Xt), a.predict(X))


@pytest.mark.parametrize("name", ["lbfgs", "adamw", "mlp"])
def test_torch_bfloat16_matches_float32_of_same_values(name):
    X, y = _blobs()
    Xb = torch.from_numpy(X).to(torch.bfloat16)
    Xf = Xb.float()  # exactly the bf16 values, as float32
    a = HeadClassifier(**CONFIGS[name]).fit(Xb, y)
    b = HeadClassifier(**CONFIGS[name]).fit(Xf.numpy(), y)
    np.testing.assert_allclose(a.params_, b.params_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.predict(Xb), b.predict(Xf.numpy()))
    np.testing.assert_allclose(a.predict_proba(Xb), b.predict_proba(Xf), rtol=1e-5, atol=1e-6)
    # a model fitted on float32 predicts bf16 input like its float32 copy
    np.testing.assert_allclose(b.predict_proba(Xb), b.predict_proba(Xf.numpy()), atol=1e-6)


def test_torch_bfloat16_strided_and_validation():
    X, y = _blobs(n=200)
    Xb = torch.from_numpy(X).to(torch.bfloat16)
    Xs = Xb[::2, 1:5]  # non-contiguous view
    ys = y[::2]
    a = HeadClassifier(**CONFIGS["adamw"]).fit(Xs, ys, X_val=Xb[1::2, 1:5], y_val=y[1::2])
    b = HeadClassifier(**CONFIGS["adamw"]).fit(
        Xs.float().contiguous().numpy(), ys, X_val=Xb[1::2, 1:5].float().numpy(), y_val=y[1::2]
    )
    np.testing.assert_allclose(a.params_, b.params_, rtol=1e-5, atol=1e-6)
    # mixing bf16 and non-bf16 between train and val is rejected
    with pytest.raises(ValueError, match="X_val"):
        HeadClassifier(**CONFIGS["adamw"]).fit(Xs, ys, X_val=X[1::2, 1:5], y_val=y[1::2])


def test_torch_tensor_requires_grad_and_int_labels():
    X, y = _blobs()
    Xt = torch.from_numpy(X).requires_grad_(True)
    clf = HeadClassifier(random_state=0).fit(Xt, torch.from_numpy(y))
    assert clf.score(Xt, y) > 0.9


def test_torch_feature_count_checked():
    X, y = _blobs()
    clf = HeadClassifier(random_state=0).fit(torch.from_numpy(X), y)
    with pytest.raises(ValueError, match="features"):
        clf.predict(torch.from_numpy(X[:, :3]))
    with pytest.raises(ValueError, match="features"):
        clf.predict(X[:, :3])


@pytest.mark.parametrize("name", ["lbfgs", "adamw"])
def test_memmap_float16(tmp_path, name):
    X, y = _blobs(dtype=np.float16)
    path = tmp_path / "feats.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=X.shape)
    a = HeadClassifier(**CONFIGS[name]).fit(ro, y)
    b = HeadClassifier(**CONFIGS[name]).fit(np.array(X), y)
    np.testing.assert_array_equal(a.params_, b.params_)
    np.testing.assert_array_equal(a.predict(ro), b.predict(X))
    assert a.score(ro, y) > 0.9
    # memmapped slices: strided rows, a column subset
    c = HeadClassifier(**CONFIGS[name]).fit(ro[::2, :4], y[::2])
    d = HeadClassifier(**CONFIGS[name]).fit(np.ascontiguousarray(X[::2, :4]), y[::2])
    np.testing.assert_array_equal(c.params_, d.params_)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_agree(dtype):
    X, y = _blobs(dtype=np.float16)  # values exactly representable in every dtype
    a = HeadClassifier(**CONFIGS["adamw"]).fit(X.astype(dtype), y)
    b = HeadClassifier(**CONFIGS["adamw"]).fit(X.astype(np.float32), y)
    np.testing.assert_allclose(a.params_, b.params_, rtol=1e-5, atol=1e-6)


def test_int_and_list_input():
    X, y = _blobs()
    Xi = np.round(X).astype(np.int32)
    clf = HeadClassifier(random_state=0).fit(Xi, y)
    ref = HeadClassifier(random_state=0).fit(Xi.astype(np.float32), y)
    np.testing.assert_allclose(clf.params_, ref.params_)
    clf2 = HeadClassifier(random_state=0).fit(X.tolist(), y.tolist())
    assert clf2.score(X, y) > 0.9


# --------------------------------------------------------------------------------------------
# C means what it means in LogisticRegression


def _sklearn_objective(W, b, X, y, C, class_weight=None):
    """C sum_i w_i CE_i + ||W||^2 / 2 in float64: LogisticRegression's objective (multinomial
    with W of shape (k, d); binary with one row)."""
    X = np.asarray(X, np.float64)
    W = np.atleast_2d(np.asarray(W, np.float64))
    z = X @ W.T + np.asarray(b, np.float64)
    if W.shape[0] == 1:  # binary: the logit of class 1 against a zero logit for class 0
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    w = np.ones(len(y)) if class_weight is None else np.asarray(class_weight, np.float64)[y]
    return C * float((w * ce).sum()) + 0.5 * float((W * W).sum())


@pytest.fixture(scope="module")
def digit_pixels():
    from pyft import datasets

    return datasets.load_digits()  # 1797 real 8x8 digits, float32 in [0, 1]


def _logistic_regression(X, y, C, class_weight=None):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # its OpenMP loss spins badly on a shared machine
        return LogisticRegression(C=C, tol=1e-10, max_iter=20000,
                                  class_weight=class_weight).fit(X.astype(np.float64), y)


@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_C_is_logistic_regression_C_multinomial(digit_pixels, C):
    X, y = digit_pixels
    sk = _logistic_regression(X, y, C)
    hc = HeadClassifier(C=C, tol=1e-7, max_iter=5000, random_state=0).fit(X, y)
    f_sk = _sklearn_objective(sk.coef_, sk.intercept_, X, y, C)
    f_hc = _sklearn_objective(hc.coef_, hc.intercept_, X, y, C)
    assert f_hc == pytest.approx(f_sk, rel=1e-6)
    scale = np.abs(sk.coef_).max()
    np.testing.assert_allclose(hc.coef_, sk.coef_, rtol=0, atol=5e-4 * scale)
    # intercepts are unpenalised, so only their differences are determined (sklearn centres
    # them); they sit in the flattest directions of the objective (digits has near-constant
    # border pixels), so float32 features determine them to about 1e-2
    np.testing.assert_allclose(hc.intercept_ - hc.intercept_.mean(), sk.intercept_, atol=1e-2)
    np.testing.assert_allclose(hc.predict_proba(X), sk.predict_proba(X.astype(np.float64)),
                               atol=5e-4)
    # objective_ is the same function divided by C n
    assert hc.objective_ == pytest.approx(f_hc / (C * len(y)), rel=1e-5)


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_C_is_logistic_regression_C_binary(digit_pixels, C):
    X, y = digit_pixels
    keep = (y == 3) | (y == 8)
    X, y = X[keep], (y[keep] == 8).astype(np.int64)
    sk = _logistic_regression(X, y, C)
    hc = HeadClassifier(C=C, tol=1e-7, max_iter=5000, random_state=0).fit(X, y)
    w = hc.coef_[1] - hc.coef_[0]  # sklearn's one vector for two classes
    b = hc.intercept_[1] - hc.intercept_[0]
    f_sk = _sklearn_objective(sk.coef_, sk.intercept_, X, y, C)
    assert _sklearn_objective(w[None], [b], X, y, C) == pytest.approx(f_sk, rel=1e-6)
    np.testing.assert_allclose(w, sk.coef_[0], rtol=0, atol=5e-4 * np.abs(sk.coef_).max())
    assert b == pytest.approx(sk.intercept_[0], abs=5e-3)
    np.testing.assert_allclose(hc.decision_function(X), sk.decision_function(X), atol=5e-3)


def test_C_is_logistic_regression_C_with_class_weight(digit_pixels):
    X, y = digit_pixels
    weights = {c: 0.5 + 0.25 * c for c in range(10)}
    sk = _logistic_regression(X, y, 0.5, class_weight=weights)
    hc = HeadClassifier(C=0.5, class_weight=weights, tol=1e-7, max_iter=5000,
                        random_state=0).fit(X, y)
    cw = [weights[c] for c in range(10)]
    f_sk = _sklearn_objective(sk.coef_, sk.intercept_, X, y, 0.5, cw)
    assert _sklearn_objective(hc.coef_, hc.intercept_, X, y, 0.5, cw) == pytest.approx(f_sk,
                                                                                       rel=1e-6)
    np.testing.assert_allclose(hc.coef_, sk.coef_, rtol=0, atol=5e-4 * np.abs(sk.coef_).max())
