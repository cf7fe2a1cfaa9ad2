"""Grid training of many heads in one call (``_core.train_heads``) and ``pyft.grid.fit_grid``.

Every head of a grid run must follow the trajectory of a separate ``_core.train_head`` run with
that head's lr / weight decay (same seed, same batches). The grid multiplies each batch against
all heads in one GEMM while train_head uses its fused row kernel for C <= 12, so the summation
order differs and the match is to float32 tolerance, not bitwise: ``rtol=1e-5`` plus an absolute
``1e-6`` for entries near zero (as in test_trainer_reference.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyft_tests_reference as ref  # registered by tests/conftest.py
import pytest

import pyft
from pyft import _core

RTOL, ATOL = 1e-5, 1e-6


make_data = ref.make_data


def init_grid(H, D, C, seed=0):
    return np.stack([pyft.init_head_params("linear", D, C, seed=seed + h) for h in range(H)])


OPTIMIZERS = {
    "sgd-momentum": (dict(optimizer="sgd", momentum=0.9), (0.003, 0.1), (0.0, 1e-3)),
    "sgd-nesterov-wd": (dict(optimizer="sgd", momentum=0.9, nesterov=True), (0.003, 0.1),
                        (1e-4, 1e-2)),
    "adamw-wd": (dict(optimizer="adamw"), (3e-4, 1e-2), (0.0, 0.1)),
}


def grid_values(H, lr_range, wd_range):
    lrs = np.geomspace(*lr_range, H)
    wds = np.linspace(*wd_range, H)[::-1].copy()  # vary both, in different directions
    return lrs, wds


def run_both(X, y, C, H, opt_kw, lr_range, wd_range, *, val=None, **kw):
    """Grid run vs H separate train_head runs.

    Returns (grid result, grid params, [(params, res)]).
    """
    D = X.shape[1]
    lrs, wds = grid_values(H, lr_range, wd_range)
    P0 = init_grid(H, D, C)
    P = P0.copy()
    gval = {} if val is None else val[0]
    res = _core.train_heads(P, X, y, num_classes=C, lrs=lrs, weight_decays=wds, **gval, **opt_kw,
                            **kw)
    singles = []
    for h in range(H):
        p = P0[h].copy()
        sval = {} if val is None else val[1]
        r = _core.train_head(p, X, y, num_classes=C, lr=lrs[h], weight_decay=wds[h], **sval,
                             **opt_kw, **kw)
        singles.append((p, r))
    return res, P, singles


@pytest.mark.parametrize("opt_case", list(OPTIMIZERS))
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("C", [2, 10, 100])
@pytest.mark.parametrize("H", [1, 16])
def test_grid_matches_separate_runs(opt_case, schedule, dtype, C, H):
    opt_kw, lr_range, wd_range = OPTIMIZERS[opt_case]
    X, y = make_data(203 if C < 100 else 400, 24, C, seed=C, dtype=dtype)
    # odd cases train on a subset (and validate on the held-out rows), even ones on everything
    use_subset = (C + H + len(schedule)) % 2 == 1
    kw = dict(epochs=4, batch_size=32, seed=7, schedule=schedule, warmup_steps=3)
    if use_subset:
        rows = np.random.default_rng(1).permutation(len(y))
        train_rows, val_rows = np.sort(rows[: len(y) * 3 // 4]), rows[len(y) * 3 // 4 :]
        kw["train_rows"] = train_rows
        val = (dict(val_rows=val_rows), dict(val_features=X[val_rows], val_labels=y[val_rows]))
    else:
        val = (dict(val_features=X[:50], val_labels=y[:50]),) * 2
    res, P, singles = run_both(X, y, C, H, opt_kw, lr_range, wd_range, val=val, **kw)
    assert res["epochs_run"] == 4 and len(res["history"]) == 4
    for h, (p, r) in enumerate(singles):
        np.testing.assert_allclose(P[h], p, rtol=RTOL, atol=ATOL, err_msg=f"head {h} params")
        assert res["steps"] == r["steps"]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            got = [e[key][h] for e in res["history"]]
            want = [e[key] for e in r["history"]]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7,
                                       err_msg=f"head {h} {key}")
    # learnable data: the grid made progress
    hist = res["history"]
    assert np.all(hist[-1]["train_loss"] < hist[0]["train_loss"] + 1e-3)


def test_grid_matches_torch_reference():
    C, H = 10, 4
    X, y = make_data(203, 24, C)
    lrs = np.array([0.01, 0.03, 0.05, 0.1])
    wds = np.array([0.0, 1e-3, 1e-2, 5e-2])
    kw = dict(optimizer="sgd", momentum=0.9, nesterov=True, schedule="cosine", warmup_steps=3,
              epochs=16, batch_size=32, seed=3)
    P0 = init_grid(H, 24, C)
    P = P0.copy()
    res = _core.train_heads(P, X, y, num_classes=C, lrs=lrs, weight_decays=wds, n_threads=1, **kw)
    for h in range(H):
        q, hist = ref.torch_train(P0[h].copy(), X, y, permutation=_core.epoch_permutation,
                                  num_classes=C, lr=lrs[h], weight_decay=wds[h], **kw)
        np.testing.assert_allclose(P[h], q, rtol=RTOL, atol=ATOL, err_msg=f"head {h}")
        np.testing.assert_allclose([e["train_loss"][h] for e in res["history"]],
                                   [e["train_loss"] for e in hist], rtol=RTOL)
        np.testing.assert_allclose([e["lr"][h] for e in res["history"]],
                                   [e["lr"] for e in hist], rtol=1e-12)


def test_grid_label_smoothing_and_class_weights_match():
    C = 5
    X, y = make_data(150, 12, C)
    cw = np.array([0.5, 1.0, 2.0, 1.5, 0.75], dtype=np.float32)
    res, P, singles = run_both(X, y, C, 3, dict(optimizer="adamw"), (1e-3, 3e-2), (0.0, 0.1),
                               epochs=3, batch_size=16, class_weights=cw, label_smoothing=0.1)
    for h, (p, r) in enumerate(singles):
        np.testing.assert_allclose(P[h], p, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose([e["train_loss"][h] for e in res["history"]],
                                   [e["train_loss"] for e in r["history"]], rtol=RTOL)


# batch_size * D >= 2**15 with H >= threads: each thread runs its own heads' GEMMs (head split)
SPLITS = {"shared-gemm": (40, 64, 6), "head-split": (128, 256, 6), "fewer-heads": (128, 256, 1)}


@pytest.mark.parametrize("case", list(SPLITS))
def test_grid_is_independent_of_thread_count(case):
    D, B, H = SPLITS[case]
    X, y = make_data(700, D, 7)
    lrs, wds = np.geomspace(1e-3, 0.3, H), np.zeros(H)
    out = []
    for nt in (1, 2, 3):
        P = init_grid(H, D, 7)
        _core.train_heads(P, X, y, num_classes=7, lrs=lrs, weight_decays=wds, optimizer="sgd",
                          momentum=0.9, epochs=2, batch_size=B, n_threads=nt,
                          val_rows=np.arange(100))
        out.append(P)
    np.testing.assert_allclose(out[0], out[2], rtol=RTOL, atol=ATOL)
    # per-head work is thread-independent; GEMM slices may round differently per thread count
    np.testing.assert_allclose(out[0], out[1], rtol=RTOL, atol=ATOL)


def test_grid_callback_and_history_shapes():
    X, y = make_data(100, 8, 3)
    P = init_grid(5, 8, 3)
    seen = []

    def cb(info):
        seen.append(info["epoch"])
        assert info["train_loss"].shape == (5,) and info["val_accuracy"].shape == (5,)
        return info["epoch"] < 1

    res = _core.train_heads(P, X, y, num_classes=3, lrs=np.full(5, 0.1), weight_decays=np.zeros(5),
                            val_rows=np.arange(20), epochs=10, callback=cb)
    assert seen == [0, 1] and res["epochs_run"] == 2 and res["stopped_by_callback"]
    # identical heads with identical settings stay equal (to the rounding of the GEMM's edge
    # tiles, which may differ between output columns) and lists are accepted for lrs
    init = np.tile(pyft.init_head_params("linear", 8, 3), (2, 1))
    _core.train_heads(init, X, y, num_classes=3, lrs=[0.1, 0.1], weight_decays=[0.0, 0.0],
                      epochs=2)
    np.testing.assert_allclose(init[0], init[1], rtol=1e-6, atol=1e-7)


def test_grid_callback_exception_propagates():
    X, y = make_data(100, 8, 3)
    P = init_grid(2, 8, 3)

    def cb(info):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        _core.train_heads(P, X, y, num_classes=3, lrs=[0.1, 0.2], weight_decays=[0, 0],
                          epochs=5, callback=cb)


def _bad(**over):
    X, y = make_data(50, 6, 3)
    args = dict(params=init_grid(2, 6, 3), features=X, labels=y)
    kw = dict(num_classes=3, lrs=np.array([0.1, 0.2]), weight_decays=np.array([0.0, 0.0]),
              epochs=1)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return args, kw


BAD = {
    "lrs-length": (dict(lrs=np.array([0.1])), "lrs must have one value per head"),
    "lrs-negative": (dict(lrs=np.array([0.1, -1.0])), r"lrs must be positive.*index 1"),
    "lrs-nan": (dict(lrs=np.array([np.nan, 0.1])), r"lrs must be positive.*index 0"),
    "lrs-2d": (dict(lrs=np.ones((2, 1))), "lrs must be a 1-D array"),
    "wd-negative": (dict(weight_decays=np.array([0.0, -1.0])), r"weight_decays must be .*index 1"),
    "wd-length": (dict(weight_decays=np.zeros(3)), "weight_decays must have one value per head"),
    "params-1d": (dict(params=np.zeros(21, np.float32)), "params must be a 2-D float32"),
    "params-f64": (dict(params=np.zeros((2, 21))), "params must be a 2-D float32"),
    "params-cols": (dict(params=np.zeros((2, 20), np.float32)), "params must have 21 columns"),
    "params-empty": (dict(params=np.zeros((0, 21), np.float32)), "at least 1 head"),
    "labels-range": (dict(labels=np.full(50, 3)), r"labels must be in \[0, 3\)"),
    "train-rows-range": (dict(train_rows=np.array([0, 50])), r"train_rows must be in \[0, 50\)"),
    "train-rows-empty": (dict(train_rows=np.array([], np.int64)), "train_rows must select"),
    "val-rows-range": (dict(val_rows=np.array([-1])), r"val_rows must be in \[0, 50\)"),
    "val-both": (dict(val_rows=np.array([1]), val_features=np.zeros((2, 6), np.float32),
                      val_labels=np.zeros(2, np.int64)), "not both"),
    "val-labels-alone": (dict(val_labels=np.zeros(2, np.int64)), "given together"),
    "val-cols": (dict(val_features=np.zeros((2, 5), np.float32), val_labels=np.zeros(2, np.int64)),
                 "val_features must have 6 columns"),
    "optimizer": (dict(optimizer="lion"), "optimizer must be 'sgd' or 'adamw'"),
    "schedule": (dict(schedule="poly"), "schedule must be"),
    "momentum": (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    "epochs": (dict(epochs=0), "epochs must be >= 1"),
    "batch": (dict(batch_size=0), "batch_size must be >= 1"),
    "num-classes": (dict(num_classes=1), "num_classes must be >= 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_grid_bad_input(case):
    over, msg = BAD[case]
    args, kw = _bad(**over)
    with pytest.raises(ValueError, match=msg):
        _core.train_heads(args["params"], args["features"], args["labels"], **kw)


def test_grid_read_only_params():
    args, kw = _bad()
    args["params"].setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _core.train_heads(args["params"], args["features"], args["labels"], **kw)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("D", [6, 128])  # 128: the head-split path with batch 256
def test_grid_nonfinite_features_raise_and_leave_params(D, n_threads):
    X, y = make_data(300, D, 3)
    X[7, 2] = np.nan
    P = init_grid(4, D, 3)
    before = P.copy()
    with pytest.raises(ValueError, match="features must be finite.*row 7, column 2"):
        _core.train_heads(P, X, y, num_classes=3, lrs=np.full(4, 0.1), weight_decays=np.zeros(4),
                          epochs=1, n_threads=n_threads)
    np.testing.assert_array_equal(P, before)


@pytest.mark.parametrize("D", [8, 128])
def test_grid_diverging_head_does_not_raise_or_touch_others(D):
    X, y = make_data(600, D, 3)
    P0 = init_grid(2, D, 3)
    P = P0.copy()
    # lr 1e38 overflows the weights to infinity, then NaN: every later batch takes the
    # non-finite path, which must still train the healthy head
    _core.train_heads(P, X, y, num_classes=3, lrs=[1e38, 0.1], weight_decays=[0, 0], epochs=2,
                      optimizer="sgd", momentum=0.9, n_threads=2)
    assert not np.all(np.isfinite(P[0]))
    p = P0[1].copy()
    _core.train_head(p, X, y, num_classes=3, lr=0.1, epochs=2, optimizer="sgd", momentum=0.9)
    np.testing.assert_allclose(P[1], p, rtol=RTOL, atol=ATOL)


_CHILD_INTERRUPT = textwrap.dedent(
    """
    import sys, numpy as np
    import signal
    # A shell that starts jobs in the background hands them SIGINT ignored; the test is about
    # pyft's handling of Ctrl-C, so the child takes Python's own handler whatever it inherited.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pyft import _core
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20000, 128), dtype=np.float32)
    y = rng.integers(0, 10, 20000)
    P = np.zeros((8, 10 * 128 + 10), np.float32)
    def cb(info):
        if info["epoch"] == 0:
            print("started", flush=True)
    try:
        _core.train_heads(P, X, y, num_classes=10, lrs=np.full(8, 0.01), weight_decays=np.zeros(8),
                          epochs=100000, callback=cb)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
    print("finished", flush=True)
    """
)


def test_grid_ctrl_c_interrupts():
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_INTERRUPT], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and rest.strip() == "interrupted"
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------
# pyft.grid.fit_grid


def _scaled_problem(n=2000, d=16, c=4, seed=1, sep=0.3):
    """Overlapping blobs with large-scale features: at 3 epochs lr 1e-6 stays near chance and
    lr 10 overshoots (validation loss ~200), lr 1e-2 learns (loss ~0.7): a clear winner."""
    X, y = make_data(n, d, c, seed=seed, sep=sep)
    return (X * 10).astype(np.float32), y


def test_default_lrs_scale_with_batch_size():
    from pyft.grid import BASE_LRS, default_lrs

    np.testing.assert_allclose(default_lrs(256), BASE_LRS)
    np.testing.assert_allclose(default_lrs(512), np.asarray(BASE_LRS) * 2)


def test_fit_grid_selects_clearly_best_lr_and_refit_matches_train_head():
    from pyft.grid import fit_grid

    X, y = _scaled_problem()
    labels = np.array(["a", "b", "c", "d"])[y]
    res = fit_grid(X, labels, lrs=[1e-6, 1e-2, 10.0], weight_decays=[0.0, 1e-4], epochs=3,
                   batch_size=32, seed=5, select="loss")
    assert res.table_["lr"].shape == (6,) and res.n_folds_ == 1
    assert res.best_lr_ == 1e-2
    assert res.table_["val_loss_mean"][res.best_index_] < 0.2 * np.delete(
        res.table_["val_loss_mean"], [2, 3]).min()
    by_acc = fit_grid(X, labels, lrs=[1e-6, 1e-2], epochs=3, batch_size=32, seed=5)
    assert by_acc.best_lr_ == 1e-2
    assert by_acc.table_["val_accuracy_mean"][1] > by_acc.table_["val_accuracy_mean"][0] + 0.3
    assert list(res.classes_) == ["a", "b", "c", "d"]
    # refit on all rows with the chosen settings == a direct train_head run
    p = pyft.init_head_params("linear", X.shape[1], 4, seed=5)
    _core.train_head(p, X, y, num_classes=4, optimizer="sgd", momentum=0.9, schedule="cosine",
                     lr=res.best_lr_, weight_decay=res.best_weight_decay_, epochs=3,
                     batch_size=32, seed=5)
    np.testing.assert_array_equal(res.params_, p)
    assert (res.predict(X) == labels).mean() > 0.6
    # the validation split is stratified, disjoint from training, and recorded
    va = np.flatnonzero(res.fold_ == 0)
    assert set(np.unique(res.fold_)) == {-1, 0}
    assert abs(len(va) - 200) <= 1
    np.testing.assert_allclose(np.bincount(y[va], minlength=4) / len(va),
                               np.bincount(y, minlength=4) / len(y), atol=0.02)


def test_fit_grid_kfold_disjoint_stratified_and_no_leakage():
    from sklearn.model_selection import StratifiedKFold

    from pyft.grid import fit_grid

    X, y = _scaled_problem(n=500, c=5, sep=2.0)
    res = fit_grid(X, y, lrs=[1e-3, 1e-2], folds=5, epochs=2, batch_size=64, seed=3)
    assert res.n_folds_ == 5 and res.table_["val_accuracy"].shape == (5, 2)
    # every sample is held out exactly once; each fold keeps the class proportions
    assert set(np.unique(res.fold_)) == set(range(5))
    for k in range(5):
        counts = np.bincount(y[res.fold_ == k], minlength=5)
        assert counts.max() - counts.min() <= np.bincount(y).max() - np.bincount(y).min() + 5
        assert abs((res.fold_ == k).sum() - 100) <= 1
    # same folds as StratifiedKFold with the seed
    for k, (_, va) in enumerate(StratifiedKFold(5, shuffle=True, random_state=3).split(X, y)):
        np.testing.assert_array_equal(np.flatnonzero(res.fold_ == k), np.sort(va))
    # fold k's numbers equal a fresh train_head on the other folds, validated on fold k
    k = 2
    tr, va = np.flatnonzero(res.fold_ != k), np.flatnonzero(res.fold_ == k)
    p = pyft.init_head_params("linear", X.shape[1], 5, seed=3)
    r = _core.train_head(p, X, y, num_classes=5, optimizer="sgd", momentum=0.9, schedule="cosine",
                         lr=1e-2, epochs=2, batch_size=64, seed=3, train_rows=tr,
                         val_features=X[va], val_labels=y[va])
    assert res.table_["val_accuracy"][k, 1] == pytest.approx(r["history"][-1]["val_accuracy"])
    assert res.table_["val_loss"][k, 1] == pytest.approx(r["history"][-1]["val_loss"], rel=1e-5)
    np.testing.assert_allclose(res.table_["val_accuracy_mean"], res.table_["val_accuracy"].mean(0))
    np.testing.assert_allclose(res.table_["val_accuracy_std"], res.table_["val_accuracy"].std(0))


@pytest.mark.parametrize("kw, msg", [
    (dict(folds=1), "folds must be None"),
    (dict(folds=True), "folds must be None"),
    (dict(folds=500), "needs at least 500 samples of every class"),
    (dict(val_fraction=1.5), r"val_fraction must be in \(0, 1\)"),
    (dict(lrs=[]), "lrs must be a non-empty"),
    (dict(select="f1"), "select must be"),
    (dict(lrs=[-1.0]), "lrs must be positive"),
])
def test_fit_grid_bad_input(kw, msg):
    from pyft.grid import fit_grid

    X, y = _scaled_problem(n=100)
    with pytest.raises(ValueError, match=msg):
        fit_grid(X, y, epochs=1, **kw)


def test_fit_grid_on_float16_memmap(tmp_path):
    from pyft.grid import fit_grid

    X, y = _scaled_problem(n=400, sep=2.0)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=X.shape)
    mm[:] = X
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    res = fit_grid(mm, y, lrs=[1e-3, 1e-2], folds=3, epochs=2, batch_size=64)
    want = fit_grid(np.asarray(mm), y, lrs=[1e-3, 1e-2], folds=3, epochs=2, batch_size=64)
    np.testing.assert_array_equal(res.params_, want.params_)
    np.testing.assert_array_equal(res.table_["val_loss"], want.table_["val_loss"])
