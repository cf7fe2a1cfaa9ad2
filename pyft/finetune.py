"""FineTuner: the playbook end to end -- choose a strategy, cache what is frozen, train the rest.

=================  ===========================================================================
``head_only``      the body's output is cached once; the native trainer fits the head on it
``freeze_first``   the first k blocks' output is cached once; PyTorch trains the rest on batches
                   the native gatherer draws from the cache
``full``           end to end in PyTorch, pretrained layers at a smaller learning rate
``scratch``        end to end in PyTorch, re-initialised
``auto``           :func:`pyft.advise` measures and chooses (``advice_`` says why)
=================  ===========================================================================

Under ``torch.distributed`` (e.g. ``torchrun``), every rank calls ``fit`` with the same data and
settings: rank 0 advises, the extraction is split over the ranks, the head's L-BFGS fit runs on rank
0, and PyTorch training is data-parallel (each rank takes rows ``rank::world`` of every global
batch and an all-reduce sums the gradients, so a step is the one-process step on the whole batch;
trained BatchNorm layers normalise with each rank's share, as under DDP without SyncBatchNorm, and
their running statistics are averaged every epoch). Every rank ends with the same model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from pyft._checks import check_bool, check_int, check_positive, did_you_mean, stratified_holdout
from pyft.data import LabeledData, load_data, take

__all__ = ["FineTuner", "STRATEGIES"]

STRATEGIES = ("auto", "head_only", "freeze_first", "full", "scratch")
SAVE_FORMAT = 1
_log = logging.getLogger("pyft")


def warmup_cosine(groups: List[Dict[str, Any]], steps: int) -> Any:
    """AdamW over ``groups`` with linear warm-up (5% of ``steps``) and cosine decay to zero:
    the schedule of every :class:`FineTuner` run and of :func:`pyft.advise`'s trials."""
    opt = torch.optim.AdamW(groups)
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class FineTuner:
    """Fine-tune a pretrained network on labelled data with the right strategy.

    Parameters
    ----------
    model : str or FineTunableModel
        A spec for :func:`pyft.load_model` (default the bundled EfficientNet-Lite0) or a model.
    num_classes : int, optional
        Taken from the training labels when not given.
    strategy : {"auto", "head_only", "freeze_first", "full", "scratch"}
    k : int or str, optional
        Blocks to freeze for ``freeze_first`` (``auto`` chooses it).
    epochs, batch_size, lr, weight_decay :
        Training settings; ``lr`` is the new head's rate (AdamW), pretrained layers train at
        ``lr_ratio`` times it. Default: the rate the advice's trials found best for ``auto``,
        1e-3 for the other strategies; a given ``lr`` is always used.
    patience : int
        Early stopping on validation loss (epochs without improvement); the best epoch's weights
        are restored. 0 disables.
    val_fraction : float
        Stratified validation split of the training data when ``fit`` gets no ``val``.
    image_size : int, optional
        Input resolution for image models.
    cache_dir : str, optional
        Feature-cache folder (default ``$PYFT_CACHE_DIR`` or ``~/.cache/pyft``).
    advise_budget : float, optional
        Seconds for ``auto``'s advice (default: :data:`pyft.advice.BUDGET_SHARE` of one
        estimated ``full`` run).
    autocast : bool, optional
        bfloat16 autocast for end-to-end training; default on for CUDA, off on CPU (where it
        helps only with AMX/AVX-512 BF16, which these machines lack).
    channels_last : bool, optional
        Train convolutional networks in the channels-last memory format (NHWC), which oneDNN on
        the CPU and cuDNN run faster (EfficientNet-Lite0 at 64 px on 2 cores: a full step
        1.4x, a cached ``freeze_first`` suffix step up to 1.8x). Default: on for image models
        (their 4-D inputs and activations); text models are unaffected. The fitted model is
        returned in the default (contiguous) format either way.
    distributed : bool or ProcessGroup, optional
        Split the work over the initialised ``torch.distributed`` process group, or the
        ``ProcessGroup`` given (default: when one is initialised, or initialise it from
        ``torchrun``'s environment); every rank must then call ``fit``. ``False`` fits in this
        process alone.

    Attributes
    ----------
    model_, classes_, strategy_, k_ :
        The fitted model, the class names, and the strategy (and ``k``) that ran.
    lr_ : float
        The learning rate the run used (``auto``: the advice's unless ``lr`` was given;
        ``head_only`` fits its head with L-BFGS, which needs none).
    advice_ : Advice or None
        What ``auto`` measured and why it chose (``None`` for the other strategies).
    history_ : list of dict
        One record per epoch (losses, validation accuracy, learning rate, seconds).
    val_metrics_ : dict
        Accuracy, loss and confusion matrix on the validation data.
    fit_seconds_ : dict
        Where the time of ``fit`` went, in seconds: ``setup`` (loading data and model,
        splitting), ``advise`` (``auto`` only, else 0), ``extract`` (cache passes of
        ``head_only`` and of a ``freeze_first`` whose model pyft can split, else 0), ``train``
        (the head fit or the training epochs), ``evaluate`` (the final validation metrics) and
        ``total``, their sum up to a few milliseconds of bookkeeping.
    cache_used_ : bool
        Whether training read the frozen part's output from the feature cache: True for
        ``head_only``, and for ``freeze_first`` when the model splits after block ``k``
        (:func:`pyft.split.split_model`); False for ``full``, ``scratch``, and ``freeze_first``
        on a model that does not split there, which then trains end to end with the prefix
        frozen (recomputing it every epoch).
    split_reason_ : str or None
        Why ``freeze_first`` could not use a cached prefix (``None`` when it did, or for other
        strategies).
    """

    def __init__(self, model: Any = "efficientnet_lite0", num_classes: Optional[int] = None,
                 strategy: str = "auto", *, k: Union[int, str, None] = None, epochs: int = 10,
                 batch_size: int = 64, lr: Optional[float] = None, weight_decay: float = 1e-4,
                 lr_ratio: float = 0.1, layer_decay: Optional[float] = None, patience: int = 3,
                 val_fraction: float = 0.1, image_size: Optional[int] = None,
                 cache_dir: Optional[str] = None, advise_budget: Optional[float] = None,
                 autocast: Optional[bool] = None, channels_last: Optional[bool] = None,
                 device: str = "cpu", seed: int = 0, progress: bool = True,
                 distributed: Any = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}"
                             f"{did_you_mean(strategy, STRATEGIES, n=1)}")
        for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                            ("patience", patience, 0)):
            check_int(name, v, lo)
        if lr is not None:
            check_positive("lr", lr, "a positive number or None")
        if channels_last is not None:
            check_bool("channels_last", channels_last)
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
        self.model = model
        self.num_classes = num_classes
        self.strategy = strategy
        self.k = k
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_ratio = lr_ratio
        self.layer_decay = layer_decay
        self.patience = patience
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.advise_budget = advise_budget
        self.autocast = autocast
        self.channels_last = channels_last
        self.device = device
        self.seed = seed
        self.progress = progress
        self.distributed = distributed

    # ------------------------------------------------------------------ fit
    def fit(self, train: Any, val: Any = None, labels: Any = None) -> "FineTuner":
        """Fit on ``train`` (anything :func:`pyft.data.load_data` reads), validating on ``val``
        (or a stratified split of ``train``). Returns self."""
        # ``seed`` fixes the whole run (model loading, dropout, stochastic depth), not just the
        # batch order: the same settings give the same model. The caller's random state is left
        # as it was.
        dev = torch.device(self.device)
        cuda = [] if dev.type != "cuda" else [torch.cuda.current_device() if dev.index is None
                                              else dev.index]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            return self._fit(train, val, labels)

    def _fit(self, train: Any, val: Any, labels: Any) -> "FineTuner":
        from pyft.distributed import on_rank0, process_group

        t0 = time.perf_counter()
        self._ranks = process_group(self.distributed)
        data = load_data(train, labels)
        train_d, val_d = self._train_val(data, val)
        model = self._model_for(data)
        model.to(self.device)
        if self._ranks.world > 1:  # the ranks split one run: they must hold the same one
            from pyft.cache import data_fingerprint
            from pyft.distributed import check_same_on_all_ranks

            skip = ("model", "progress", "distributed")
            settings = {k_: v for k_, v in vars(self).items() if not k_.startswith("_")
                        and not k_.endswith("_") and k_ not in skip}
            check_same_on_all_ranks({
                "training data": [data_fingerprint(train_d.inputs), train_d.labels.tolist()],
                "validation data": [data_fingerprint(val_d.inputs), val_d.labels.tolist()],
                "classes": list(data.classes), "model weights": model.weights_hash(),
                "settings": repr(sorted(settings.items()))}, "FineTuner.fit", self._ranks)
        strategy, k = self.strategy, self.k
        self.advice_ = None
        self._seconds = {"setup": time.perf_counter() - t0, "advise": 0.0, "extract": 0.0,
                         "train": 0.0}
        lr = self.lr
        if strategy == "auto":
            from pyft.advice import advise

            t = time.perf_counter()
            self.advice_ = on_rank0(  # trials are timed: one rank decides for all
                lambda: advise(model, train_d.inputs, train_d.labels,
                               time_budget=self.advise_budget, epochs=self.epochs,
                               val_samples=len(val_d), lr_ratio=self.lr_ratio,
                               weight_decay=self.weight_decay, seed=self.seed,
                               channels_last=self.channels_last),
                "advising a strategy", self._ranks)
            self._seconds["advise"] = time.perf_counter() - t
            strategy, k = self.advice_.strategy, self.advice_.k
            if lr is None:
                lr = self.advice_.lr
            _log.info("auto strategy: %s%s -- %s", strategy,
                      f"(k={k})" if k else "", self.advice_.reason)
        if strategy == "freeze_first" and k is None:
            k = max(1, len(model.blocks) // 2)
        self.lr_ = float(lr) if lr is not None else 1e-3
        self.history_: List[Dict[str, Any]] = []
        self.cache_used_ = strategy == "head_only"
        self.split_reason_: Optional[str] = None
        t = time.perf_counter()
        torch.manual_seed(self.seed)  # auto's run is the run of its choice, advice or not
        if strategy == "head_only":
            self._fit_head_only(model, train_d, val_d)
        elif strategy == "freeze_first":
            self._fit_freeze_first(model, k, train_d, val_d)
        else:
            self._fit_end_to_end(model, strategy, train_d, val_d)
        # Everything of the run that is not extraction is training (model surgery, data
        # loaders, per-epoch validation): the phases add up to the total by construction.
        self._seconds["train"] = max(0.0, time.perf_counter() - t - self._seconds["extract"])
        model.eval()
        self.model_ = model
        self.classes_ = list(data.classes)
        self.strategy_ = strategy
        self.k_ = model.block_index(k) if strategy == "freeze_first" else None
        t = time.perf_counter()
        self.val_metrics_ = self._evaluate_shared(val_d)
        self._seconds["evaluate"] = time.perf_counter() - t
        self.fit_seconds_ = dict(self._seconds, total=time.perf_counter() - t0)
        return self

    def _train_val(self, data: LabeledData, val: Any) -> Any:
        """(train, validation): ``val`` as given, or a stratified split of ``data``."""
        counts = np.bincount(data.labels, minlength=len(data.classes))
        if len(data.classes) < 2:
            raise ValueError(f"training data must hold at least 2 classes; got {data.classes}")
        if val is None:
            few = [data.classes[i] for i in np.flatnonzero(counts < 2)]
            if few:
                raise ValueError(f"class(es) {few[:5]} have fewer than 2 samples: a validation "
                                 "split needs at least 2 per class (add samples or pass val=)")
            y = data.labels
            n_val = max(int(round(self.val_fraction * len(y))), int((np.bincount(y) > 0).sum()))
            tr, va = stratified_holdout(y, n_val, self.seed)
            train_d, val_d = data.subset(tr), data.subset(va)
        else:
            train_d, val_d = data, load_data(val, classes=data.classes)
        return train_d, val_d

    def _model_for(self, data: LabeledData) -> Any:
        """The model to train: loaded from its spec, or the given one checked against the data."""
        from pyft.models import FineTunableModel, load_model

        n_classes = len(data.classes)
        if self.num_classes is not None and self.num_classes != n_classes:
            raise ValueError(f"num_classes={self.num_classes} but the training labels hold "
                             f"{n_classes} classes: {data.classes[:10]}")
        if isinstance(self.model, str):
            model = load_model(self.model, n_classes, image_size=self.image_size, seed=self.seed)
        elif isinstance(self.model, FineTunableModel):
            model = self.model
            if model.num_classes != n_classes:
                raise ValueError(f"the model's head has {model.num_classes} outputs but the "
                                 f"training labels hold {n_classes} classes")
        else:
            raise TypeError(f"model must be a spec string or a FineTunableModel; got "
                            f"{type(self.model).__name__}")
        if model.kind != data.kind:
            raise TypeError(f"{model.spec} is a {model.kind} model but the data holds "
                            f"{data.kind}s")
        return model

    def _timed(self, phase: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._seconds[phase] += time.perf_counter() - t

    def _evaluate_shared(self, d: LabeledData) -> Dict[str, Any]:
        """:meth:`evaluate`, with the rows split over the ranks and the probabilities gathered."""
        rank, world, group = self._ranks
        if world <= 1:
            return self.evaluate(d)
        import torch.distributed as dist

        parts: List[Any] = [None] * world
        mine = self.predict_proba(take(d.inputs, np.arange(rank, len(d), world)))
        dist.all_gather_object(parts, mine, group=group)
        p = np.empty((len(d), len(self.classes_)), np.float32)
        for r, part in enumerate(parts):
            p[r::world] = part
        return self._metrics(p, d.labels)

    def _cache(self, model: Any, d: LabeledData, cut: Any) -> Any:
        from pyft.features import extract_features

        return extract_features(model, d.inputs, d.labels, cut=cut, cache_dir=self.cache_dir,
                                batch_size=self.batch_size,
                                channels_last=model.uses_channels_last(self.channels_last),
                                progress=self.progress, distributed=self._ranks)

    def _fit_head_only(self, model: Any, tr: LabeledData, va: LabeledData) -> None:
        from pyft.distributed import on_rank0
        from pyft.heads import HeadClassifier

        model.freeze("head_only")
        e_tr = self._timed("extract", self._cache, model, tr, "head")
        e_va = self._timed("extract", self._cache, model, va, "head")

        def fit_head():  # seconds on the cache: one rank fits, every rank gets the same head
            clf = HeadClassifier(solver="lbfgs", C=1.0, max_iter=500, random_state=self.seed)
            clf.fit(e_tr.features, e_tr.labels)
            classes = np.asarray(clf.classes_)
            W = np.zeros((model.num_classes, clf.coef_.shape[1]), np.float32)
            b = np.full(model.num_classes, -1e4, np.float32)  # classes absent from training
            W[classes] = clf.coef_
            b[classes] = clf.intercept_
            return W, b, int(clf.n_iter_), float(clf.score(e_va.features, e_va.labels))

        W, b, iters, acc = on_rank0(fit_head, "fitting the head", self._ranks)
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(W))
            model.head.bias.copy_(torch.from_numpy(b))
        self.history_.append({"epoch": 0, "solver": "lbfgs", "iterations": iters,
                              "val_accuracy": acc, "cache_reused": bool(e_tr.reused)})

    def _train_loop(self, model: Any, groups: List[Dict[str, Any]], forward: Any,
                    train_batches: Any, val_batches: Any, steps_per_epoch: int) -> None:
        """AdamW with warm-up and cosine decay, early stopping on validation loss.

        ``train_batches(epoch)`` yields ``(x, y, n)``: this rank's rows of a global batch of
        ``n`` rows; ``val_batches()`` yields this rank's validation rows. With several ranks the
        summed gradients and the validation sums are all-reduced, so every rank takes the same
        steps and the same early-stopping decisions.
        """
        from pyft import distributed as pdist

        world = self._ranks.world
        from pyft.models.model import to_channels_last

        cl = model.uses_channels_last(self.channels_last)
        if cl:  # NHWC: oneDNN / cuDNN run the convolutions faster; undone below
            model.net.to(memory_format=torch.channels_last)
            plain = forward

            def forward(x: Any) -> Any:
                return plain(to_channels_last(x))
        try:
            self._epochs(model, groups, forward, train_batches, val_batches, steps_per_epoch)
        finally:
            if cl:
                model.net.to(memory_format=torch.contiguous_format)
        if world > 1:
            pdist.broadcast_state(model.net, self._ranks)  # identical already; made certain

    def _epochs(self, model: Any, groups: List[Dict[str, Any]], forward: Any,
                train_batches: Any, val_batches: Any, steps_per_epoch: int) -> None:
        from pyft import distributed as pdist

        world = self._ranks.world
        params = [p for g in groups for p in g["params"]]
        opt, sched = warmup_cosine(groups, steps_per_epoch * self.epochs)
        best, best_state, bad = math.inf, None, 0
        use_autocast = (self.autocast if self.autocast is not None
                        else self.device.startswith("cuda"))
        for epoch in range(self.epochs):
            t = time.perf_counter()
            model.train()
            tot, n = 0.0, 0
            for x, y, n_batch in train_batches(epoch):
                opt.zero_grad(set_to_none=True)
                if len(y):  # a rank's share of the last batch can be empty
                    with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                        enabled=bool(use_autocast)):
                        out = forward(x).float()
                    loss = nn.functional.cross_entropy(out, y, reduction="sum")
                    (loss / n_batch).backward()
                    tot += float(loss.detach())
                    n += len(y)
                if world > 1:
                    pdist.all_reduce_gradients(params, self._ranks)
                opt.step()
                sched.step()
            if world > 1:
                pdist.sync_buffers(model.net, self._ranks)
            model.eval()
            vl, vc, vn = 0.0, 0, 0
            with torch.inference_mode():
                for x, y in val_batches():
                    if not len(y):
                        continue
                    out = forward(x).float()
                    vl += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                    vc += int((out.argmax(1) == y).sum())
                    vn += len(y)
            if world > 1:
                import torch.distributed as dist

                sums = torch.tensor([tot, n, vl, vc, vn], dtype=torch.float64)
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._ranks.group)
                tot, n, vl, vc, vn = sums.tolist()
            rec = {"epoch": epoch, "train_loss": tot / max(n, 1), "val_loss": vl / max(vn, 1),
                   "val_accuracy": vc / max(vn, 1), "lr": sched.get_last_lr()[0],
                   "seconds": time.perf_counter() - t}
            self.history_.append(rec)
            _log.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f", epoch,
                      rec["train_loss"], rec["val_loss"], rec["val_accuracy"])
            if rec["val_loss"] < best - 1e-6:
                best, bad = rec["val_loss"], 0
                best_state = copy.deepcopy(model.net.state_dict())
            else:
                bad += 1
                if self.patience and bad >= self.patience:
                    break
        if best_state is not None:
            model.net.load_state_dict(best_state)

    def _fit_freeze_first(self, model: Any, k: Any, tr: LabeledData, va: LabeledData) -> None:
        from pyft.split import SplitError, check_split, split_model

        groups = model.freeze("freeze_first", k=k, lr=self.lr_, weight_decay=self.weight_decay,
                              lr_ratio=self.lr_ratio)
        try:
            _, suffix = split_model(model, k)
            # On two training samples: the suffix on the cached tap must give the model's logits.
            check_split(model, k, suffix, model.preprocess(take(tr.inputs, np.arange(2))))
        except SplitError as e:
            self.split_reason_ = str(e)
            _log.warning("freeze_first without a cached prefix: %s; training end to end with the "
                         "prefix frozen (it is recomputed every epoch)", e)
            self._end_to_end_loop(model, groups, tr, va)
            return
        self.cache_used_ = True
        e_tr = self._timed("extract", self._cache, model, tr, k)
        e_va = self._timed("extract", self._cache, model, va, k)
        steps = math.ceil(len(e_tr) / self.batch_size)
        rank, world, _ = self._ranks
        dev = self.device

        def rows(x: Any, copy: bool = False) -> Any:
            # Text entries give dicts (hidden states and attention mask); the gather buffer is
            # reused by the next batch, so what outlives a step is copied.
            if isinstance(x, dict):
                return {key: rows(v, copy) for key, v in x.items()}
            x = x[rank::world]
            return (x.clone() if copy else x).to(dev)

        def train_batches(epoch: int):
            for x, y in e_tr.batches(self.batch_size, seed=self.seed, epoch=epoch):
                yield rows(x), y[rank::world].to(dev), len(y)

        def val_batches():
            for x, y in e_va.batches(self.batch_size, shuffle=False):
                yield rows(x, copy=True), y[rank::world].to(dev)

        def forward(x: Any) -> Any:
            return suffix(**x) if isinstance(x, dict) else suffix(x)

        self._train_loop(model, groups, forward, train_batches, val_batches, steps)

    def _fit_end_to_end(self, model: Any, strategy: str, tr: LabeledData, va: LabeledData) -> None:
        opts: Dict[str, Any] = {}
        if strategy == "full":
            opts = {"lr_ratio": self.lr_ratio, "layer_decay": self.layer_decay}
        else:
            opts = {"seed": self.seed}
        groups = model.freeze(strategy, lr=self.lr_, weight_decay=self.weight_decay, **opts)
        self._end_to_end_loop(model, groups, tr, va)

    def _end_to_end_loop(self, model: Any, groups: List[Dict[str, Any]], tr: LabeledData,
                         va: LabeledData) -> None:
        dev = self.device
        rank, world, _ = self._ranks

        def to_dev(x: Any) -> Any:
            if isinstance(x, dict):
                return {key: v.to(dev) for key, v in x.items()}
            return x.to(dev)

        def batches(d: LabeledData, order: np.ndarray):
            y = torch.as_tensor(d.labels)
            for i in range(0, len(order), self.batch_size):
                batch = order[i:i + self.batch_size]
                idx = batch[rank::world]  # this rank's share; only it is read and preprocessed
                x = to_dev(model.preprocess(take(d.inputs, idx))) if len(idx) else None
                yield x, y[idx].to(dev), len(batch)

        def train_batches(epoch: int):
            order = np.random.default_rng([self.seed, epoch]).permutation(len(tr))
            return batches(tr, order)

        def val_batches():
            for x, y, _ in batches(va, np.arange(len(va))):
                yield x, y

        steps = math.ceil(len(tr) / self.batch_size)
        self._train_loop(model, groups, model.run, train_batches, val_batches, steps)

    # ------------------------------------------------------------------ use
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this FineTuner is not fitted yet; call fit() first")

    def predict_proba(self, inputs: Any) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), for raw images or texts."""
        self._check_fitted()
        if isinstance(inputs, (str, os.PathLike)) or isinstance(inputs, LabeledData):
            inputs = load_data(inputs, classes=self.classes_).inputs
        m = self.model_
        m.eval()
        n = len(inputs)
        out = [np.zeros((0, m.num_classes), np.float32)]
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                x = m.preprocess(take(inputs, np.arange(i, min(i + self.batch_size, n))))
                if isinstance(x, dict):
                    x = {key: v.to(self.device) for key, v in x.items()}
                else:
                    x = x.to(self.device)
                out.append(m.run(x).float().softmax(1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, inputs: Any) -> np.ndarray:
        """Predicted class names (as strings, in the order of ``classes_``)."""
        self._check_fitted()
        return np.asarray(self.classes_)[self.predict_proba(inputs).argmax(1)]

    def evaluate(self, data: Any, labels: Any = None) -> Dict[str, Any]:
        """Accuracy, mean cross-entropy and the confusion matrix on labelled data."""
        self._check_fitted()
        d = load_data(data, labels, classes=self.classes_)
        return self._metrics(self.predict_proba(d.inputs), d.labels)

    def _metrics(self, p: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
        pred = p.argmax(1)
        n_cls = len(self.classes_)
        cm = np.zeros((n_cls, n_cls), np.int64)
        np.add.at(cm, (labels, pred), 1)
        loss = float(-np.mean(np.log(np.clip(p[np.arange(len(pred)), labels], 1e-12, None))))
        return {"accuracy": float((pred == labels).mean()), "loss": loss, "n": int(len(pred)),
                "confusion_matrix": cm.tolist(), "classes": list(self.classes_)}

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write ``model.safetensors`` and ``config.json`` into the folder ``path``."""
        self._check_fitted()
        from safetensors.torch import save_file

        import pyft

        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot save to {path!r}: folder {parent!r} does not exist")
        os.makedirs(path, exist_ok=True)
        m = self.model_
        state = {k: v.detach().cpu().contiguous().clone() for k, v in m.net.state_dict().items()}
        config = {
            "format": SAVE_FORMAT, "pyft_version": pyft.__version__, "spec": m.spec,
            "kind": m.kind, "num_classes": m.num_classes, "classes": self.classes_,
            "image_size": (list(m.preprocessing.input_size) if m.kind == "image" else None),
            "preprocessing": m.preprocessing.key(), "strategy": self.strategy_, "k": self.k_,
            "history": self.history_, "val_metrics": {k: v for k, v in self.val_metrics_.items()
                                                      if k != "confusion_matrix"},
        }
        tag = f"{os.getpid()}.tmp"  # processes saving into one folder never share a temp file
        tmp_w, tmp_c = os.path.join(path, f".model.{tag}"), os.path.join(path, f".config.{tag}")
        save_file(state, tmp_w, metadata={"format": str(SAVE_FORMAT)})
        with open(tmp_c, "w") as f:
            json.dump(config, f, indent=1)
        os.replace(tmp_w, os.path.join(path, "model.safetensors"))
        os.replace(tmp_c, os.path.join(path, "config.json"))
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: Any = None) -> "FineTuner":
        """Load a saved FineTuner (no training data needed). ``model`` provides the network for
        models that were wrapped from a user's own module."""
        from safetensors.torch import load_file

        from pyft.models import FineTunableModel, load_model

        path = os.fspath(path)
        cpath, wpath = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        if not os.path.isfile(cpath) or not os.path.isfile(wpath):
            raise FileNotFoundError(f"{path!r} is not a saved FineTuner (needs config.json and "
                                    "model.safetensors)")
        try:
            with open(cpath) as f:
                config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cpath} is damaged: {e}") from e
        if config.get("format") != SAVE_FORMAT:
            raise ValueError(f"{path!r} was saved by pyft {config.get('pyft_version')} in format "
                             f"{config.get('format')}; this pyft reads format {SAVE_FORMAT}")
        try:
            state = load_file(wpath)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{wpath} is damaged: {e}") from e
        if model is None:
            spec = config["spec"]
            size = config.get("image_size")
            model = load_model(spec, config["num_classes"], weights="random",
                               image_size=None if size is None else int(size[0]))
        if not isinstance(model, FineTunableModel):
            raise TypeError(f"model must be a FineTunableModel; got {type(model).__name__}")
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wpath} does not match {model.spec}: {str(e)[:500]}") from e
        model.pretrained = True
        model.eval()
        ft = cls(model, config["num_classes"], config["strategy"])
        ft.model_ = model
        ft.classes_ = list(config["classes"])
        ft.strategy_ = config["strategy"]
        ft.k_ = config.get("k")
        ft.history_ = config.get("history", [])
        ft.val_metrics_ = config.get("val_metrics", {})
        return ft
