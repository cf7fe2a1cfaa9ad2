"""Correctness of the native head trainer against plain PyTorch / scikit-learn / NumPy references.

The references live in tests/reference.py (no pyft imports). Trajectory tests feed PyTorch the
same initial parameters and the same mini-batch order (``_core.epoch_permutation``) and compare
final parameters and per-epoch train losses.

Tolerances: float32 training is compared with ``rtol=1e-5`` plus ``atol=1e-6``. Parameters are
O(0.1-1) here, so 1e-6 absolute is ~1e-5 relative to the parameter scale; it only matters for
entries that happen to sit near zero, which have no meaningful relative precision after 100+
float32 steps whose summation order differs between OpenBLAS and PyTorch.
"""

from __future__ import annotations

import numpy as np
import pyft_tests_reference as ref  # registered by tests/conftest.py
import pytest
import torch

import pyft
from pyft import _core

RTOL, ATOL = 1e-5, 1e-6


make_data = ref.make_data


def cross_entropy(params, X, y, head, C, H=0, activation="relu", class_weights=None,
                  label_smoothing=0.0):
    z = ref.np_logits(params, X, head, C, H, activation)
    return ref.np_cross_entropy(z, y, class_weights, label_smoothing)


# ------------------------------------------------------------------------------------------------
# 1. SGD / AdamW trajectories vs a plain PyTorch loop

N_TRAIN, D_TRAIN, H_TRAIN = 203, 24, 16  # 203 = 6 * 32 + 11: the last batch is partial
CW5 = np.array([0.5, 1.0, 2.0, 1.5, 0.75], dtype=np.float32)

SGD = dict(optimizer="sgd", lr=0.05, momentum=0.9)
ADAMW = dict(optimizer="adamw", lr=1e-2)
# betas that are exact in float32 (isolate optimizer arithmetic from beta rounding)
EXACT_BETAS = dict(beta1=0.875, beta2=1.0 - 2.0**-10)

# id: (head, C, activation, kwargs); each runs >= 100 optimizer steps (16 epochs of 7 at B=32)
TRAJECTORY_CASES = {
    "linear-sgd-momentum-wd": ("linear", 5, "relu", dict(SGD, weight_decay=1e-3)),
    "linear-sgd-nesterov-cosine-warmup": (
        "linear", 5, "relu",
        dict(SGD, nesterov=True, weight_decay=1e-3, schedule="cosine", warmup_steps=10,
             min_lr_ratio=0.05)),
    "linear-sgd-dampening-step": (
        "linear", 5, "relu",
        dict(SGD, dampening=0.3, schedule="step", step_size=4, gamma=0.5)),
    "linear-sgd-plain-smoothing-classweights": (
        "linear", 5, "relu",
        dict(optimizer="sgd", lr=0.2, label_smoothing=0.1, class_weights=CW5)),
    "linear-adamw-wd-cosine-warmup": (
        "linear", 5, "relu",
        dict(ADAMW, weight_decay=0.05, schedule="cosine", warmup_steps=15)),
    "linear-adamw-step-smoothing-classweights": (
        "linear", 5, "relu",
        dict(ADAMW, schedule="step", step_size=5, gamma=0.3, label_smoothing=0.1,
             class_weights=CW5)),
    "linear-adamw-exact-betas": (
        "linear", 5, "relu", dict(ADAMW, weight_decay=0.05, **EXACT_BETAS)),
    "mlp-relu-sgd-nesterov-wd": ("mlp", 5, "relu", dict(SGD, nesterov=True, weight_decay=1e-3)),
    "mlp-relu-adamw-smoothing-classweights": (
        "mlp", 5, "relu", dict(ADAMW, weight_decay=0.01, label_smoothing=0.1, class_weights=CW5)),
    "mlp-gelu-sgd-momentum-step": (
        "mlp", 5, "gelu", dict(SGD, weight_decay=1e-3, schedule="step", step_size=4, gamma=0.5)),
    "mlp-gelu-adamw-wd-cosine-warmup": (
        "mlp", 5, "gelu",
        dict(ADAMW, weight_decay=0.01, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)),
    "mlp-gelu-adamw-exact-betas": ("mlp", 5, "gelu", dict(ADAMW, weight_decay=0.01, **EXACT_BETAS)),
    "mlp-gelu-adamw-dropout": ("mlp", 5, "gelu", dict(ADAMW, dropout=0.25, **EXACT_BETAS)),
    "linear-blas-drop-last": ("linear", 5, "relu", dict(SGD, drop_last=True, weight_decay=1e-3)),
    "linear-no-shuffle": ("linear", 5, "relu", dict(SGD, shuffle=False)),
    "mlp-batch-larger-than-n": ("mlp", 5, "relu", dict(SGD, batch_size=1000)),
}
for _kernel in ("fused", "blas"):
    TRAJECTORY_CASES[f"binary-{_kernel}-sgd-nesterov-wd"] = (
        "linear", 2, "relu", dict(SGD, nesterov=True, weight_decay=1e-3, kernel=_kernel))
    TRAJECTORY_CASES[f"binary-{_kernel}-adamw-cosine-smoothing-cw"] = (
        "linear", 2, "relu",
        dict(ADAMW, weight_decay=0.05, schedule="cosine", warmup_steps=8, label_smoothing=0.05,
             class_weights=np.array([1.0, 3.0], np.float32), kernel=_kernel))
    TRAJECTORY_CASES[f"binary-{_kernel}-sgd-drop-last"] = (
        "linear", 2, "relu", dict(SGD, drop_last=True, kernel=_kernel))
    TRAJECTORY_CASES[f"c4-{_kernel}-adamw"] = ("linear", 4, "relu", dict(ADAMW, kernel=_kernel))


def _run_trajectory(head, C, activation, kw, n_threads, min_steps=100, batch_size=32, seed=7):
    X, y = make_data(N_TRAIN, D_TRAIN, C, seed=1)
    kw = dict(kw)
    kernel = kw.pop("kernel", "auto")
    kw.setdefault("batch_size", batch_size)
    spe = ref.steps_per_epoch(N_TRAIN, kw["batch_size"], kw.get("drop_last", False))
    epochs = -(-min_steps // spe)
    p0 = pyft.init_head_params(head, D_TRAIN, C, hidden_size=H_TRAIN, seed=3)
    p = p0.copy()
    common = dict(head=head, num_classes=C, hidden_size=H_TRAIN, activation=activation,
                  epochs=epochs, seed=seed, **kw)
    res = _core.train_head(p, X, y, n_threads=n_threads, kernel=kernel, **common)
    q, hist = ref.torch_train(p0, X, y, permutation=_core.epoch_permutation, **common)

    assert res["epochs_run"] == epochs and res["steps"] == spe * epochs
    assert not res["stopped_early"] and not res["stopped_by_callback"]
    want_kernel = "fused" if head == "linear" and (kernel == "fused" or
                                                     (kernel == "auto" and C <= 12)) else "blas"
    assert res["kernel"] == want_kernel
    np.testing.assert_allclose(p, q, rtol=RTOL, atol=ATOL, err_msg="final params")
    np.testing.assert_allclose([h["train_loss"] for h in res["history"]],
                               [h["train_loss"] for h in hist], rtol=RTOL,
                               err_msg="per-epoch mean train loss")
    np.testing.assert_allclose([h["lr"] for h in res["history"]], [h["lr"] for h in hist],
                               rtol=1e-12, err_msg="lr of each epoch's last step")
    # the data is learnable: the run made progress (guards against comparing two no-ops)
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]


@pytest.mark.parametrize("case", list(TRAJECTORY_CASES))
def test_trajectory_matches_torch(case):
    head, C, activation, kw = TRAJECTORY_CASES[case]
    _run_trajectory(head, C, activation, kw, n_threads=1)


@pytest.mark.parametrize("case", ["linear-adamw-wd-cosine-warmup", "mlp-gelu-sgd-momentum-step",
                                  "binary-fused-sgd-nesterov-wd"])
def test_trajectory_matches_torch_default_threads(case):
    head, C, activation, kw = TRAJECTORY_CASES[case]
    _run_trajectory(head, C, activation, kw, n_threads=0, batch_size=64, min_steps=130)


def test_lr_factor_matches_formula():
    for schedule in ("constant", "cosine", "step"):
        for warmup in (0, 1, 7):
            for total, spe in ((50, 7), (12, 12), (3, 1)):
                for t in range(total + 2):  # also past the end: cosine is clamped
                    kw = dict(warmup_steps=warmup, min_lr_ratio=0.1, step_size=2, gamma=0.3)
                    got = _core.lr_factor(schedule, t, total, spe, **kw)
                    want = ref.lr_factor(schedule, t, total, spe, **kw)
                    assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (schedule, warmup, t)
    # spot values of the documented formula
    assert _core.lr_factor("cosine", 0, 10, 5) == pytest.approx(1.0)
    assert _core.lr_factor("cosine", 5, 10, 5) == pytest.approx(0.5)
    assert _core.lr_factor("cosine", 2, 10, 5, warmup_steps=4) == pytest.approx(0.75)
    assert _core.lr_factor("step", 11, 100, 5, step_size=2, gamma=0.1) == pytest.approx(0.1)


def test_epoch_permutation_is_a_seeded_permutation():
    a = _core.epoch_permutation(101, 5, 0)
    assert a.dtype == np.int64 and np.array_equal(np.sort(a), np.arange(101))
    assert np.array_equal(a, _core.epoch_permutation(101, 5, 0))
    assert not np.array_equal(a, _core.epoch_permutation(101, 5, 1))
    assert not np.array_equal(a, _core.epoch_permutation(101, 6, 0))


def test_fused_and_blas_kernels_agree():
    X, y = make_data(N_TRAIN, D_TRAIN, 3, seed=2)
    out = {}
    for kernel in ("fused", "blas"):
        p = pyft.init_head_params("linear", D_TRAIN, 3, seed=0)
        res = _core.train_head(p, X, y, num_classes=3, optimizer="sgd", lr=0.1, momentum=0.9,
                               epochs=15, batch_size=32, n_threads=1, kernel=kernel)
        assert res["kernel"] == kernel
        out[kernel] = p
    np.testing.assert_allclose(out["fused"], out["blas"], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# 2. L-BFGS vs scikit-learn LogisticRegression


def _sklearn_vs_lbfgs(X, y, C, C_reg, class_weights=None):
    from sklearn.linear_model import LogisticRegression

    n, d = X.shape
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
    l2 = 1.0 / (C_reg * w[y].sum())
    sk = LogisticRegression(
        C=C_reg, tol=1e-10, max_iter=20000,
        class_weight=None if class_weights is None else dict(enumerate(w)),
    ).fit(X.astype(np.float64), y)
    p = np.zeros(C * d + C, np.float32)
    res = _core.train_head_lbfgs(
        p, X, y, num_classes=C, l2=l2, tol=1e-6, ftol=1e-12, max_iter=2000, n_threads=1,
        class_weights=None if class_weights is None else w.astype(np.float32))
    W, b = ref.unflatten(p, "linear", d, C)
    f_sk = ref.logreg_objective(sk.coef_, sk.intercept_, X, y, l2, class_weights)
    f_ft = ref.logreg_objective(W, b, X, y, l2, class_weights)
    assert f_ft == pytest.approx(f_sk, rel=1e-4), (res, f_ft, f_sk)
    # the reported objective is the same function at the returned (float32) params
    assert res["objective"] == pytest.approx(f_ft, rel=1e-5)
    # same model: probabilities agree closely
    proba = _core.predict(p, X, num_classes=C, output="proba")
    np.testing.assert_allclose(proba, sk.predict_proba(X.astype(np.float64)), atol=5e-3)
    return res


def test_lbfgs_matches_sklearn_synthetic_multiclass():
    X, y = make_data(400, 20, 4, seed=5, sep=0.7)
    _sklearn_vs_lbfgs(X, y, 4, C_reg=0.5)


def test_lbfgs_matches_sklearn_class_weight():
    X, y = make_data(400, 20, 4, seed=6, sep=0.7)
    _sklearn_vs_lbfgs(X, y, 4, C_reg=0.5, class_weights=[1.0, 2.0, 0.5, 3.0])


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def test_lbfgs_matches_sklearn_digits(digits):
    X, y = digits
    _sklearn_vs_lbfgs(X, y, 10, C_reg=1.0)


def test_lbfgs_matches_sklearn_digits_class_weight(digits):
    X, y = digits
    _sklearn_vs_lbfgs(X, y, 10, C_reg=1.0, class_weights=np.linspace(0.5, 2.0, 10))


# ------------------------------------------------------------------------------------------------
# 3. Feature dtypes and memory layouts


def _all_results(X, y, C, head, bfloat16=False, Xv=None, yv=None):
    """Everything the core computes from X: trained params + history, objective, predictions."""
    D = X.shape[1]
    out = {}
    p = pyft.init_head_params(head, D, C, hidden_size=8, seed=1)
    res = _core.train_head(p, X, y, head=head, num_classes=C, hidden_size=8, optimizer="sgd",
                           lr=0.1, momentum=0.9, epochs=3, batch_size=16, n_threads=1,
                           bfloat16=bfloat16, val_features=Xv, val_labels=yv, dropout=0.0)
    out["params"] = p
    out["history"] = np.array([[h["train_loss"], h["val_loss"]] for h in res["history"]])
    out["logits"] = _core.predict(p, X, head=head, num_classes=C, hidden_size=8,
                                  bfloat16=bfloat16, n_threads=1)
    if head == "linear":
        q = pyft.init_head_params(head, D, C, seed=2)
        f, g = _core.objective(q, X, y, num_classes=C, bfloat16=bfloat16, n_threads=1, l2=1e-3)
        out["objective"] = np.concatenate([[f], g])
        q = np.zeros_like(q)
        _core.train_head_lbfgs(q, X, y, num_classes=C, bfloat16=bfloat16, l2=1e-2, max_iter=20,
                               n_threads=1)
        out["lbfgs"] = q
    return out


def _layouts(X32):
    """Arrays equal to X32 element for element, with other memory layouts."""
    n, d = X32.shape
    wide = np.zeros((n, 2 * d), np.float32)
    wide[:, ::2] = X32
    return {
        "float64": X32.astype(np.float64),
        "fortran": np.asfortranarray(X32),
        "column-strided": wide[:, ::2],
        "row-strided": np.repeat(X32, 3, axis=0)[::3],
        "negative-row-stride": np.ascontiguousarray(X32[::-1])[::-1],
        "negative-col-stride": np.ascontiguousarray(X32[:, ::-1])[:, ::-1],
        "float64-fortran-strided": np.asfortranarray(np.repeat(X32, 2, axis=1)).astype(
            np.float64)[:, ::2],
    }


def _assert_same_results(a, b):
    # Conversion to float32 is exact and the arithmetic is the same: results are bitwise equal.
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


HEAD_C = [("linear", 5), ("linear", 2), ("mlp", 3)]


@pytest.mark.parametrize("head,C", HEAD_C)
def test_float16_equals_float32(head, C):
    X, y = make_data(90, 12, C, seed=8)
    X16 = X.astype(np.float16)
    Xv, yv = make_data(30, 12, C, seed=9)
    Xv16 = Xv.astype(np.float16)
    ref32 = _all_results(X16.astype(np.float32), y, C, head, Xv=Xv16.astype(np.float32), yv=yv)
    _assert_same_results(ref32, _all_results(X16, y, C, head, Xv=Xv16, yv=yv))


@pytest.mark.parametrize("head,C", HEAD_C)
def test_bfloat16_equals_float32(head, C):
    X, y = make_data(90, 12, C, seed=8)
    Xv, yv = make_data(30, 12, C, seed=9)
    t, tv = torch.from_numpy(X).to(torch.bfloat16), torch.from_numpy(Xv).to(torch.bfloat16)
    ref32 = _all_results(t.float().numpy(), y, C, head, Xv=tv.float().numpy(), yv=yv)
    bits, vbits = t.view(torch.int16).numpy(), tv.view(torch.int16).numpy()
    _assert_same_results(ref32, _all_results(bits, y, C, head, bfloat16=True, Xv=vbits, yv=yv))
    _assert_same_results(ref32, _all_results(bits.view(np.uint16), y, C, head, bfloat16=True,
                                             Xv=vbits.view(np.uint16), yv=yv))
    # non-contiguous bf16 bit patterns too
    _assert_same_results(ref32, _all_results(np.asfortranarray(bits), y, C, head, bfloat16=True,
                                             Xv=vbits[::-1][::-1], yv=yv))


@pytest.mark.parametrize("head,C", HEAD_C)
def test_layouts_equal_c_contiguous_float32(head, C):
    X, y = make_data(90, 12, C, seed=8)
    Xv, yv = make_data(30, 12, C, seed=9)
    base = _all_results(X, y, C, head, Xv=Xv, yv=yv)
    layouts, vlayouts = _layouts(X), _layouts(Xv)
    for name in layouts:
        assert np.array_equal(layouts[name], X)
        try:
            _assert_same_results(base, _all_results(layouts[name], y, C, head,
                                                    Xv=vlayouts[name], yv=yv))
        except AssertionError as e:
            raise AssertionError(f"layout {name}: {e}") from None


# ------------------------------------------------------------------------------------------------
# 4. Determinism


@pytest.mark.parametrize("head,C,kw", [
    ("linear", 5, dict(optimizer="sgd", momentum=0.9, lr=0.1)),
    ("linear", 2, dict(optimizer="adamw", lr=0.01)),
    ("mlp", 5, dict(optimizer="adamw", lr=0.01, dropout=0.3)),
])
@pytest.mark.parametrize("n_threads", [1, 2, 0])
def test_determinism(head, C, kw, n_threads):
    X, y = make_data(300, 20, C, seed=10)

    def train(seed):
        p = pyft.init_head_params(head, 20, C, hidden_size=16, seed=0)
        _core.train_head(p, X, y, head=head, num_classes=C, hidden_size=16, epochs=4,
                         batch_size=40, seed=seed, n_threads=n_threads, **kw)
        return p

    a, b, c = train(11), train(11), train(12)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


# ------------------------------------------------------------------------------------------------
# 5. predict vs a NumPy forward


@pytest.mark.parametrize("head,C,activation", [
    ("linear", 2, "relu"), ("linear", 4, "relu"), ("linear", 7, "relu"),
    ("mlp", 3, "relu"), ("mlp", 6, "gelu"),
])
@pytest.mark.parametrize("n_threads", [1, 0])
def test_predict_matches_numpy(head, C, activation, n_threads):
    N, D, H = 2500, 16, 12  # more rows than one predict chunk (2048)
    X, _ = make_data(N, D, C, seed=12)
    p = pyft.init_head_params(head, D, C, hidden_size=H, seed=4) * 3  # spread-out logits
    kw = dict(head=head, num_classes=C, hidden_size=H, activation=activation, n_threads=n_threads)
    z_ref = ref.np_logits(p, X, head, C, H, activation)
    z = _core.predict(p, X, output="logits", **kw)
    assert z.shape == (N, C) and z.dtype == np.float32
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    proba = _core.predict(p, X, output="proba", **kw)
    np.testing.assert_allclose(proba, ref.np_softmax(z_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    labels = _core.predict(p, X, output="labels", **kw)
    assert labels.shape == (N,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, z.argmax(axis=1))
    top2 = np.sort(z_ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], z_ref.argmax(axis=1)[clear])


# ------------------------------------------------------------------------------------------------
# 6. Full-batch objective gradient vs torch autograd


@pytest.mark.parametrize("head,C,activation,kernel,l2", [
    ("linear", 5, "relu", "auto", 0.0),
    ("linear", 5, "relu", "blas", 0.03),
    ("linear", 3, "relu", "fused", 0.03),
    ("mlp", 5, "gelu", "auto", 0.0),
    ("mlp", 4, "gelu", "auto", 0.03),
    ("mlp", 4, "relu", "auto", 0.0),
])
def test_objective_gradient_matches_autograd(head, C, activation, kernel, l2):
    N, D, H = 300, 16, 10
    X, y = make_data(N, D, C, seed=13)
    cw = np.linspace(0.5, 2.0, C).astype(np.float32)
    eps = 0.1
    p = pyft.init_head_params(head, D, C, hidden_size=H, seed=5)
    f, g = _core.objective(p, X, y, head=head, num_classes=C, hidden_size=H,
                           activation=activation, class_weights=cw, label_smoothing=eps, l2=l2,
                           kernel=kernel, n_threads=1)
    model = ref.torch_head(p, head, D, C, H, activation, dtype=torch.float64)
    crit = torch.nn.CrossEntropyLoss(weight=torch.as_tensor(cw, dtype=torch.float64),
                                     label_smoothing=eps)
    loss = crit(model(torch.from_numpy(X.astype(np.float64))), torch.from_numpy(y))
    weights, _ = ref.split_decay(model)
    loss = loss + 0.5 * l2 * sum((w * w).sum() for w in weights)
    loss.backward()
    g_ref = np.concatenate([t.grad.numpy().ravel() for t in model.parameters()])
    assert f == pytest.approx(loss.item(), rel=1e-6)
    assert g.dtype == np.float32 and g.shape == p.shape
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6 * np.abs(g_ref).max())


# ------------------------------------------------------------------------------------------------
# 7. Early stopping and callbacks


def _overfitting_problem():
    """Weak signal, 60 samples in 40-D: the val loss falls, then rises as the head overfits."""
    X, y = make_data(260, 40, 3, seed=14, sep=0.3)
    return X[:60], y[:60], X[60:], y[60:]


ES_KW = dict(num_classes=3, optimizer="sgd", lr=0.02, momentum=0.9, batch_size=16, n_threads=1,
             seed=3)


def test_early_stopping_restores_best_epoch():
    X, y, Xv, yv = _overfitting_problem()
    p0 = pyft.init_head_params("linear", 40, 3, seed=0)
    p = p0.copy()
    snapshots = []
    patience = 3
    res = _core.train_head(p, X, y, epochs=100, val_features=Xv, val_labels=yv,
                           patience=patience, callback=lambda st: snapshots.append(p.copy()),
                           **ES_KW)
    best = res["best_epoch"]
    val = [h["val_loss"] for h in res["history"]]
    assert res["stopped_early"] and not res["stopped_by_callback"]
    assert res["epochs_run"] < 100
    assert res["epochs_run"] == best + patience + 1
    assert len(val) == len(snapshots) == res["epochs_run"]
    assert val[best] == min(val) and all(v >= val[best] for v in val[best + 1:])
    assert best >= 1  # it did improve for a while before overfitting
    # history's val_loss is the loss of that epoch's weights (no dropout, mean CE)
    for k in (0, best, len(val) - 1):
        assert val[k] == pytest.approx(cross_entropy(snapshots[k], Xv, yv, "linear", 3),
                                       rel=1e-5)
    # the best epoch's weights were restored
    np.testing.assert_array_equal(p, snapshots[best])
    assert not np.array_equal(p, snapshots[-1])
    # ... and they are exactly what a run of best_epoch + 1 epochs produces
    q = p0.copy()
    res2 = _core.train_head(q, X, y, epochs=best + 1, **ES_KW)
    assert res2["epochs_run"] == best + 1 and res2["best_epoch"] == -1
    np.testing.assert_array_equal(p, q)


def test_early_stopping_min_delta():
    X, y, Xv, yv = _overfitting_problem()
    p = pyft.init_head_params("linear", 40, 3, seed=0)
    res = _core.train_head(p, X, y, epochs=100, val_features=Xv, val_labels=yv, patience=2,
                           min_delta=100.0, **ES_KW)
    # only the first epoch improves on +inf by more than min_delta
    assert res["stopped_early"] and res["best_epoch"] == 0 and res["epochs_run"] == 3


def test_validation_without_patience_runs_all_epochs():
    X, y, Xv, yv = _overfitting_problem()
    p = pyft.init_head_params("linear", 40, 3, seed=0)
    res = _core.train_head(p, X, y, epochs=12, val_features=Xv, val_labels=yv, **ES_KW)
    assert res["epochs_run"] == 12 and not res["stopped_early"]
    assert res["history"][-1]["val_loss"] == pytest.approx(
        cross_entropy(p, Xv, yv, "linear", 3), rel=1e-5)


def test_callback_false_stops_training():
    X, y, _, _ = _overfitting_problem()
    p0 = pyft.init_head_params("linear", 40, 3, seed=0)
    p = p0.copy()
    seen = []

    def cb(st):
        seen.append(st["epoch"])
        assert {"epoch", "train_loss", "train_accuracy", "lr", "steps", "seconds"} <= set(st)
        return st["epoch"] < 2

    res = _core.train_head(p, X, y, epochs=20, callback=cb, **ES_KW)
    assert seen == [0, 1, 2]
    assert res["stopped_by_callback"] and not res["stopped_early"] and res["epochs_run"] == 3
    q = p0.copy()
    _core.train_head(q, X, y, epochs=3, **ES_KW)
    np.testing.assert_array_equal(p, q)


class _CallbackError(RuntimeError):
    pass


def test_callback_exception_propagates():
    X, y, _, _ = _overfitting_problem()
    p = pyft.init_head_params("linear", 40, 3, seed=0)
    calls = []

    def cb(st):
        calls.append(st["epoch"])
        if st["epoch"] == 1:
            raise _CallbackError("boom")

    with pytest.raises(_CallbackError, match="boom"):
        _core.train_head(p, X, y, epochs=20, callback=cb, **ES_KW)
    assert calls == [0, 1]  # training stopped at the exception


def test_lbfgs_callback_stop_and_exception():
    X, y = make_data(200, 10, 4, seed=15)
    p = np.zeros(44, np.float32)
    its = []
    res = _core.train_head_lbfgs(p, X, y, num_classes=4, l2=1e-3, tol=0.0, ftol=0.0,
                                 callback=lambda it: its.append(it["iteration"]) or len(its) < 3)
    assert its == [1, 2, 3] and res["iterations"] == 3 and not res["converged"]

    def boom(it):
        raise _CallbackError("lbfgs boom")

    with pytest.raises(_CallbackError, match="lbfgs boom"):
        _core.train_head_lbfgs(np.zeros(44, np.float32), X, y, num_classes=4, callback=boom)


# ------------------------------------------------------------------------------------------------
# 8. Dropout


def test_dropout_changes_trajectory_is_seeded_and_trains():
    X, y = make_data(400, 20, 4, seed=16)
    X, y, Xv, yv = X[:300], y[:300], X[300:], y[300:]

    def train(dropout, seed):
        p = pyft.init_head_params("mlp", 20, 4, hidden_size=32, seed=0)
        res = _core.train_head(p, X, y, head="mlp", num_classes=4, hidden_size=32,
                               optimizer="adamw", lr=1e-2, epochs=15, batch_size=32,
                               dropout=dropout, seed=seed, n_threads=1, val_features=Xv,
                               val_labels=yv)
        return p, res["history"]

    p0, _ = train(0.0, 1)
    p1, h1 = train(0.4, 1)
    p1b, h1b = train(0.4, 1)
    p2, _ = train(0.4, 2)
    assert np.abs(p1 - p0).max() > 1e-3
    np.testing.assert_array_equal(p1, p1b)
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h1b]
    assert np.abs(p1 - p2).max() > 1e-3
    # still trains
    assert h1[-1]["train_loss"] < 0.7 * h1[0]["train_loss"]
    # evaluation is without dropout: val loss equals the plain forward's loss
    assert h1[-1]["val_loss"] == pytest.approx(cross_entropy(p1, Xv, yv, "mlp", 4, 32), rel=1e-5)
    assert h1[-1]["val_loss"] < h1[0]["val_loss"]
