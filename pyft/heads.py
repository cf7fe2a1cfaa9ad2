"""Classification heads trained by the native core, as a scikit-learn estimator.

:class:`HeadClassifier` is what a user fits on cached backbone features: a linear head
(softmax regression) or a one-hidden-layer MLP, trained in one native call. It follows the
scikit-learn estimator contract (``fit`` / ``predict`` / ``predict_proba`` / ``score``,
``get_params`` / ``set_params``, ``classes_``) and passes scikit-learn's estimator checks.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pyft import _core
from pyft._arrays import as_feature_array, is_cuda_tensor
from pyft._checks import ArgumentTypeError, check_choice, check_number, labels_1d
from pyft.training import (
    TrainOptions,
    head_param_count,
    holdout_rows,
    init_head_params,
    native_train_head,
)

__all__ = ["HeadClassifier", "init_head_params", "head_param_count"]

_SOLVERS = ("auto", "lbfgs", "sgd", "adamw")
_HEADS = ("linear", "mlp")
_ACTIVATIONS = ("relu", "gelu")
_SCHEDULES = ("constant", "cosine", "step")


class HeadClassifier(ClassifierMixin, BaseEstimator):
    """A classification head on fixed features, trained by pyft's native core.

    Parameters
    ----------
    head : {"linear", "mlp"}, default="linear"
        Softmax regression, or an MLP with one hidden layer.
    hidden_size : int, default=256
        Width of the MLP's hidden layer (ignored for ``head="linear"``).
    activation : {"relu", "gelu"}, default="relu"
        Hidden activation of the MLP (GELU is the exact, erf-based one).
    dropout : float, default=0.0
        Dropout on the MLP's hidden layer during training.
    solver : {"auto", "lbfgs", "sgd", "adamw"}, default="auto"
        ``"lbfgs"``: full-batch L-BFGS with L2 (linear head only; the linear-probe standard,
        same objective as ``LogisticRegression``). ``"sgd"``/``"adamw"``: mini-batch training.
        ``"auto"`` picks L-BFGS for the linear head and AdamW for the MLP.
    C : float, default=1.0
        Inverse L2 strength for L-BFGS, with ``LogisticRegression(C=C)``'s meaning: the fit
        minimises ``C * sum_i w_i loss_i + ||W||^2 / 2`` (``w_i`` the class weights; biases are
        not penalised), so ``coef_`` and ``intercept_`` match scikit-learn's up to a constant
        shift of the intercepts. With two classes scikit-learn fits one weight vector ``w``
        where this head keeps one row per class, ``w = W[1] - W[0]``; the penalty is then
        ``||W||^2`` (which is ``||w||^2 / 2`` at the optimum ``W[0] = -W[1]``), so that
        ``C`` still means the same.
    lr : float or None, default=None
        Peak learning rate of SGD/AdamW; ``None`` means 0.1 for SGD and 1e-3 for AdamW.
    weight_decay : float, default=1e-4
        SGD: L2 added to the gradient; AdamW: decoupled decay. Never applied to biases.
    momentum, nesterov, beta1, beta2, eps
        Optimizer settings with PyTorch's meaning (``momentum=0.9`` is SGD's default here).
    epochs : int, default=30
        Passes over the data for SGD/AdamW.
    batch_size : int, default=256
    schedule : {"cosine", "constant", "step"}, default="cosine"
        Learning-rate schedule, per optimizer step; ``warmup_epochs`` of linear warm-up first.
    warmup_epochs : float, default=0.0
    min_lr_ratio : float, default=0.0
        Floor of the cosine schedule as a fraction of ``lr``.
    step_size : int, default=10
        Epochs between decays of the step schedule (factor ``gamma``).
    gamma : float, default=0.1
    label_smoothing : float, default=0.0
    class_weight : dict, "balanced" or None, default=None
        Per-class loss weights, as in scikit-learn.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified) and stop after
        ``patience`` epochs without improving the validation loss by ``min_delta``; the best
        epoch's weights are kept. ``fit(X_val=..., y_val=...)`` supplies an explicit split.
    validation_fraction : float, default=0.1
    patience : int, default=5
    min_delta : float, default=0.0
    max_iter : int, default=1000
        L-BFGS iterations.
    tol : float, default=1e-4
        L-BFGS stops when the largest gradient entry is below ``tol``.
    random_state : int or None, default=None
        Seed for initialisation, shuffling, dropout and the validation split. For a fixed seed
        and thread count, training is deterministic.
    n_threads : int or None, default=None
        CPU threads; ``None`` uses all that OpenMP reports.
    callback : callable or None, default=None
        Called with a dict of per-epoch metrics (``epoch``, ``train_loss``, ``train_accuracy``,
        ``lr``, ``val_loss``, ``val_accuracy``, ``seconds``) or, for L-BFGS, per iteration
        (``iteration``, ``objective``, ``grad_max``). Return ``False`` to stop early.
    verbose : bool, default=False
        Show a tqdm progress bar.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (n_classes, n_features)
        Linear head only (multinomial: one row per class, also for two classes).
    intercept_ : ndarray of shape (n_classes,)
        Linear head only.
    params_ : ndarray of float32
        All trained parameters, flat (layout in :func:`init_head_params`).
    n_features_in_ : int
    n_iter_ : int
        Epochs run (SGD/AdamW) or L-BFGS iterations.
    history_ : list of dict
        Per-epoch (or per-iteration) metrics.
    solver_ : str
        The solver actually used.
    """

    def __init__(
        self,
        head: str = "linear",
        hidden_size: int = 256,
        activation: str = "relu",
        dropout: float = 0.0,
        solver: str = "auto",
        C: float = 1.0,
        lr: Optional[float] = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        nesterov: bool = False,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        epochs: int = 30,
        batch_size: int = 256,
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        step_size: int = 10,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        class_weight=None,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        patience: int = 5,
        min_delta: float = 0.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        random_state: Optional[int] = None,
        n_threads: Optional[int] = None,
        callback: Optional[Callable[[Dict[str, Any]], Any]] = None,
        verbose: bool = False,
    ):
        self.head = head
        self.hidden_size = hidden_size
        self.activation = activation
        self.dropout = dropout
        self.solver = solver
        self.C = C
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = nesterov
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.epochs = epochs
        self.batch_size = batch_size
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.step_size = step_size
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.min_delta = min_delta
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_threads = n_threads
        self.callback = callback
        self.verbose = verbose

    # ------------------------------------------------------------------ validation helpers

    def _validate_params_(self) -> str:
        check_choice("head", self.head, _HEADS)
        check_choice("activation", self.activation, _ACTIVATIONS)
        check_choice("solver", self.solver, _SOLVERS)
        check_choice("schedule", self.schedule, _SCHEDULES)
        solver = self.solver
        if solver == "auto":
            solver = "lbfgs" if self.head == "linear" else "adamw"
        if solver == "lbfgs" and self.head != "linear":
            raise ValueError("solver='lbfgs' trains the linear head only; use 'sgd' or 'adamw' "
                             f"for head={self.head!r}")
        if self.head == "mlp":
            check_number("hidden_size", self.hidden_size, low=1, integer=True)
        _check_fraction("dropout", self.dropout)
        check_number("C", self.C, low=0.0, low_open=True)
        if self.lr is not None:
            check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("momentum", self.momentum, low=0.0)
        check_number("epochs", self.epochs, low=1, integer=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("warmup_epochs", self.warmup_epochs, low=0.0)
        _check_fraction("label_smoothing", self.label_smoothing)
        _check_fraction("validation_fraction", self.validation_fraction, low_open=True)
        check_number("patience", self.patience, low=1, integer=True)
        check_number("max_iter", self.max_iter, low=1, integer=True)
        check_number("tol", self.tol, low=0.0)
        if self.n_threads is not None:
            check_number("n_threads", self.n_threads, low=1, integer=True)
        if self.callback is not None and not callable(self.callback):
            raise ArgumentTypeError(
                f"callback must be callable; got {type(self.callback).__name__}")
        return solver

    def _features(self, X, *, reset: bool, allow_cuda: bool = False):
        """Validate X without copying float data; returns (array, is_bfloat16). With allow_cuda,
        a CUDA tensor comes back as it is (for the CUDA trainer)."""
        arr, bf16 = (as_feature_array(X, allow_cuda=allow_cuda) if _is_special_float(X)
                     else (None, False))
        if arr is not None:
            # bfloat16 / torch input: scikit-learn's validation cannot read it; check here.
            n_features = arr.shape[1]
            if reset:
                self.n_features_in_ = n_features
            elif n_features != self.n_features_in_:
                raise ValueError(
                    f"X has {n_features} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            if arr.shape[0] < 1:
                raise ValueError(f"Found array with 0 sample(s) (shape={arr.shape})")
            if arr.shape[1] < 1:
                raise ValueError(f"Found array with 0 feature(s) (shape={arr.shape})")
            return arr, bf16
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float32, np.float64, np.float16],
            ensure_all_finite=False,  # the native core checks, without a float64 temporary
        )
        return as_feature_array(X)

    def _class_weights(self, y_enc: np.ndarray) -> Optional[np.ndarray]:
        cw = self.class_weight
        if cw is None:
            return None
        from sklearn.utils.class_weight import compute_class_weight

        if isinstance(cw, str) and cw != "balanced":
            raise ValueError(f"class_weight must be a dict, 'balanced' or None; got {cw!r}")
        if not isinstance(cw, (str, dict)):
            raise ArgumentTypeError(
                f"class_weight must be a dict, 'balanced' or None; got {type(cw).__name__}"
            )
        w = np.asarray(compute_class_weight(cw, classes=self.classes_, y=self.classes_[y_enc]),
                       dtype=np.float64)
        for c, wc in enumerate(w):
            if not np.isfinite(wc) or wc < 0:
                raise ValueError(
                    f"class_weight must be finite and >= 0; got {wc!r} for class "
                    f"{self.classes_[c]!r}"
                )
        if not np.any(w[y_enc] > 0):
            raise ValueError("class_weight gives every sample a weight of zero; at least one class "
                             "present in y needs a positive weight")
        return w.astype(np.float32)

    # ------------------------------------------------------------------ fit

    def fit(self, X, y, X_val=None, y_val=None):
        """Train the head.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            float32, float16, bfloat16 (ml_dtypes or torch) or float64; NumPy arrays,
            ``np.memmap`` and CPU torch tensors are read in place (never copied whole), with
            any strides. A CUDA tensor trains on its GPU with pyft's CUDA kernel (builds with
            ``PYFT_ENABLE_CUDA=ON``; linear head, solver 'sgd' or 'adamw'); predict takes host
            arrays.
        y : array-like of shape (n_samples,)
            Class labels of any type.
        X_val, y_val : optional validation split
            Per-epoch validation metrics and, with ``early_stopping``, the stopping criterion.

        Returns
        -------
        self
        """
        solver = self._validate_params_()
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        X_arr, bf16 = self._features(X, reset=True, allow_cuda=True)
        y = labels_1d(y, X_arr.shape[0])
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data; got 1 "
                f"class: {self.classes_[0]!r}"
            )
        y_enc = y_enc.astype(np.int64).ravel()
        num_classes = len(self.classes_)
        n_features = X_arr.shape[1]
        class_weights = self._class_weights(y_enc)
        seed = _seed_from(self.random_state)
        n_threads = 0 if self.n_threads is None else int(self.n_threads)
        hidden = int(self.hidden_size) if self.head == "mlp" else 0
        params = init_head_params(self.head, n_features, num_classes, hidden, seed)

        if solver == "lbfgs" and is_cuda_tensor(X_arr):
            raise ValueError(
                "solver='lbfgs' runs on the CPU (no CUDA kernel); pass X.cpu(), or use "
                "solver='sgd' or 'adamw' to train on the CUDA tensor"
            )
        if solver == "lbfgs":
            if X_val is not None or self.early_stopping:
                warnings.warn(
                    "validation data and early_stopping are ignored by solver='lbfgs' "
                    "(full-batch; regularise with C instead)",
                    UserWarning,
                    stacklevel=2,
                )
            self._fit_lbfgs(params, X_arr, bf16, y_enc, num_classes, class_weights, n_threads)
        else:
            self._fit_minibatch(
                solver, params, X_arr, bf16, y_enc, num_classes, class_weights, n_threads,
                hidden, seed, X_val, y_val,
            )
        self.params_ = params
        self.solver_ = solver
        if self.head == "linear":
            self.coef_ = params[: num_classes * n_features].reshape(num_classes, n_features)
            self.intercept_ = params[num_classes * n_features:]
        return self

    def _monitor(self, total: int, unit: str, keys):
        """A native-loop callback that records history, drives the progress bar (verbose) and
        forwards to the user's callback; returns (callback, history, close)."""
        history: List[Dict[str, Any]] = []
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit=unit, desc=f"pyft {self.head} head")
        user_cb = self.callback

        def callback(info):
            history.append(info)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{info[k]:.5g}" for k in keys if k in info})
            return True if user_cb is None else user_cb(info)

        return callback, history, (bar.close if bar is not None else (lambda: None))

    def _fit_lbfgs(self, params, X, bf16, y, num_classes, class_weights, n_threads):
        n = X.shape[0]
        weight_sum = float(class_weights[y].sum()) if class_weights is not None else float(n)
        # LogisticRegression's objective is C sum_i w_i loss_i + ||w||^2 / 2 with one vector w
        # for two classes; softmax rows W[0], W[1] with w = W[1] - W[0] meet at W[0] = -W[1],
        # where ||W||^2 / 2 = ||w||^2 / 4: twice the strength restores sklearn's C.
        l2 = (2.0 if num_classes == 2 else 1.0) / (float(self.C) * weight_sum)
        on_iter, history, close = self._monitor(int(self.max_iter), "it", ("objective",))
        try:
            res = _core.train_head_lbfgs(
                params, X, y, num_classes=num_classes, bfloat16=bf16,
                class_weights=class_weights, label_smoothing=float(self.label_smoothing),
                l2=l2, max_iter=int(self.max_iter),
                tol=float(self.tol), n_threads=n_threads, callback=on_iter,
            )
        finally:
            close()
        if not res["converged"] and res["message"] == "reached max_iter":
            warnings.warn(
                f"L-BFGS did not converge in max_iter={self.max_iter} iterations (largest "
                f"gradient entry {res['grad_max']:.3g} > tol={self.tol}); increase max_iter",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.n_iter_ = max(1, int(res["iterations"]))
        self.history_ = history
        self.objective_ = float(res["objective"])
        self.converged_ = bool(res["converged"])

    def _fit_minibatch(self, solver, params, X, bf16, y, num_classes, class_weights, n_threads,
                       hidden, seed, X_val, y_val):
        train_rows, val_X, val_y = self._validation_data(X, bf16, y, seed, X_val, y_val)
        n = X.shape[0] if train_rows is None else len(train_rows)
        options = self._train_options(solver, n, seed, n_threads,
                                      early_stop=self.early_stopping and val_X is not None)
        on_epoch, history, close = self._monitor(int(self.epochs), "epoch",
                                                 ("train_loss", "val_loss"))
        try:
            res = native_train_head(
                params, X, y, options, head=self.head, num_classes=num_classes,
                hidden_size=hidden, activation=self.activation, train_rows=train_rows,
                val_features=val_X, val_labels=val_y, bfloat16=bf16, class_weights=class_weights,
                label_smoothing=float(self.label_smoothing), callback=on_epoch,
            )
        finally:
            close()
        self.n_iter_ = int(res["epochs_run"])
        self.history_ = history
        self.best_epoch_ = int(res["best_epoch"])
        self.stopped_early_ = bool(res["stopped_early"])

    def _validation_data(self, X, bf16, y, seed, X_val, y_val):
        """(train_rows, val_X, val_y): the caller's validation split, the early-stopping hold-out
        (train_rows: the other rows of X), or no validation (all None)."""
        if X_val is not None or y_val is not None:
            if X_val is None or y_val is None:
                raise ValueError("X_val and y_val must be given together")
            val_X, val_bf16 = self._features(X_val, reset=False, allow_cuda=True)
            if val_bf16 != bf16:
                raise ValueError("X_val must have the same dtype family as X (bfloat16 or not)")
            val_y = self._encode(labels_1d(y_val, val_X.shape[0], name="y_val"), name="y_val")
            return None, val_X, val_y
        if not self.early_stopping:
            return None, None, None
        train_rows, val_rows = holdout_rows(y, float(self.validation_fraction), seed)
        if is_cuda_tensor(X):  # the held-out rows only, on the device
            import torch

            val_X = X[torch.as_tensor(val_rows, device=X.device)].contiguous()
        else:
            val_X = np.ascontiguousarray(X[val_rows])
        return train_rows, val_X, y[val_rows]

    def _train_options(self, solver, n, seed, n_threads, early_stop) -> TrainOptions:
        """The native run's settings for ``n`` training rows (warm-up epochs become steps)."""
        batch = min(int(self.batch_size), n)
        steps_per_epoch = -(-n // batch)
        lr = self.lr if self.lr is not None else (0.1 if solver == "sgd" else 1e-3)
        return TrainOptions(
            optimizer=solver, lr=float(lr), weight_decay=float(self.weight_decay),
            momentum=float(self.momentum) if solver == "sgd" else 0.0,
            nesterov=bool(self.nesterov) and solver == "sgd", beta1=float(self.beta1),
            beta2=float(self.beta2), eps=float(self.eps), schedule=self.schedule,
            warmup_steps=int(round(float(self.warmup_epochs) * steps_per_epoch)),
            min_lr_ratio=float(self.min_lr_ratio), step_size=int(self.step_size),
            gamma=float(self.gamma), epochs=int(self.epochs), batch_size=batch, seed=seed,
            dropout=float(self.dropout), patience=int(self.patience) if early_stop else 0,
            min_delta=float(self.min_delta), n_threads=n_threads,
        )

    def _encode(self, y, name="y"):
        index = {c: i for i, c in enumerate(self.classes_.tolist())}
        try:
            return np.array([index[v] for v in np.asarray(y).tolist()], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(
                f"{name} contains label {exc.args[0]!r} not seen in y; known classes: "
                f"{self.classes_.tolist()}"
            ) from None

    # ------------------------------------------------------------------ inference

    def _native_predict(self, X, output: str):
        check_is_fitted(self, "params_")
        X_arr, bf16 = self._features(X, reset=False)
        return _core.predict(
            self.params_, X_arr, head=self.head, num_classes=len(self.classes_),
            hidden_size=int(self.hidden_size) if self.head == "mlp" else 0,
            activation=self.activation, bfloat16=bf16, output=output,
            n_threads=0 if self.n_threads is None else int(self.n_threads),
        )

    def decision_function(self, X):
        """Logits, shape (n_samples, n_classes); for two classes, logit(1) - logit(0), shape
        (n_samples,), as scikit-learn's binary classifiers return."""
        z = self._native_predict(X, "logits")
        if z.shape[1] == 2:
            return z[:, 1] - z[:, 0]
        return z

    def predict_proba(self, X):
        """Softmax probabilities, shape (n_samples, n_classes), float32."""
        return self._native_predict(X, "proba")

    def predict_log_proba(self, X):
        z = self._native_predict(X, "logits").astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def predict(self, X):
        """Class labels (values of ``classes_``)."""
        labels = self._native_predict(X, "labels")  # checks fitted state first
        return self.classes_[labels]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _check_fraction(name: str, value: Any, *, low_open: bool = False) -> None:
    """A share in [0, 1) (``(0, 1)`` with ``low_open``): all of it would leave nothing."""
    check_number(name, value, low=0.0, low_open=low_open)
    if value >= 1.0:
        raise ValueError(f"{name} must be < 1; got {value!r}")


def _is_special_float(X) -> bool:
    """bfloat16 arrays and torch tensors bypass scikit-learn's validation (it cannot read them)."""
    if type(X).__module__.startswith("torch"):
        return True
    dtype = getattr(X, "dtype", None)
    return getattr(dtype, "name", None) == "bfloat16"


def _seed_from(random_state) -> int:
    """A 64-bit-safe integer seed from ``random_state`` (None, int, RandomState, Generator)."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if not 0 <= int(random_state) < 2**32:
            raise ValueError(f"random_state must be an integer in [0, 2**32), a "
                             f"numpy RandomState/Generator or None; got {random_state!r}")
        return int(random_state)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    from sklearn.utils import check_random_state

    try:
        rng = check_random_state(random_state)
    except ValueError as exc:
        raise ValueError(f"random_state must be an integer, a numpy RandomState/Generator or "
                         f"None; got {random_state!r}") from exc
    return int(rng.randint(0, 2**31 - 1))
