"""Bad input at the native API (pyft._core) and at HeadClassifier: clear ValueError/TypeError.

Every error names the argument and what was given. Non-contiguous, Fortran-ordered and
negatively strided arrays are not errors: they give the same result as C-contiguous copies.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from pyft import HeadClassifier, _core, init_head_params

N, D, C, H = 24, 5, 3, 4


@pytest.fixture
def X():
    return np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)


@pytest.fixture
def y():
    return (np.arange(N) % C).astype(np.int64)


def lin():
    return init_head_params("linear", D, C)


def mlp():
    return init_head_params("mlp", D, C, H)


# Native entry points that take (params, features, labels); predict takes no labels.
TRAINERS = {
    "train_head": lambda p, X, y, **kw: _core.train_head(p, X, y, num_classes=C, epochs=1, **kw),
    "train_head_lbfgs": lambda p, X, y, **kw: _core.train_head_lbfgs(
        p, X, y, num_classes=C, max_iter=3, **kw
    ),
    "objective": lambda p, X, y, **kw: _core.objective(p, X, y, num_classes=C, **kw),
}
ALL = dict(TRAINERS)
ALL["predict"] = lambda p, X, y, **kw: _core.predict(p, X, num_classes=C, **kw)


@pytest.fixture(params=sorted(TRAINERS))
def trainer(request):
    return TRAINERS[request.param]


@pytest.fixture(params=sorted(ALL))
def native(request):
    return ALL[request.param]


# ============================================================================================
# native API: shapes


def test_native_labels_length_mismatch(trainer, X, y):
    with pytest.raises(ValueError,
                       match=r"labels must have one entry per feature row \(24\); got 10"):
        trainer(lin(), X, y[:10])


def test_native_params_length_mismatch(native, X, y):
    with pytest.raises(ValueError, match=r"params must have 18 entries for this head; got 17"):
        native(lin()[:-1], X, y)
    with pytest.raises(ValueError, match=r"params must have 18 entries.*got 19"):
        native(np.r_[lin(), np.float32(0)], X, y)


def test_native_params_length_mismatch_mlp(X, y):
    with pytest.raises(ValueError, match="params must have"):
        _core.train_head(lin(), X, y, head="mlp", hidden_size=H, num_classes=C)
    with pytest.raises(ValueError, match="params must have"):
        _core.predict(mlp(), X, head="mlp", hidden_size=H + 1, num_classes=C)


def test_native_features_columns_vs_params(native, X, y):
    # params built for D columns, features with D + 1 columns
    Xw = np.random.default_rng(1).normal(size=(N, D + 1)).astype(np.float32)
    with pytest.raises(ValueError, match="params must have"):
        native(lin(), Xw, y)


def test_native_val_features_wrong_columns(X, y):
    with pytest.raises(ValueError, match=r"val_features must have 5 columns.*got 4"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X[:, :4], val_labels=y)


def test_native_val_labels_length(X, y):
    with pytest.raises(ValueError, match=r"val_labels must have one entry per feature row.*got 3"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X, val_labels=y[:3])


def test_native_val_given_alone(X, y):
    with pytest.raises(ValueError, match="val_features and val_labels must be given together"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X)
    with pytest.raises(ValueError, match="val_features and val_labels must be given together"):
        _core.train_head(lin(), X, y, num_classes=C, val_labels=y)


@pytest.mark.parametrize("shape", [(N,), (1, N, D), (N, D, 1)])
def test_native_features_not_2d(native, y, shape):
    Xb = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"features must be a 2-D array.*got {len(shape)} dim"):
        native(lin(), Xb, y)


def test_native_labels_not_1d(trainer, X, y):
    with pytest.raises(ValueError, match=r"labels must be a 1-D array; got 2 dim"):
        trainer(lin(), X, y[:, None])


def test_native_empty_rows(native, X, y):
    with pytest.raises(ValueError, match=r"features must have at least 1 row.*\(0, 5\)"):
        native(lin(), X[:0], y[:0])


def test_native_empty_columns(native, X, y):
    with pytest.raises(ValueError, match=r"features must have at least 1 column; got 0"):
        native(np.zeros(C, np.float32), X[:, :0], y)


def test_native_empty_val(X, y):
    with pytest.raises(ValueError, match=r"val_features must have at least 1 row"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X[:0], val_labels=y[:0])


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_native_num_classes(num_classes, X):
    p = np.zeros(max(num_classes, 0) * (D + 1), np.float32)
    with pytest.raises(ValueError, match=rf"num_classes must be >= 2; got {num_classes}"):
        _core.train_head(p, X, np.zeros(N, np.int64), num_classes=num_classes)
    with pytest.raises(ValueError, match="num_classes"):
        _core.predict(p, X, num_classes=num_classes)


@pytest.mark.parametrize("hidden", [0, -1])
def test_native_hidden_size(hidden, X, y):
    with pytest.raises(ValueError, match=rf"hidden_size must be >= 1.*got {hidden}"):
        _core.train_head(mlp(), X, y, head="mlp", hidden_size=hidden, num_classes=C)
    with pytest.raises(ValueError, match="hidden_size"):
        _core.predict(mlp(), X, head="mlp", hidden_size=hidden, num_classes=C)


# ============================================================================================
# native API: labels


@pytest.mark.parametrize("bad, index", [(3, 7), (-1, 4), (10**12, 0), (C, N - 1)])
def test_native_labels_out_of_range(trainer, X, y, bad, index):
    yb = y.copy()
    yb[index] = bad
    with pytest.raises(ValueError,
                       match=rf"labels must be in \[0, 3\); got {bad} at index {index}"):
        trainer(lin(), X, yb)


def test_native_val_labels_out_of_range(X, y):
    yb = y.copy()
    yb[5] = 9
    with pytest.raises(ValueError, match=r"val_labels must be in \[0, 3\); got 9 at index 5"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X, val_labels=yb)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint32, np.uint64])
def test_native_labels_any_int_dtype(trainer, X, y, dtype):
    trainer(lin(), X, y.astype(dtype))


def test_native_labels_huge_uint64(trainer, X, y):
    yb = y.astype(np.uint64)
    yb[2] = 2**63 + 5
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got .* at index 2"):
        trainer(lin(), X, yb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.complex64, object])
def test_native_labels_not_integer(trainer, X, y, dtype):
    with pytest.raises(ValueError, match=r"labels must be an integer array of class indices; got"):
        trainer(lin(), X, y.astype(dtype))


def test_native_labels_strings(trainer, X, y):
    with pytest.raises(ValueError, match="labels must be an integer array"):
        trainer(lin(), X, np.array(["a"] * N))


def test_native_labels_not_array(trainer, X, y):
    with pytest.raises(TypeError):
        trainer(lin(), X, y.tolist())


def test_native_train_rows(X, y):
    with pytest.raises(ValueError, match=r"train_rows must be in \[0, 24\); got 30 at index 1"):
        _core.train_head(lin(), X, y, num_classes=C, train_rows=np.array([0, 30]))
    with pytest.raises(ValueError, match=r"train_rows must be in \[0, 24\); got -1 at index 0"):
        _core.train_head(lin(), X, y, num_classes=C, train_rows=np.array([-1]))
    with pytest.raises(ValueError, match=r"train_rows must select at least 1 row"):
        _core.train_head(lin(), X, y, num_classes=C, train_rows=np.array([], np.int64))
    with pytest.raises(ValueError, match=r"train_rows must be a 1-D integer array.*float64"):
        _core.train_head(lin(), X, y, num_classes=C, train_rows=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"train_rows must be a 1-D integer array.*2-D"):
        _core.train_head(lin(), X, y, num_classes=C, train_rows=np.zeros((2, 2), np.int64))


# ============================================================================================
# native API: features values and dtypes


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_native_nonfinite_features(native, X, y, value, dtype):
    Xb = X.astype(dtype)
    Xb[6, 2] = value
    with pytest.raises(ValueError, match=r"features must be finite; found NaN or infinity "
                                         r"at row 6, column 2"):
        native(lin(), Xb, y)


def test_native_nonfinite_features_bfloat16(X, y):
    bits = (X.view(np.uint32) >> 16).astype(np.uint16)
    bits[11, 4] = 0x7FC0  # bfloat16 NaN
    with pytest.raises(ValueError, match=r"features must be finite.*row 11, column 4"):
        _core.train_head(lin(), bits, y, num_classes=C, bfloat16=True)
    with pytest.raises(ValueError, match=r"features must be finite.*row 11, column 4"):
        _core.predict(lin(), bits, num_classes=C, bfloat16=True)


def test_native_nonfinite_val_features(X, y):
    Xv = X.copy()
    Xv[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"val_features must be finite.*row 3, column 0"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=Xv, val_labels=y)


def test_native_nonfinite_first_row_reported(X, y):
    Xb = X.copy()
    Xb[20, 1] = np.nan
    Xb[9, 3] = np.nan
    with pytest.raises(ValueError, match=r"row 9, column 3"):
        _core.predict(lin(), Xb, num_classes=C)


@pytest.mark.parametrize(
    "dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.bool_, np.complex64,
              np.complex128, object, "U3", np.longdouble],
)
def test_native_unsupported_feature_dtype(native, X, y, dtype):
    if np.dtype(dtype) == np.dtype(np.float64):  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    Xb = X.astype(dtype)
    with pytest.raises(ValueError, match=rf"features must be float32, float16, bfloat16 or "
                                         rf"float64; got {re.escape(str(Xb.dtype))}"):
        native(lin(), Xb, y)


def test_native_val_features_unsupported_dtype(X, y):
    with pytest.raises(ValueError, match=r"val_features must be float32.*got int8"):
        _core.train_head(lin(), X, y, num_classes=C, val_features=X.astype(np.int8), val_labels=y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.uint8, np.float64])
def test_native_bfloat16_flag_needs_16bit(native, X, y, dtype):
    with pytest.raises(ValueError, match=rf"features with bfloat16=True must hold 16-bit"
                                         rf".*got {np.dtype(dtype)}"):
        native(lin(), X.astype(dtype), y, bfloat16=True)


def test_native_features_not_array(native, X, y):
    with pytest.raises(TypeError):
        native(lin(), X.tolist(), y)
    with pytest.raises(TypeError):
        native(lin(), None, y)


# ============================================================================================
# native API: params


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_native_params_not_float32(native, X, y, dtype):
    with pytest.raises(ValueError,
                       match=rf"params must be a 1-D float32 array; got 1-D {np.dtype(dtype)}"):
        native(lin().astype(dtype), X, y)


def test_native_params_not_1d(native, X, y):
    with pytest.raises(ValueError, match=r"params must be a 1-D float32 array; got 2-D float32"):
        native(lin()[None], X, y)


def test_native_params_not_array(native, X, y):
    with pytest.raises(TypeError):
        native(lin().tolist(), X, y)


@pytest.mark.parametrize("name", ["train_head", "train_head_lbfgs"])
def test_native_params_readonly_rejected_by_trainers(name, X, y):
    p = lin()
    p.flags.writeable = False
    with pytest.raises(ValueError, match="params must be .*writeable"):
        TRAINERS[name](p, X, y)


def test_native_params_noncontiguous_rejected_by_trainers(trainer, X, y):
    p = np.repeat(lin(), 2)[::2]
    with pytest.raises(ValueError, match="params must be C-contiguous"):
        _core.train_head(p, X, y, num_classes=C)


@pytest.mark.parametrize("name", ["predict", "objective"])
def test_native_params_readonly_accepted_for_inference(name, X, y):
    """predict/objective only read params: a read-only array (joblib mmap_mode='r', a model
    loaded from a read-only memmap) must work and give the same result."""
    p = lin()
    expected = ALL[name](p, X, y)
    ro = p.copy()
    ro.flags.writeable = False
    got = ALL[name](ro, X, y)
    if name == "objective":
        assert got[0] == expected[0]
        np.testing.assert_array_equal(got[1], expected[1])
    else:
        np.testing.assert_array_equal(got, expected)


# ============================================================================================
# native API: hyperparameters


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(batch_size=0), r"batch_size must be >= 1; got 0"),
        (dict(batch_size=-5), r"batch_size must be >= 1; got -5"),
        (dict(lr=0.0), r"lr must be a positive number; got 0"),
        (dict(lr=-1e-3), r"lr must be a positive number; got -0.001"),
        (dict(lr=float("nan")), r"lr must be a positive number; got nan"),
        (dict(lr=float("inf")), r"lr must be a positive number; got inf"),
        (dict(epochs=0), r"epochs must be >= 1; got 0"),
        (dict(epochs=-2), r"epochs must be >= 1; got -2"),
        (dict(weight_decay=-1.0), r"weight_decay must be >= 0; got -1"),
        (dict(weight_decay=float("nan")), r"weight_decay"),
        (dict(optimizer="sgd", momentum=1.0), r"momentum must be in \[0, 1\); got 1"),
        (dict(optimizer="sgd", momentum=-0.1), r"momentum must be in \[0, 1\); got -0.1"),
        (dict(optimizer="sgd", dampening=2.0), r"dampening must be in \[0, 1\]; got 2"),
        (dict(optimizer="sgd", nesterov=True), r"nesterov=True needs momentum > 0.*momentum=0"),
        (dict(optimizer="sgd", nesterov=True, momentum=0.9, dampening=0.5),
         r"nesterov=True needs .*dampening == 0.*dampening=0.5"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\); got 1"),
        (dict(beta2=-0.5), r"beta2 must be in \[0, 1\); got -0.5"),
        (dict(eps=0.0), r"eps must be > 0; got 0"),
        (dict(eps=float("nan")), r"eps must be > 0; got nan"),
        (dict(warmup_steps=-1), r"warmup_steps must be >= 0; got -1"),
        (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]; got 1.5"),
        (dict(step_size=0), r"step_size must be >= 1; got 0"),
        (dict(gamma=0.0), r"gamma must be > 0; got 0"),
        (dict(gamma=float("nan")), r"gamma must be > 0; got nan"),
        (dict(patience=-1), r"patience must be >= 0; got -1"),
        (dict(patience=3), r"patience=3 \(early stopping\) needs a validation set"),
        (dict(min_delta=-0.1), r"min_delta must be >= 0; got -0.1"),
        (dict(min_delta=float("nan")), r"min_delta must be >= 0; got nan"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\); got 1"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\); got -0.1"),
        (dict(label_smoothing=float("nan")), r"label_smoothing must be in \[0, 1\); got nan"),
    ],
)
def test_native_train_head_hyperparameters(X, y, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _core.train_head(lin(), X, y, num_classes=C, **kwargs)


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1, float("nan")])
def test_native_dropout(X, y, dropout):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got"):
        _core.train_head(mlp(), X, y, head="mlp", hidden_size=H, num_classes=C, dropout=dropout)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(l2=-1.0), r"l2 must be a finite number >= 0; got -1"),
        (dict(l2=float("inf")), r"l2 must be a finite number >= 0; got inf"),
        (dict(max_iter=0), r"max_iter must be >= 1; got 0"),
        (dict(tol=-1.0), r"tol must be >= 0; got -1"),
        (dict(ftol=float("nan")), r"ftol must be >= 0; got nan"),
        (dict(history=-1), r"history must be >= 0 \(0: automatic\); got -1"),
        (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\); got 1.5"),
    ],
)
def test_native_lbfgs_hyperparameters(X, y, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _core.train_head_lbfgs(lin(), X, y, num_classes=C, **kwargs)


def test_native_objective_l2(X, y):
    with pytest.raises(ValueError, match=r"l2 must be a finite number >= 0; got -2"):
        _core.objective(lin(), X, y, num_classes=C, l2=-2.0)


@pytest.mark.parametrize(
    "fn, kwarg, allowed",
    [
        ("train_head", "head", "'linear' or 'mlp'"),
        ("train_head", "optimizer", "'sgd' or 'adamw'"),
        ("train_head", "schedule", "'constant', 'cosine' or 'step'"),
        ("train_head", "activation", "'relu' or 'gelu'"),
        ("train_head", "kernel", "'auto', 'blas' or 'fused'"),
        ("train_head_lbfgs", "kernel", "'auto', 'blas' or 'fused'"),
        ("objective", "head", "'linear' or 'mlp'"),
        ("objective", "activation", "'relu' or 'gelu'"),
        ("objective", "kernel", "'auto', 'blas' or 'fused'"),
        ("predict", "head", "'linear' or 'mlp'"),
        ("predict", "activation", "'relu' or 'gelu'"),
        ("predict", "output", "'logits', 'proba' or 'labels'"),
    ],
)
@pytest.mark.parametrize("value", ["bogus", "", "Linear"])
def test_native_bad_enum_strings(X, y, fn, kwarg, allowed, value):
    with pytest.raises(ValueError, match=rf"{kwarg} must be {re.escape(allowed)}; got '{value}'"):
        ALL[fn](lin(), X, y, **{kwarg: value})


def test_native_enum_not_string(X, y):
    with pytest.raises(TypeError):
        _core.train_head(lin(), X, y, num_classes=C, optimizer=3)


def test_native_lr_factor_bad_schedule():
    with pytest.raises(ValueError,
                       match=r"schedule must be 'constant', 'cosine' or 'step'; got 'x'"):
        _core.lr_factor("x", 0, 10, 1)


def test_native_epoch_permutation_negative():
    with pytest.raises(ValueError, match=r"n must be >= 0; got -1"):
        _core.epoch_permutation(-1, 0, 0)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_native_seed_out_of_range(X, y, seed):
    with pytest.raises(TypeError):
        _core.train_head(lin(), X, y, num_classes=C, seed=seed)


# ============================================================================================
# native API: class weights


@pytest.mark.parametrize(
    "weights, pattern",
    [
        (np.ones(2), r"class_weights must be a 1-D array of 3 weights; got .*2 entries"),
        (np.ones(4), r"class_weights must be a 1-D array of 3 weights; got .*4 entries"),
        (np.ones((3, 1)), r"class_weights must be a 1-D array of 3 weights; got .*2 dims"),
        (np.array([1.0, -1.0, 1.0]), r"class_weights must be finite and >= 0; got -1 for class 1"),
        (np.array([1.0, 1.0, np.nan]),
         r"class_weights must be finite and >= 0; got nan for class 2"),
        (np.array([np.inf, 1.0, 1.0]),
         r"class_weights must be finite and >= 0; got inf for class 0"),
        (np.zeros(3), r"class_weights must not all be zero"),
        (np.array(["a", "b", "c"]), r"class_weights must be numeric; got <U1"),
    ],
)
def test_native_class_weights(trainer, X, y, weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        trainer(lin(), X, y, class_weights=weights)


def test_native_class_weights_zero_for_present_class(X, y):
    with pytest.raises(ValueError,
                       match=r"class_weights must be > 0 for every class present.*class 1"):
        _core.train_head(lin(), X, y, num_classes=C, class_weights=np.array([1.0, 0.0, 1.0]))


def test_native_class_weights_int_ok(trainer, X, y):
    trainer(lin(), X, y, class_weights=np.array([1, 2, 3]))


# ============================================================================================
# native API: layouts are accepted and give the same results


def _layouts(X):
    """(name, array with the values of X) pairs in non-C-contiguous layouts."""
    big = np.zeros((2 * X.shape[0], 3 * X.shape[1]), X.dtype)
    big[::2, ::3] = X
    rev = np.ascontiguousarray(X[::-1, ::-1])[::-1, ::-1]
    return [
        ("fortran", np.asfortranarray(X)),
        ("strided", big[::2, ::3]),
        ("reversed", rev),
        ("transposed", np.ascontiguousarray(X.T).T),
        ("column-slice", np.concatenate([X, X], axis=1)[:, :X.shape[1]]),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("layout", range(5))
def test_native_layouts_same_result(X, y, dtype, layout):
    Xd = X.astype(dtype)
    name, Xl = _layouts(Xd)[layout]
    assert not Xl.flags.c_contiguous, name
    np.testing.assert_array_equal(Xl, Xd)

    def run_train(F):
        p = lin()
        _core.train_head(p, F, y, num_classes=C, epochs=3, batch_size=8, n_threads=1)
        return p

    def run_lbfgs(F):
        p = lin()
        _core.train_head_lbfgs(p, F, y, num_classes=C, max_iter=20, n_threads=1)
        return p

    def run_mlp(F):
        p = mlp()
        _core.train_head(p, F, y, head="mlp", hidden_size=H, num_classes=C, epochs=3,
                         batch_size=8, n_threads=1)
        return p

    for run in (run_train, run_lbfgs, run_mlp):
        np.testing.assert_allclose(run(Xl), run(Xd), rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(
        _core.predict(lin(), Xl, num_classes=C, output="proba"),
        _core.predict(lin(), Xd, num_classes=C, output="proba"),
    )
    f1, g1 = _core.objective(lin(), Xl, y, num_classes=C)
    f2, g2 = _core.objective(lin(), Xd, y, num_classes=C)
    assert f1 == pytest.approx(f2, rel=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_native_strided_bfloat16_and_labels(X, y):
    bits = (X.view(np.uint32) >> 16).astype(np.uint16)
    strided_bits = np.asfortranarray(bits)
    strided_y = np.repeat(y, 2)[::2]  # non-contiguous labels
    p1, p2 = lin(), lin()
    _core.train_head(p1, strided_bits, strided_y, num_classes=C, bfloat16=True, epochs=2)
    _core.train_head(p2, bits, y, num_classes=C, bfloat16=True, epochs=2)
    np.testing.assert_allclose(p1, p2, rtol=1e-6, atol=1e-7)
    # int16 bit patterns are accepted as well
    p3 = lin()
    _core.train_head(p3, bits.view(np.int16), y, num_classes=C, bfloat16=True, epochs=2)
    np.testing.assert_allclose(p3, p2, rtol=1e-6, atol=1e-7)


def test_native_zero_stride_features(y):
    row = np.arange(D, dtype=np.float32)
    Xb = np.broadcast_to(row, (N, D))  # row stride 0, read-only
    p1, p2 = lin(), lin()
    _core.train_head(p1, Xb, y, num_classes=C, epochs=2)
    _core.train_head(p2, np.ascontiguousarray(Xb), y, num_classes=C, epochs=2)
    np.testing.assert_allclose(p1, p2, rtol=1e-6, atol=1e-7)


# ============================================================================================
# estimator


A = dict(solver="adamw", epochs=2, random_state=0)


def test_est_y_length_mismatch(X, y):
    with pytest.raises(ValueError, match=r"y must have one label per sample \(24\); got 10"):
        HeadClassifier().fit(X, y[:10])


def test_est_predict_wrong_columns(X, y):
    clf = HeadClassifier(random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"X has 4 features, but HeadClassifier is expecting 5"):
        clf.predict(X[:, :4])


def test_est_val_wrong_columns(X, y):
    with pytest.raises(ValueError, match=r"X has 4 features.*expecting 5"):
        HeadClassifier(**A).fit(X, y, X_val=X[:, :4], y_val=y)


def test_est_val_labels_unknown(X, y):
    yv = y.copy()
    yv[3] = 42
    with pytest.raises(ValueError, match=r"y_val contains label 42 not seen in y"):
        HeadClassifier(**A).fit(X, y, X_val=X, y_val=yv)


def test_est_val_labels_length(X, y):
    with pytest.raises(ValueError, match=r"y_val must have one label per sample"):
        HeadClassifier(**A).fit(X, y, X_val=X, y_val=y[:5])


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_est_nonfinite_features(X, y, solver, value):
    Xb = X.copy()
    Xb[6, 2] = value
    with pytest.raises(ValueError, match=r"NaN or infinity at row 6"):
        HeadClassifier(solver=solver, epochs=2).fit(Xb, y)
    clf = HeadClassifier(solver=solver, epochs=2).fit(X, y)
    with pytest.raises(ValueError, match=r"NaN or infinity at row 6"):
        clf.predict(Xb)


def test_est_nonfinite_val_features(X, y):
    Xv = X.copy()
    Xv[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"val_features must be finite.*row 2"):
        HeadClassifier(**A).fit(X, y, X_val=Xv, y_val=y)


def test_est_nonfinite_labels(X, y):
    with pytest.raises(ValueError, match=r"y contains NaN or infinity"):
        HeadClassifier().fit(X, np.where(y == 1, np.nan, y))


def test_est_empty(X, y):
    with pytest.raises(ValueError, match=r"0 sample"):
        HeadClassifier().fit(X[:0], y[:0])
    clf = HeadClassifier(random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"0 sample"):
        clf.predict(X[:0])


def test_est_zero_features(X, y):
    with pytest.raises(ValueError, match=r"0 feature"):
        HeadClassifier().fit(X[:, :0], y)


@pytest.mark.parametrize("labels", [np.zeros(N), np.array(["a"] * N), np.full(N, -3)])
def test_est_one_class(X, labels):
    with pytest.raises(ValueError, match=r"at least 2 classes.*got 1 class"):
        HeadClassifier().fit(X, labels)


def test_est_y_none_and_2d(X, y):
    with pytest.raises(ValueError, match=r"requires y to be passed"):
        HeadClassifier().fit(X, None)
    with pytest.raises(ValueError, match=r"1d array"):
        HeadClassifier().fit(X, np.stack([y, y], axis=1))


def test_est_continuous_labels(X):
    with pytest.raises(ValueError, match=r"Unknown label type"):
        HeadClassifier().fit(X, np.linspace(0, 1, N))


def test_est_complex_features(X, y):
    with pytest.raises(ValueError, match=r"[Cc]omplex"):
        HeadClassifier().fit(X.astype(np.complex64), y)


@pytest.mark.parametrize("dtype", [object, "U3"])
def test_est_string_features(X, y, dtype):
    Xs = np.full((N, D), "abc", dtype=dtype)
    with pytest.raises(ValueError, match=r"could not convert string to float"):
        HeadClassifier().fit(Xs, y)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64, np.bool_, object])
def test_est_numeric_dtypes_converted(X, y, dtype):
    Xd = (X * 3).astype(dtype)
    ref = HeadClassifier(random_state=0).fit(np.asarray(Xd, dtype=np.float64), y)
    clf = HeadClassifier(random_state=0).fit(Xd, y)
    np.testing.assert_allclose(clf.params_, ref.params_, rtol=1e-4, atol=1e-5)


def test_est_sparse_rejected(X, y):
    sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match=r"[Ss]parse"):
        HeadClassifier().fit(sparse.csr_matrix(X), y)


@pytest.mark.parametrize("shape", [(N,), (1, N, D)])
def test_est_features_wrong_ndim(y, shape):
    Xb = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"(2D|dim 3)"):
        HeadClassifier().fit(Xb, y)


@pytest.mark.parametrize(
    "params, exc, pattern",
    [
        (dict(batch_size=0), ValueError, r"batch_size must be >= 1; got 0"),
        (dict(batch_size=-4), ValueError, r"batch_size must be >= 1; got -4"),
        (dict(batch_size=2.5), TypeError, r"batch_size must be an integer; got 2.5"),
        (dict(lr=0.0), ValueError, r"lr must be > 0.0; got 0.0"),
        (dict(lr=-1.0), ValueError, r"lr must be > 0.0; got -1.0"),
        (dict(lr=float("nan")), ValueError, r"lr must be finite; got nan"),
        (dict(lr="fast"), TypeError, r"lr must be a number; got 'fast'"),
        (dict(epochs=0), ValueError, r"epochs must be >= 1; got 0"),
        (dict(epochs=-1), ValueError, r"epochs must be >= 1; got -1"),
        (dict(epochs=3.0), TypeError, r"epochs must be an integer; got 3.0"),
        (dict(head="conv"), ValueError, r"head must be one of 'linear', 'mlp'; got 'conv'"),
        (dict(solver="adam"), ValueError, r"solver must be one of .*; got 'adam'"),
        (dict(schedule="linear"), ValueError, r"schedule must be one of .*; got 'linear'"),
        (dict(head="mlp", activation="tanh"), ValueError,
         r"activation must be one of 'relu', 'gelu'; got 'tanh'"),
        (dict(head="mlp", solver="lbfgs"), ValueError, r"solver='lbfgs' trains the linear head"),
        (dict(head="mlp", hidden_size=0), ValueError, r"hidden_size must be >= 1; got 0"),
        (dict(head="mlp", dropout=1.0), ValueError, r"dropout must be < 1; got 1.0"),
        (dict(head="mlp", dropout=-0.1), ValueError, r"dropout must be >= 0.0; got -0.1"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be < 1; got 1.0"),
        (dict(label_smoothing=-0.2), ValueError, r"label_smoothing must be >= 0.0; got -0.2"),
        (dict(C=0.0), ValueError, r"C must be > 0.0; got 0.0"),
        (dict(weight_decay=-1.0), ValueError, r"weight_decay must be >= 0.0; got -1.0"),
        (dict(momentum=-0.5), ValueError, r"momentum must be >= 0.0; got -0.5"),
        (dict(validation_fraction=0.0), ValueError, r"validation_fraction must be > 0.0"),
        (dict(validation_fraction=1.0), ValueError, r"validation_fraction must be < 1"),
        (dict(patience=0), ValueError, r"patience must be >= 1; got 0"),
        (dict(max_iter=0), ValueError, r"max_iter must be >= 1; got 0"),
        (dict(tol=-1.0), ValueError, r"tol must be >= 0.0; got -1.0"),
        (dict(n_threads=0), ValueError, r"n_threads must be >= 1; got 0"),
        (dict(callback="print"), TypeError, r"callback must be callable; got str"),
        (dict(class_weight="heavy"), ValueError,
         r"class_weight must be a dict, 'balanced' or None"),
        (dict(class_weight=[1, 2, 3]), TypeError,
         r"class_weight must be a dict, 'balanced' or None"),
        (dict(class_weight={7: 1.0}), ValueError, r"class_weight"),
    ],
)
def test_est_bad_hyperparameters(X, y, params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        HeadClassifier(**params).fit(X, y)


@pytest.mark.parametrize(
    "params, pattern",
    [
        (dict(solver="sgd", momentum=1.0), r"momentum must be in \[0, 1\); got 1"),
        (dict(solver="sgd", momentum=0.0, nesterov=True), r"nesterov=True needs momentum > 0"),
        (dict(solver="adamw", beta1=1.0), r"beta1 must be in \[0, 1\); got 1"),
        (dict(solver="adamw", beta2=-0.1), r"beta2 must be in \[0, 1\); got -0.1"),
        (dict(solver="adamw", eps=0.0), r"eps must be > 0; got 0"),
        (dict(solver="adamw", min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\]; got 2"),
        (dict(solver="adamw", schedule="step", step_size=0), r"step_size must be >= 1; got 0"),
        (dict(solver="adamw", schedule="step", gamma=0.0), r"gamma must be > 0; got 0"),
        (dict(solver="adamw", min_delta=-1.0), r"min_delta must be >= 0; got -1"),
    ],
)
def test_est_bad_optimizer_settings(X, y, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        HeadClassifier(epochs=2, **params).fit(X, y)


def test_est_nesterov_ignored_by_adamw(X, y):
    """nesterov is an SGD option (like momentum, which adamw ignores); it must not make an
    AdamW fit fail."""
    a = HeadClassifier(**A, nesterov=True).fit(X, y)
    b = HeadClassifier(**A).fit(X, y)
    np.testing.assert_array_equal(a.params_, b.params_)


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
@pytest.mark.parametrize(
    "cw, pattern",
    [
        ({0: -1.0, 1: 1.0, 2: 1.0}, r"class_weight.*(>= 0|negative|-1)"),
        ({0: -1.0, 1: 0.5, 2: 0.5}, r"class_weight.*(>= 0|negative|-1)"),  # weights sum to 0
        ({0: 0.0, 1: 0.0, 2: 0.0}, r"class_weight.*zero"),
        ({0: np.nan, 1: 1.0, 2: 1.0}, r"class_weight.*(finite|nan)"),
    ],
)
def test_est_bad_class_weight_values(X, y, solver, cw, pattern):
    with pytest.raises(ValueError, match=pattern):
        HeadClassifier(solver=solver, epochs=2, class_weight=cw).fit(X, y)


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_est_random_state_instance(X, y, solver):
    """scikit-learn estimators accept a RandomState instance as random_state."""
    clf = HeadClassifier(solver=solver, epochs=2, random_state=np.random.RandomState(0)).fit(X, y)
    assert clf.score(X, y) > 0.3


@pytest.mark.parametrize("random_state", ["seed", -1, 2**70, 1.5])
def test_est_bad_random_state(X, y, random_state):
    with pytest.raises((ValueError, TypeError)):
        HeadClassifier(**{**A, "random_state": random_state}).fit(X, y)


def test_est_unfitted(X):
    from sklearn.exceptions import NotFittedError

    clf = HeadClassifier()
    for method in ("predict", "predict_proba", "decision_function", "predict_log_proba"):
        with pytest.raises(NotFittedError):
            getattr(clf, method)(X)


def test_est_early_stopping_no_training_data(X, y):
    with pytest.raises(ValueError, match=r"validation_fraction=0.99 leaves no training data"):
        HeadClassifier(**A, early_stopping=True, validation_fraction=0.99).fit(X, y)


def test_est_val_given_alone(X, y):
    with pytest.raises(ValueError, match=r"X_val and y_val must be given together"):
        HeadClassifier(**A).fit(X, y, y_val=y)


@pytest.mark.parametrize("layout", range(5))
@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_est_layouts_same_result(X, y, layout, solver):
    name, Xl = _layouts(X)[layout]
    a = HeadClassifier(solver=solver, epochs=3, random_state=0, n_threads=1).fit(Xl, y)
    b = HeadClassifier(solver=solver, epochs=3, random_state=0, n_threads=1).fit(X, y)
    np.testing.assert_allclose(a.params_, b.params_, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(b.predict_proba(Xl), b.predict_proba(X))


torch = pytest.importorskip("torch")


def test_est_torch_bad_inputs(X, y):
    t = torch.from_numpy(X)
    with pytest.raises(ValueError, match=r"features must be a 2-D array.*\(24,\)"):
        HeadClassifier().fit(t[:, 0].contiguous(), y)
    with pytest.raises(ValueError, match=r"features must be a 2-D array.*\(1, 24, 5\)"):
        HeadClassifier().fit(t[None], y)
    with pytest.raises(TypeError, match=r"features must hold real numbers.*complex64"):
        HeadClassifier().fit(t.to(torch.complex64), y)
    with pytest.raises(ValueError, match=r"0 sample"):
        HeadClassifier().fit(t[:0], y[:0])
    with pytest.raises(ValueError, match=r"features must be on the CPU.*meta"):
        HeadClassifier().fit(t.to("meta"), y)
    tn = t.clone()
    tn[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinity at row 4"):
        HeadClassifier().fit(tn, y)
    with pytest.raises(ValueError, match=r"NaN or infinity at row 4"):
        HeadClassifier().fit(tn.to(torch.bfloat16), y)


def test_est_torch_zero_features(X, y):
    t = torch.zeros((N, 0))
    with pytest.raises(ValueError, match=r"0 feature"):
        HeadClassifier().fit(t, y)
    with pytest.raises(ValueError, match=r"0 feature"):
        HeadClassifier().fit(t.to(torch.bfloat16), y)


def test_est_torch_strided(X, y):
    t = torch.from_numpy(np.asfortranarray(X))
    assert not t.is_contiguous()
    a = HeadClassifier(random_state=0, n_threads=1).fit(t, y)
    b = HeadClassifier(random_state=0, n_threads=1).fit(X, y)
    np.testing.assert_allclose(a.params_, b.params_, rtol=1e-6, atol=1e-7)


def test_est_unfitted_torch(X):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        HeadClassifier().predict(torch.from_numpy(X))


def test_optimizer_step_names_bad_buffers():
    p = np.zeros(8, np.float32)  # linear head, 3 features, 2 classes
    g, m = np.ones(8, np.float32), np.zeros(8, np.float32)
    kw = dict(step=1, in_features=3, num_classes=2, lr=0.1)
    with pytest.raises(ValueError, match="grad must have 8 entries"):
        _core.optimizer_step(p, g[:5], m, **kw)
    with pytest.raises(ValueError, match="second-moment buffer v"):
        _core.optimizer_step(p, g, m, optimizer="adamw", **kw)
    with pytest.raises(ValueError, match="step must be >= 1"):
        _core.optimizer_step(p, g, m, **dict(kw, step=0))
    with pytest.raises(ValueError, match="optimizer must be"):
        _core.optimizer_step(p, g, m, optimizer="lamb", **kw)
    # Weight decay reaches the weights only: with a zero gradient, only W moves.
    p[:] = 1.0
    _core.optimizer_step(p, np.zeros(8, np.float32), m, weight_decay=0.5, **kw)
    np.testing.assert_allclose(p, [0.95] * 6 + [1.0] * 2)
