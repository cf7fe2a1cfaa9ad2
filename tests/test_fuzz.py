"""Hypothesis fuzzing of the native bindings (and of HeadClassifier's argument handling).

Every call either succeeds or raises ValueError/TypeError: never another exception, never a
crash of the interpreter. Sizes are tiny so that each test runs in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyft import HeadClassifier, _core

ALLOWED = (ValueError, TypeError)

# PYFT_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py fuzzes longer.
FUZZ = settings(
    max_examples=int(os.environ.get("PYFT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,  # keep the repository clean
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FEATURE_DTYPES = [
    np.float32, np.float16, np.float64, np.int32, np.int64, np.int8, np.uint16, np.int16,
    np.bool_, np.complex64, np.longdouble,
]
LABEL_DTYPES = [np.int64, np.int32, np.uint8, np.uint64, np.int8, np.float64, np.bool_]

# Floats that are legal, boundary or nonsense for any hyperparameter.
weird_float = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-3, 0.999, 1e30, -1e30, 1e-300,
                     float("nan"), float("inf"), -float("inf")]),
    st.floats(min_value=-3.0, max_value=3.0, allow_nan=False),
)
sane_float = st.floats(min_value=1e-4, max_value=0.5, allow_nan=False)
# Integers, including those too large for the C++ type (-> TypeError from pybind11).
weird_int = st.one_of(st.integers(-3, 4), st.sampled_from([0, -1, 2**31, 2**62, -(2**63), 2**64]))

# How often each argument is drawn from its "weird" strategy instead of a valid one: a run mixes
# fully valid calls (which exercise training and its outputs) with calls that are wrong in one
# or many places.
chaos_levels = st.sampled_from([0, 0, 30, 100, 500])  # per mille


def pick(draw, chaos, valid, weird):
    """Draw from `weird` with probability chaos/1000, else from `valid`."""
    if chaos and draw(st.integers(0, 999)) < chaos:
        return draw(weird)
    return draw(valid)


def _call(fn, *args, **kwargs):
    """Run fn; succeed or raise an allowed exception. Returns the result or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy casts of nan/inf in test data
        try:
            return fn(*args, **kwargs)
        except ALLOWED:
            return None


def _layout(draw, arr):
    """The same values in a random memory layout (strided, Fortran, reversed, transposed)."""
    rs = draw(st.sampled_from([1, 2, 3]))
    cs = draw(st.sampled_from([1, 2]))
    if arr.ndim == 2 and (rs > 1 or cs > 1):
        big = np.zeros((arr.shape[0] * rs, arr.shape[1] * cs), arr.dtype)
        big[::rs, ::cs] = arr
        arr = big[::rs, ::cs]
    layout = draw(st.sampled_from(["c", "f", "rev", "T"]))
    if arr.ndim != 2 or layout == "c":
        return arr
    if layout == "f":
        return np.asfortranarray(arr)
    if layout == "rev":
        return np.ascontiguousarray(arr[::-1, ::-1])[::-1, ::-1]
    return np.ascontiguousarray(arr.T).T


@st.composite
def feature_arrays(draw, chaos=0, n=None, d=None, max_rows=6, max_cols=5):
    """(array, bfloat16_flag) with random shape, dtype, strides; chaos adds empty shapes,
    unsupported dtypes, non-finite values, wrong dimensionality and a wrong bfloat16 flag."""
    if n is None:
        n = pick(draw, chaos, st.integers(1, max_rows), st.just(0))
    if d is None:
        d = pick(draw, chaos, st.integers(1, max_cols), st.just(0))
    dtype = pick(draw, chaos, st.sampled_from(["bf16", np.float32, np.float16, np.float64]),
                 st.sampled_from(FEATURE_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = rng.normal(size=(n, d)) * draw(st.sampled_from([1.0, 30.0, 1e-3]))
    bf16 = False
    if dtype == "bf16":
        bf16 = True
        arr = (base.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        if draw(st.booleans()):
            arr = arr.view(np.int16)
    elif dtype == np.uint16:
        bf16 = draw(st.booleans())
        arr = rng.integers(0, 2**16, size=base.shape, dtype=np.uint16)  # any bits, NaN too
    else:
        with np.errstate(all="ignore"):
            arr = base.astype(dtype)
    if arr.size and arr.dtype.kind == "f" and pick(draw, chaos, st.just(False), st.booleans()):
        i = draw(st.integers(0, arr.shape[0] - 1))
        j = draw(st.integers(0, arr.shape[1] - 1))
        arr[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    arr = _layout(draw, arr)
    ndim = pick(draw, chaos, st.just(2), st.sampled_from([1, 3]))
    if ndim == 1:
        arr = arr.reshape(-1)
    elif ndim == 3:
        arr = arr[None]
    if pick(draw, chaos, st.just(False), st.booleans()):
        bf16 = not bf16
    return arr, bf16


@st.composite
def labels_for(draw, n, num_classes, chaos=0):
    length = pick(draw, chaos, st.just(n), st.sampled_from([max(0, n - 1), n + 1]))
    hi = max(num_classes, 1)
    vals = draw(
        st.lists(
            pick(draw, chaos, st.just(st.integers(0, hi - 1)),
                 st.just(st.integers(-3, hi + 2))),
            min_size=length, max_size=length,
        )
    )
    dtype = pick(draw, chaos, st.sampled_from([np.int64, np.int32, np.uint8, np.int16]),
                 st.sampled_from(LABEL_DTYPES))
    with np.errstate(all="ignore"):
        arr = np.array(vals, dtype=np.int64).astype(dtype)
    if length and draw(st.integers(0, 4)) == 0:
        arr = np.repeat(arr, 2)[::2]  # strided labels
    return arr


def _param_count(head, d, c, h):
    if head == "mlp":
        return h * d + h + c * h + c
    return c * d + c


@st.composite
def params_for(draw, head, d, c, h, chaos=0):
    count = max(0, _param_count(head, max(d, 0), max(c, 0), max(h, 0)))
    count = max(0, count + pick(draw, chaos, st.just(0), st.sampled_from([-1, 1, 5])))
    dtype = pick(draw, chaos, st.just(np.float32),
                 st.sampled_from([np.float64, np.float16, np.int32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    p = (rng.normal(size=count) * 0.3).astype(dtype)
    how = pick(draw, chaos, st.just("ok"), st.sampled_from(["ro", "strided", "2d", "nan"]))
    if how == "ro":
        p.flags.writeable = False
    elif how == "strided" and count:
        p = np.repeat(p, 2)[::2]
    elif how == "2d":
        p = p[None]
    elif how == "nan" and count and p.dtype.kind == "f":
        p[draw(st.integers(0, count - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    return p


def unit(lo=0.0, hi=1.0):
    return st.floats(min_value=lo, max_value=hi, allow_nan=False)


@st.composite
def train_head_call(draw):
    chaos = draw(chaos_levels)
    X, bf16 = draw(feature_arrays(chaos))
    n = X.shape[0] if X.ndim >= 1 else 0
    d = X.shape[1] if X.ndim == 2 else 0
    head = pick(draw, chaos, st.sampled_from(["linear", "mlp"]),
                st.sampled_from(["", "LINEAR", "conv"]))
    c = pick(draw, chaos, st.integers(2, 4), st.integers(-1, 1))
    h = pick(draw, chaos, st.integers(1, 4), st.integers(-1, 0))
    params = draw(params_for(head, d, c, h, chaos))
    y = draw(labels_for(n, c, chaos))
    optimizer = pick(draw, chaos, st.sampled_from(["sgd", "adamw"]), st.just("adam"))
    momentum = pick(draw, chaos, unit(0.0, 0.99), weird_float)
    nesterov = pick(draw, chaos, st.just(False), st.booleans())
    dampening = pick(draw, chaos, unit(), weird_float)
    if not chaos and optimizer == "sgd" and momentum > 0 and draw(st.booleans()):
        nesterov, dampening = True, 0.0
    kw = dict(
        head=head, num_classes=c, hidden_size=h,
        activation=pick(draw, chaos, st.sampled_from(["relu", "gelu"]), st.just("tanh")),
        bfloat16=bf16,
        label_smoothing=pick(draw, chaos, unit(0.0, 0.99), weird_float),
        optimizer=optimizer,
        lr=pick(draw, chaos, unit(1e-4, 1.0), weird_float),
        weight_decay=pick(draw, chaos, unit(), weird_float),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        beta1=pick(draw, chaos, unit(0.0, 0.99), weird_float),
        beta2=pick(draw, chaos, unit(0.0, 0.999), weird_float),
        eps=pick(draw, chaos, unit(1e-10, 1.0), weird_float),
        schedule=pick(draw, chaos, st.sampled_from(["constant", "cosine", "step"]),
                      st.just("poly")),
        warmup_steps=pick(draw, chaos, st.integers(0, 6), weird_int),
        min_lr_ratio=pick(draw, chaos, unit(), weird_float),
        step_size=pick(draw, chaos, st.integers(1, 3), weird_int),
        gamma=pick(draw, chaos, unit(0.01, 2.0), weird_float),
        epochs=pick(draw, chaos, st.integers(1, 3), st.sampled_from([0, -1, 2**64])),
        batch_size=pick(draw, chaos, st.integers(1, 10),
                        st.sampled_from([0, -2, 2**40, 2**63 - 1, 2**64])),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        seed=pick(draw, chaos, st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**64])),
        dropout=pick(draw, chaos, unit(0.0, 0.9), weird_float),
        patience=pick(draw, chaos, st.just(0), st.integers(-1, 3)),
        min_delta=pick(draw, chaos, unit(), weird_float),
        n_threads=draw(st.integers(-2, 3)),
        kernel=pick(draw, chaos, st.sampled_from(["auto", "blas", "fused"]), st.just("simd")),
    )
    if draw(st.booleans()):
        kw["class_weights"] = pick(
            draw, chaos,
            st.lists(unit(0.1, 5.0), min_size=max(c, 0), max_size=max(c, 0)).map(np.array),
            st.lists(weird_float, min_size=0, max_size=5).map(np.array)
            | st.integers(-1, 5).map(lambda k: np.ones(max(k, 0), np.int32)),
        )
    if draw(st.integers(0, 2)) == 0:
        Xv, bv = draw(feature_arrays(chaos, d=None if chaos else d))
        if bv != bf16:
            Xv, bv = X, bf16  # a valid pairing most of the time
        nv = Xv.shape[0] if Xv.ndim >= 1 else 0
        kw["val_features"] = Xv
        kw["val_labels"] = draw(labels_for(nv, c, chaos))
        if not chaos:
            kw["patience"] = draw(st.integers(0, 2))
    if draw(st.integers(0, 4)) == 0:
        rows = np.array(
            draw(st.lists(pick(draw, chaos, st.just(st.integers(0, max(n - 1, 0))),
                               st.just(st.integers(-2, n + 1))),
                          min_size=pick(draw, chaos, st.just(1), st.just(0)), max_size=6)),
            dtype=np.int64,
        )
        with np.errstate(all="ignore"):
            kw["train_rows"] = rows.astype(pick(
                draw, chaos, st.sampled_from([np.int64, np.int32]),
                st.sampled_from([np.uint8, np.uint64, np.float64]),
            ))
    cb = draw(st.sampled_from([None, None, "true", "false", "none", "raise"]))
    if cb == "true":
        kw["callback"] = lambda info: True
    elif cb == "false":
        kw["callback"] = lambda info: False
    elif cb == "none":
        kw["callback"] = lambda info: None
    elif cb == "raise":
        def boom(info):
            raise ValueError("stop from callback")
        kw["callback"] = boom
    return params, X, y, kw


@FUZZ
@given(train_head_call())
def test_fuzz_train_head(call):
    params, X, y, kw = call
    res = _call(_core.train_head, params, X, y, **kw)
    if res is not None:
        assert 1 <= res["epochs_run"] <= kw["epochs"]
        assert len(res["history"]) == res["epochs_run"]
        assert params.dtype == np.float32


@st.composite
def lbfgs_call(draw):
    chaos = draw(chaos_levels)
    X, bf16 = draw(feature_arrays(chaos))
    n = X.shape[0] if X.ndim >= 1 else 0
    d = X.shape[1] if X.ndim == 2 else 0
    c = pick(draw, chaos, st.integers(2, 4), st.integers(-1, 1))
    params = draw(params_for("linear", d, c, 0, chaos))
    y = draw(labels_for(n, c, chaos))
    kw = dict(
        num_classes=c, bfloat16=bf16,
        label_smoothing=pick(draw, chaos, unit(0.0, 0.99), weird_float),
        l2=pick(draw, chaos, unit(0.0, 10.0), weird_float),
        max_iter=pick(draw, chaos, st.integers(1, 15), st.sampled_from([0, -1, 2**64])),
        tol=pick(draw, chaos, unit(), weird_float),
        ftol=pick(draw, chaos, unit(), weird_float),
        history=pick(draw, chaos, st.integers(1, 12), st.integers(-1, 0)),
        n_threads=draw(st.integers(-2, 3)),
        kernel=pick(draw, chaos, st.sampled_from(["auto", "blas", "fused"]), st.just("x")),
    )
    if draw(st.booleans()):
        kw["class_weights"] = pick(
            draw, chaos,
            st.lists(unit(0.0, 5.0), min_size=max(c, 0), max_size=max(c, 0)).map(np.array),
            st.lists(weird_float, min_size=0, max_size=5).map(np.array),
        )
    cb = draw(st.sampled_from([None, None, "false", "raise"]))
    if cb == "false":
        kw["callback"] = lambda info: False
    elif cb == "raise":
        def boom(info):
            raise TypeError("stop from callback")
        kw["callback"] = boom
    return params, X, y, kw


@FUZZ
@given(lbfgs_call())
def test_fuzz_train_head_lbfgs(call):
    params, X, y, kw = call
    res = _call(_core.train_head_lbfgs, params, X, y, **kw)
    if res is not None:
        assert res["iterations"] <= kw["max_iter"]


@FUZZ
@given(train_head_call(), unit(0.0, 1.0) | st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_objective(call, l2):
    params, X, y, kw = call
    keep = ("head", "num_classes", "hidden_size", "activation", "bfloat16", "class_weights",
            "label_smoothing", "n_threads", "kernel")
    res = _call(_core.objective, params, X, y, l2=l2, **{k: kw[k] for k in keep if k in kw})
    if res is not None:
        f, g = res
        assert isinstance(f, float)
        assert g.shape == (params.shape[0],) and g.dtype == np.float32


@FUZZ
@given(train_head_call(), st.sampled_from(["logits", "proba", "labels", "argmax", ""]))
def test_fuzz_predict(call, output):
    params, X, _, kw = call
    keep = ("head", "num_classes", "hidden_size", "activation", "bfloat16", "n_threads")
    res = _call(_core.predict, params, X, output=output, **{k: kw[k] for k in keep})
    if res is not None:
        if output == "labels":
            assert res.shape == (X.shape[0],) and res.dtype == np.int64
            assert np.all((res >= 0) & (res < kw["num_classes"]))
        else:
            assert res.shape == (X.shape[0], kw["num_classes"]) and res.dtype == np.float32
        if output == "proba" and np.all(np.isfinite(params)):
            np.testing.assert_allclose(res.sum(axis=1), 1.0, atol=1e-4)


@FUZZ
@given(st.integers(-5, 300), st.one_of(st.integers(0, 2**64 - 1), st.just(-1)),
       st.integers(-(2**63), 2**63 - 1))
def test_fuzz_epoch_permutation(n, seed, epoch):
    res = _call(_core.epoch_permutation, n, seed, epoch)
    if res is not None:
        assert n >= 0
        np.testing.assert_array_equal(np.sort(res), np.arange(n))


@FUZZ
@given(st.integers(-2**31, 2**31))
def test_fuzz_num_threads(requested):
    res = _call(_core.num_threads, requested)
    if res is not None:
        assert res >= 1


# lr_factor is fuzzed in a child process: an integer division by zero (SIGFPE) or any other
# crash must fail this test, not kill the test session.
_LR_FACTOR_FUZZ = textwrap.dedent(
    """
    import math
    from hypothesis import given, settings, strategies as st
    from pyft import _core

    ints = st.one_of(st.integers(-3, 12), st.sampled_from([0, -1, 2**62, -(2**62)]))
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, 1.0, 0.1, -1.0]))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(["constant", "cosine", "step", "bogus"]), ints, ints, ints, ints,
           floats, ints, floats)
    def fuzz(schedule, step, total, spe, warmup, min_lr, step_size, gamma):
        try:
            f = _core.lr_factor(schedule, step, total, spe, warmup_steps=warmup,
                                min_lr_ratio=min_lr, step_size=step_size, gamma=gamma)
        except (ValueError, TypeError):
            return
        assert isinstance(f, float)
        # valid settings must give a finite factor in [0, 1] (with gamma <= 1)
        if (step >= 0 and total >= 1 and spe >= 1 and warmup >= 0 and step_size >= 1
                and 0.0 <= min_lr <= 1.0 and 0.0 < gamma <= 1.0):
            assert 0.0 <= f <= 1.0 + 1e-12, f

    fuzz()
    print("ok")
    """
)


def test_fuzz_lr_factor_subprocess():
    proc = subprocess.run([sys.executable, "-c", _LR_FACTOR_FUZZ], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (
        f"lr_factor fuzzing died with return code {proc.returncode} "
        f"(negative = killed by signal)\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(step_size=0), dict(step_size=-2)],
    ids=["step_size=0", "step_size=-2"],
)
def test_lr_factor_step_schedule_invalid_is_an_error_not_a_crash(kwargs):
    """Regression: lr_factor('step', ..., step_size=0) divided by zero (SIGFPE)."""
    args = dict(step=5, total=10, steps_per_epoch=1, step_size=1)
    args.update(kwargs)
    code = (
        "from pyft import _core\n"
        "try:\n"
        f"    _core.lr_factor('step', {args['step']}, {args['total']}, "
        f"{args['steps_per_epoch']}, step_size={args['step_size']})\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
        "else:\n"
        "    print('accepted')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"crashed with return code {proc.returncode}: {proc.stderr}"
    assert proc.stdout.startswith("ValueError"), proc.stdout
    assert "step_size" in proc.stdout


# ------------------------------------------------------------------------------------------
# estimator-level fuzzing (parameters through scikit-learn's conventions)

@st.composite
def estimator_case(draw):
    chaos = draw(chaos_levels)
    head = pick(draw, chaos, st.sampled_from(["linear", "mlp"]), st.just("x"))
    solver = pick(
        draw, chaos,
        st.sampled_from(["auto", "lbfgs", "sgd", "adamw"] if head == "linear"
                        else ["auto", "sgd", "adamw"]),
        st.sampled_from(["newton", "lbfgs"]),
    )
    momentum = pick(draw, chaos, unit(0.0, 0.95), weird_float)
    nesterov = pick(draw, chaos, st.just(False), st.booleans())
    if solver == "sgd" and momentum > 0 and draw(st.booleans()):
        nesterov = True
    params = dict(
        head=head,
        hidden_size=pick(draw, chaos, st.integers(1, 6), st.one_of(st.integers(-1, 0),
                                                                  st.just(2.0))),
        activation=pick(draw, chaos, st.sampled_from(["relu", "gelu"]), st.just("elu")),
        dropout=pick(draw, chaos, unit(0.0, 0.9), weird_float),
        solver=solver,
        C=pick(draw, chaos, unit(0.01, 100.0), weird_float),
        lr=pick(draw, chaos, st.none() | unit(1e-4, 0.5), weird_float),
        weight_decay=pick(draw, chaos, unit(), weird_float),
        momentum=momentum,
        nesterov=nesterov,
        beta1=pick(draw, chaos, unit(0.0, 0.99), weird_float),
        beta2=pick(draw, chaos, unit(0.0, 0.999), weird_float),
        eps=pick(draw, chaos, unit(1e-10, 1.0), weird_float),
        epochs=pick(draw, chaos, st.integers(1, 3), st.sampled_from([0, -1, 1.5, 2**64])),
        batch_size=pick(draw, chaos, st.integers(1, 9), st.sampled_from([0, -1, 2**40])),
        schedule=pick(draw, chaos, st.sampled_from(["constant", "cosine", "step"]),
                      st.just("exp")),
        warmup_epochs=pick(draw, chaos, unit(0.0, 2.0), weird_float),
        min_lr_ratio=pick(draw, chaos, unit(), weird_float),
        step_size=pick(draw, chaos, st.integers(1, 3), weird_int),
        gamma=pick(draw, chaos, unit(0.01, 1.0), weird_float),
        label_smoothing=pick(draw, chaos, unit(0.0, 0.9), weird_float),
        class_weight=pick(
            draw, chaos, st.sampled_from([None, "balanced", {0: 1.0, 1: 2.0}]),
            st.sampled_from(["x", {0: -1.0, 1: 1.0}, {0: 0.0, 1: 0.0}, {0: -1.0, 1: 0.5},
                             {5: 1.0}, [1, 2], {0: float("nan"), 1: 1.0}]),
        ),
        early_stopping=draw(st.booleans()),
        validation_fraction=pick(draw, chaos, unit(0.1, 0.5), weird_float),
        patience=pick(draw, chaos, st.integers(1, 3), st.integers(-1, 0)),
        min_delta=pick(draw, chaos, unit(), weird_float),
        max_iter=pick(draw, chaos, st.integers(1, 20), st.integers(-1, 0)),
        tol=pick(draw, chaos, unit(), weird_float),
        random_state=pick(
            draw, chaos, st.none() | st.integers(0, 2**31 - 1),
            st.sampled_from([-1, 2**70, "seed", 1.5, np.random.RandomState(0)]),
        ),
        n_threads=pick(draw, chaos, st.none() | st.integers(1, 3), st.integers(-1, 0)),
    )
    X, _ = draw(feature_arrays(chaos, max_rows=10))
    n = X.shape[0] if X.ndim >= 1 else 0
    y = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int64)
    if n >= 2:
        y[:2] = [0, 1]  # at least two classes
    labels = draw(st.sampled_from(["int", "str", "neg"]))
    if labels == "str":
        y = np.array(["a", "b", "c"])[y]
    elif labels == "neg":
        y = -5 * y
        if isinstance(params["class_weight"], dict):
            params["class_weight"] = None
    if X.ndim == 2 and X.dtype == np.int16 or X.dtype == np.uint16:
        X = X.view(np.uint16)
        if draw(st.booleans()):  # as a torch bfloat16 tensor
            import torch

            X = torch.from_numpy(X.view(np.int16).copy()).view(torch.bfloat16)
    return params, X, y


@FUZZ
@given(estimator_case())
def test_fuzz_estimator(case):
    params, X, y = case
    n = len(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            clf = HeadClassifier(**params).fit(X, y)
        except ALLOWED:
            return
        proba = clf.predict_proba(X)
        pred = clf.predict(X)
    k = len(clf.classes_)
    assert proba.shape == (n, k)
    assert pred.shape == (n,)
    assert set(pred.tolist()) <= set(clf.classes_.tolist())
