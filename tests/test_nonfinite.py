"""Non-finite features are found lazily (from non-finite pre-activations) and reported exactly;
finite features with diverging weights are not an input error."""

import numpy as np
import pytest

import pyft
from pyft import _core

N, D, C, H = 300, 12, 3, 16


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D), dtype=np.float32)
    y = rng.integers(0, C, N)
    return X, y


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_relu_cannot_hide_nan(data, activation):
    # ReLU maps NaN pre-activations to 0 in many implementations; the check runs before it.
    X, y = data
    X = X.copy()
    X[77, 5] = np.nan
    p = pyft.init_head_params("mlp", D, C, H)
    msg = r"features must be finite; found NaN or infinity at row 77, column 5"
    with pytest.raises(ValueError, match=msg):
        _core.train_head(p, X, y, head="mlp", num_classes=C, hidden_size=H,
                         activation=activation, epochs=2)
    with pytest.raises(ValueError, match=msg):
        _core.predict(p, X, head="mlp", num_classes=C, hidden_size=H, activation=activation)
    with pytest.raises(ValueError, match=msg):
        _core.objective(p, X, y, head="mlp", num_classes=C, hidden_size=H, activation=activation)


@pytest.mark.parametrize("kernel", ["fused", "blas"])
def test_lowest_bad_row_reported_whatever_the_batch_order(data, kernel):
    X, y = data
    X = X.copy()
    X[250, 1] = np.inf
    X[40, 7] = -np.inf
    p = pyft.init_head_params("linear", D, C)
    for seed in range(3):
        with pytest.raises(ValueError, match=r"row 40, column 7"):
            _core.train_head(p, X, y, num_classes=C, batch_size=16, seed=seed, kernel=kernel)
    with pytest.raises(ValueError, match=r"row 40, column 7"):
        _core.train_head_lbfgs(p, X, y, num_classes=C, kernel=kernel)


def test_bad_batch_never_updates_weights(data):
    # One batch covers all rows: the error is raised before the first optimizer step.
    X, y = data
    X = X.copy()
    X[3, 3] = np.nan
    p = pyft.init_head_params("linear", D, C)
    before = p.copy()
    with pytest.raises(ValueError):
        _core.train_head(p, X, y, num_classes=C, batch_size=N, epochs=1)
    np.testing.assert_array_equal(p, before)


def test_diverging_weights_are_not_an_input_error(data):
    X, y = data
    p = np.full(C * D + C, 3e38, np.float32)  # logits overflow to inf on finite features
    res = _core.train_head(p, X, y, num_classes=C, optimizer="sgd", lr=1.0, epochs=2)
    assert not np.isfinite(res["history"][-1]["train_loss"])
    z = _core.predict(p, X, num_classes=C)  # NaN/inf logits from NaN weights, no exception
    assert not np.all(np.isfinite(z))


def test_lbfgs_line_search_backtracks_from_overflow(data):
    # Large features make trial steps overflow; that must not be mistaken for bad input.
    X, y = data
    p = pyft.init_head_params("linear", D, C)
    res = _core.train_head_lbfgs(p, X * 1e3, y, num_classes=C, l2=1e-4, max_iter=50)
    assert np.isfinite(res["objective"])
