"""Strategy advice: which fine-tuning strategy, at which learning rate, from measurements.

:func:`advise` measures, on the user's own data:

1. **Size**: samples, samples per class, and samples per trainable parameter of each option.
2. **Similarity to the pretraining domain**:

   - one forward pass over a stratified subsample records the pooled output of every block; a
     cross-validated linear probe (the native L-BFGS head trainer) at each depth tells how well
     each depth's features separate the user's classes. When an earlier block's probe beats the
     last block's, the top blocks do not transfer to this data;
   - where the body has BatchNorm, how far the data's per-channel activation statistics are from
     the stored running statistics (KL divergence of the two Gaussians, averaged per block).

3. **Trials that compare like with like**. Every candidate -- ``head_only``,
   ``freeze_first(k)`` and ``full`` -- gets the same short run: the same training and
   validation halves of the subsample, the same number of AdamW steps (``trial_epochs`` over
   the training half, batches in the same order, warm-up and cosine decay as in
   :class:`pyft.FineTuner`), once per learning rate of a small grid; each keeps its best rate.
   ``full``, whose trial costs the most, runs once, at the rate of the cached ``freeze_first``
   trial that trains the most blocks (the same recipe on fewer trainable layers); it searches
   the grid itself only when no ``freeze_first`` depth trains from a cache.
   Every trial starts from the model as given, with the same new head; ``head_only`` gets the
   same short AdamW run as the others (not a converged solver, which a short run of the others
   could not match). Trained BatchNorm layers get their running statistics recalibrated on the
   training rows before the validation pass: a short run barely moves them, a real run does.
   What is frozen is computed once: ``head_only`` trains the head on the cached head input and
   ``freeze_first(k)`` trains the suffix of :func:`pyft.split.split_model` on the subsample's
   cached prefix activations, as the real run does. A model pyft cannot split at ``k`` trains
   ``freeze_first`` end to end with the prefix frozen, in the trial and in the real run, and the
   advice says so.

4. **Costs from measured times**. Each trial measures seconds per sample of its own work: the
   prefix pass that fills the cache (paid once per sample in the real run), the training step of
   what trains (forward, backward and optimizer step: paid every epoch), and the evaluation
   pass. The estimated wall time of the real run is ``prefix * (n + n_val)`` +
   ``epochs * (train * n + eval * n_val)``; early stopping can only make it shorter.

The advice reports, per candidate, the best learning rate, the trial's validation accuracy with
its standard error, the gap to the best candidate (with the standard error of the paired
difference: the candidates are scored on the same samples) and the estimated time of the real
run; it recommends the cheapest candidate whose gap is within tolerance.

Thresholds and settings (module constants; the advice reports them):

``SMALL_PER_CLASS = 1000``
    Data is "small" below this many samples per class. ImageNet-1k, where the weights come from,
    has about 1,300 per class; the playbook (Yosinski et al. 2014, "How transferable are
    features in deep neural networks?"; the CS231n transfer-learning notes) calls data small
    relative to that.
``SIMILAR_TOLERANCE = 0.01``
    The domain counts as "similar" when the last block's probe accuracy is within one percentage
    point (or one standard error of the cross-validation, if larger) of the best depth's.
``ACCURACY_TOLERANCE = 0.01``
    A cheaper candidate is preferred when its trial accuracy is within this of the best
    candidate's. The paired difference's standard error is reported but does not widen the
    tolerance: on a few hundred trial rows it is 2-3 points, and widening by it picked the
    cheapest option almost always (on MNIST-5k, freeze_first through blocks.14 at 0.956
    held-out over freeze_first through blocks.9 at 0.975).
``BUDGET_SHARE = 0.1``
    The default time budget of :func:`advise` is this share of one estimated ``full`` run over
    all the data: ``auto`` aims at a fifth of a full fine-tuning run for advice and training
    together.
``LR_GRIDS``
    The learning rates each candidate tries (the new head's rate; pretrained layers train at
    ``lr_ratio`` times it). Convolutional networks fine-tune well with AdamW around 1e-3..1e-2;
    transformer encoders need about ten times less (BERT's recipe is 2e-5..5e-5 for the body,
    i.e. 2e-4..5e-4 at ``lr_ratio=0.1``). Every candidate, ``head_only`` included, tries the
    same grid.

The quadrant table is the prior, reported beside the trials; when trials ran, they decide.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from pyft._checks import check_bool, check_int, check_positive, stratified_holdout
from pyft.data import take

__all__ = ["advise", "Advice", "SMALL_PER_CLASS", "SIMILAR_TOLERANCE", "ACCURACY_TOLERANCE",
           "BUDGET_SHARE", "LR_GRIDS"]

SMALL_PER_CLASS = 1000
SIMILAR_TOLERANCE = 0.01
ACCURACY_TOLERANCE = 0.01
BUDGET_SHARE = 0.1
LR_GRIDS = {"image": (1e-3, 3e-3, 1e-2), "text": (1e-4, 3e-4, 1e-3)}
_log = logging.getLogger("pyft")


@dataclass
class Advice:
    """The recommendation of :func:`advise` and every measurement behind it.

    ``trials`` maps each candidate (``"head_only"``, ``"freeze_first(k)"``, ``"full"``,
    ``"scratch"``) to a dict with ``strategy``, ``k``, ``lr`` (the best of the grid),
    ``accuracy`` and ``stderr`` (trial validation accuracy), ``gap`` and ``gap_stderr`` (to the
    best candidate, paired), ``estimated_seconds`` (the real run), ``cost`` (the measured
    seconds per sample it comes from), ``cached`` and ``note``; ``lr_grid`` holds every rate's
    result. ``full``, the dearest trial, tries one rate when a cached ``freeze_first`` ran: the
    one that candidate found best (``lr_from`` names it).
    """

    strategy: str
    k: Optional[int]
    reason: str
    size: Dict[str, Any]
    probes: List[Dict[str, Any]]
    bn_shift: List[Dict[str, Any]]
    trials: Dict[str, Dict[str, Any]]
    prior: Dict[str, str]
    thresholds: Dict[str, float]
    seconds: float
    block_names: List[str] = field(default_factory=list)
    lr: Optional[float] = None
    trial_setup: Dict[str, Any] = field(default_factory=dict)

    def policy(self) -> Any:
        """The recommended strategy as a :class:`pyft.freezing.Policy`."""
        from pyft import freezing

        if self.strategy == "freeze_first":
            return freezing.freeze_first(self.k)
        return getattr(freezing, self.strategy)()

    @property
    def choice(self) -> Optional[Dict[str, Any]]:
        """The trial entry of the recommended candidate (None without trials)."""
        for t in self.trials.values():
            if t.get("recommended"):
                return t
        return None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "strategy": self.strategy, "k": self.k, "lr": self.lr, "reason": self.reason,
            "size": self.size, "probes": self.probes, "bn_shift": self.bn_shift,
            "trials": self.trials, "trial_setup": self.trial_setup, "prior": self.prior,
            "thresholds": self.thresholds, "seconds": self.seconds,
        }

    def __str__(self) -> str:
        name = self.strategy + (f"(k={self.k}: {self.block_names[self.k - 1]})"
                                if self.strategy == "freeze_first" and self.k else "")
        if self.lr is not None and self.strategy != "head_only":
            name += f" at lr {self.lr:g}"
        lines = [f"Recommended: {name}", f"Why: {self.reason}"]
        s = self.size
        lines.append(f"Data: {s['samples']} samples, {s['classes']} classes, "
                     f"{s['min_per_class']}-{s['max_per_class']} per class ({self.prior['size']})")
        if self.probes:
            best = max(self.probes, key=lambda p: p["accuracy"])
            lines.append(
                f"Linear probes ({self.probes[0]['folds']}-fold CV on "
                f"{self.probes[0]['samples']} samples): "
                + ", ".join(f"{p['block']} {p['accuracy']:.3f}" for p in self.probes)
                + f"; best {best['block']}; domain {self.prior['similarity']}")
        if self.bn_shift:
            worst = max(self.bn_shift, key=lambda b: b["kl"])
            lines.append(f"BatchNorm statistics shift (KL, nats): first block "
                         f"{self.bn_shift[0]['kl']:.2f}, largest {worst['kl']:.2f} at "
                         f"{worst['block']}")
        ts = self.trial_setup
        if ts:
            lines.append(f"Trials: {ts['train_samples']} train / {ts['val_samples']} validation "
                         f"samples, {ts['steps']} AdamW steps of batch {ts['batch_size']} each, "
                         f"{ts['seconds']:.0f} s of a {ts['budget']:.0f} s budget")
        lines.append(f"  {'candidate':<18} {'lr':>7} {'accuracy':>14} {'gap':>7} {'est. run':>9}")
        for name_, t in self.trials.items():
            if t.get("accuracy") is None:
                lines.append(f"  {name_:<18} {'':>7} {'n/a':>14} {'':>7} "
                             f"{_fmt_s(t['estimated_seconds']):>9}  ({t['note']})")
                continue
            mark = " <-" if t.get("recommended") else ""
            lines.append(f"  {name_:<18} {t['lr']:>7.0e} {t['accuracy']:>7.3f} +-{t['stderr']:.3f}"
                         f" {-t['gap']:>+7.3f} {_fmt_s(t['estimated_seconds']):>9}  "
                         f"({t['note']}){mark}")
        return "\n".join(lines)


def _fmt_s(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ---------------------------------------------------------------------------- data helpers
def _as_inputs_labels(data: Any, labels: Any) -> Tuple[Any, np.ndarray]:
    if labels is None:
        if isinstance(data, tuple) and len(data) == 2:
            data, labels = data
        else:
            raise TypeError("advise needs labels: pass advise(model, inputs, labels) or "
                            "advise(model, (inputs, labels))")
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {y.shape}")
    n = len(data) if not hasattr(data, "shape") else data.shape[0]
    if n != len(y):
        raise ValueError(f"inputs and labels must have the same length; got {n} inputs and "
                         f"{len(y)} labels")
    if n == 0:
        raise ValueError("advise needs data; got 0 samples")
    return data, y


def _stratified_subsample(y: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    if m >= len(y):
        return rng.permutation(len(y))
    classes, inv = np.unique(y, return_inverse=True)
    picks = []
    for c in range(len(classes)):
        idx = np.flatnonzero(inv == c)
        share = max(1, int(round(m * len(idx) / len(y))))
        picks.append(rng.choice(idx, size=min(share, len(idx)), replace=False))
    return rng.permutation(np.concatenate(picks))


def _batches(n: int, bs: int) -> List[slice]:
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def _to(x: Any, dev: torch.device, channels_last: bool = False) -> Any:
    """``x`` (a tensor or a dict of them) on ``dev``; 4-D tensors channels-last if asked."""
    from pyft.models.model import to_channels_last

    if isinstance(x, dict):
        return {key: v.to(dev) for key, v in x.items()}
    return to_channels_last(x.to(dev)) if channels_last else x.to(dev)


# ---------------------------------------------------------------------------- measurements
class _BNStats:
    """Per-channel mean and variance of every BatchNorm layer's input, accumulated over batches."""

    def __init__(self, net: nn.Module) -> None:
        self.sums: Dict[str, List[Any]] = {}
        self.handles = []
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats \
                    and m.running_mean is not None:
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: Tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            dims = [d for d in range(x.ndim) if d != 1]
            cnt = x.numel() // x.shape[1]
            s = self.sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64),
                                            torch.zeros(x.shape[1], dtype=torch.float64), 0])
            s[0] += x.sum(dims).cpu()
            s[1] += (x * x).sum(dims).cpu()
            s[2] += cnt
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def kl(self, net: nn.Module) -> Dict[str, float]:
        out = {}
        for name, (s1, s2, cnt) in self.sums.items():
            m = net.get_submodule(name)
            mu = s1 / cnt
            var = (s2 / cnt - mu * mu).clamp_min(0) + m.eps
            rm = m.running_mean.double().cpu()
            rv = m.running_var.double().cpu() + m.eps
            kl = 0.5 * ((mu - rm) ** 2 / rv + var / rv - 1.0 - torch.log(var / rv))
            out[name] = float(kl.mean())
        return out


def _probe_pass(work: Any, x_sub: Any, batch_size: int, dev: torch.device,
                channels_last: bool = False
                ) -> Tuple[List[np.ndarray], np.ndarray, float, np.ndarray]:
    """One inference pass: pooled output of every block, the head's input, seconds per sample
    (preprocessing included) and the share of the forward time spent up to each block's tap."""
    from pyft.models.model import _pool

    nb = len(work.blocks)
    pooled: List[List[np.ndarray]] = [[] for _ in range(nb)]
    head_in: List[np.ndarray] = []
    up_to = np.zeros(nb)
    state: Dict[str, Any] = {}

    def tap(i: int, where: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Tuple[Any, ...], out: Any = None) -> None:
            if i in state["seen"]:
                return
            x = args[0] if where == "input" else out
            if isinstance(x, (tuple, list)):
                x = x[0]
            state["seen"].add(i)
            pooled[i].append(_pool(x, state["mask"]).float().cpu().numpy().copy())
            up_to[i] += time.perf_counter() - state["t0"]
        return hook

    def grab_head(_m: nn.Module, args: Tuple[Any, ...]) -> None:
        head_in.append(args[0].detach().float().cpu().numpy().copy())

    handles = []
    for i, b in enumerate(work.blocks):
        mod = work.net.get_submodule(b.tap[0])
        h = tap(i, b.tap[1])
        handles.append(mod.register_forward_pre_hook(h) if b.tap[1] == "input"
                       else mod.register_forward_hook(h))
    handles.append(work.head.register_forward_pre_hook(grab_head))
    n = len(x_sub) if not hasattr(x_sub, "shape") else x_sub.shape[0]
    forward_time = 0.0
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            for sl in _batches(n, batch_size):
                x = _to(work.preprocess(take(x_sub, np.arange(n)[sl])), dev, channels_last)
                state.update(seen=set(), t0=time.perf_counter(),
                             mask=x.get("attention_mask") if isinstance(x, dict) else None)
                work.run(x)
                forward_time += time.perf_counter() - state["t0"]
    finally:
        for h in handles:
            h.remove()
    per_sample = (time.perf_counter() - t_start) / n
    share = np.clip(up_to / max(forward_time, 1e-12), 0.0, 1.0)
    return [np.concatenate(p) for p in pooled], np.concatenate(head_in), per_sample, share


def _probe(features: np.ndarray, y: np.ndarray, folds: int, seed: int) -> Tuple[float, float]:
    """Mean and standard error of a stratified k-fold linear-probe accuracy."""
    from sklearn.model_selection import StratifiedKFold

    from pyft.heads import HeadClassifier

    accs = []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in skf.split(features, y):
        mu = features[tr].mean(0)
        sd = features[tr].std(0) + 1e-6
        clf = HeadClassifier(solver="lbfgs", C=1.0, max_iter=100, random_state=seed)
        clf.fit((features[tr] - mu) / sd, y[tr])
        accs.append(clf.score((features[te] - mu) / sd, y[te]))
    a = np.asarray(accs)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def _recalibrate_bn(forward: Callable[[Any], torch.Tensor], net: nn.Module,
                    x_train: Callable[[np.ndarray], Any], n: int, batch_size: int) -> None:
    """Running statistics of the trained BatchNorm layers from one pass over the training rows.

    A short trial moves BatchNorm's running averages only a little (EfficientNet's momentum is
    0.01) while the weights change, so evaluating with them would score the stale statistics,
    not the strategy; a real run of many epochs has converged ones (``torch.optim.swa_utils.
    update_bn`` does the same). Frozen BatchNorm layers keep their statistics.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None
           and any(q.requires_grad for q in m.parameters())]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    try:
        with torch.no_grad():
            for sl in _batches(n, batch_size):
                forward(x_train(np.arange(n)[sl]))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def _short_run(forward: Callable[[Any], torch.Tensor], set_train: Callable[[bool], Any],
               groups: List[Dict[str, Any]], x_train: Callable[[np.ndarray], Any],
               y_train: np.ndarray, x_val: Callable[[np.ndarray], Any], y_val: np.ndarray,
               epochs: int, batch_size: int, seed: int, net: nn.Module) -> Dict[str, Any]:
    """The one trial recipe every candidate gets: AdamW with warm-up and cosine decay over
    ``epochs`` passes of ``y_train`` (batch order from ``seed``), BatchNorm statistics
    recalibrated on the training rows, then one validation pass.

    ``x_train(idx)`` / ``x_val(idx)`` give the inputs of ``forward`` for those rows (cached
    activations, or preprocessed raw inputs). Returns per-sample correctness on the validation
    rows and the measured seconds per trained sample (the median step: the first steps of a
    short run pay one-off allocations a long run does not) and per evaluated sample.
    """
    from pyft.finetune import warmup_cosine

    n = len(y_train)
    steps = epochs * math.ceil(n / batch_size)
    opt, sched = warmup_cosine(groups, steps)
    yt = torch.as_tensor(y_train, dtype=torch.long)
    step_s: List[float] = []
    diverged = False
    t_run = time.perf_counter()
    set_train(True)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for sl in _batches(n, batch_size):
            idx = order[sl]
            t0 = time.perf_counter()
            out = forward(x_train(idx)).float()
            loss = nn.functional.cross_entropy(out, yt[idx].to(out.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_s.append((time.perf_counter() - t0) / len(idx))
            if not math.isfinite(float(loss.detach())):
                diverged = True
    _recalibrate_bn(forward, net, x_train, n, 64)
    set_train(False)
    correct = np.zeros(len(y_val), bool)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for sl in _batches(len(y_val), 64):
            pred = forward(x_val(np.arange(len(y_val))[sl])).float().argmax(1).cpu().numpy()
            correct[sl] = pred == y_val[sl]
    eval_s = time.perf_counter() - t0
    acc = float(correct.mean())
    return {"correct": correct, "accuracy": acc, "diverged": diverged,
            "stderr": math.sqrt(max(acc * (1 - acc), 1e-12) / len(y_val)),
            "train_per_sample": float(np.median(step_s)), "eval_per_sample": eval_s / len(y_val),
            "seconds": time.perf_counter() - t_run}


def _paired_stderr(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


# ---------------------------------------------------------------------------- advise
def advise(model: Any, data: Any, labels: Any = None, *, time_budget: Optional[float] = None,
           epochs: int = 10, val_samples: Optional[int] = None, probe_samples: int = 1000,
           folds: int = 3, trials: bool = True, batch_size: int = 32, trial_epochs: int = 2,
           lrs: Optional[Sequence[float]] = None, ks: Optional[Sequence[Any]] = None,
           lr_ratio: float = 0.1, weight_decay: float = 1e-4,
           channels_last: Optional[bool] = None, seed: int = 0) -> Advice:
    """Recommend ``head_only``, ``freeze_first(k)`` or ``full`` (and a learning rate) for
    ``model`` on ``data``.

    Parameters
    ----------
    model : FineTunableModel or str
        A model from :func:`pyft.load_model` (a spec string is loaded with the labels' classes).
        It is not modified: trials run on copies.
    data : images or texts, or (inputs, labels)
        What :meth:`FineTunableModel.preprocess` accepts, indexable by sample: the training data
        of the real run.
    labels : array of shape (n,), optional
    time_budget : float, optional
        Seconds for the whole advice; the trials' size is planned to fit it. Default:
        ``BUDGET_SHARE`` (10%) of the estimated time of one ``full`` run of ``epochs`` epochs
        over all the data, between 5 s and 10 min. The trials keep their minimum size (4
        batches or 20 per class) even when that exceeds the budget; ``trial_setup`` says by
        how much.
    epochs : int
        Epochs of the real run the cost estimates assume.
    val_samples : int, optional
        Validation samples of the real run (evaluated every epoch); default 10% of ``data``.
    probe_samples : int
        Size of the stratified subsample that probes and trials use.
    folds : int
        Cross-validation folds of the linear probes.
    trials : bool
        ``False`` skips the trial runs (advice from size and probes only).
    batch_size, trial_epochs : int
        Trial runs: AdamW with warm-up and cosine decay, ``trial_epochs`` passes over the
        trials' training half, the same for every candidate.
    ks : sequence of int or str, optional
        The depths ``freeze_first`` tries. Default: through the block whose probe is best (at
        least the last two blocks train) and through all but the last two blocks. A depth
        pyft cannot split at trains end to end with the prefix frozen; then only one is tried.
    lrs : sequence of float, optional
        The learning rates every candidate tries (the new head's rate); default ``LR_GRIDS``
        for the model's kind.
    lr_ratio, weight_decay : float
        As in :class:`pyft.FineTuner`: pretrained layers train at ``lr_ratio`` times the rate.
    channels_last : bool, optional
        As in :class:`pyft.FineTuner` (default: on for image models): the trials run in the
        memory format of the real run, so their measured costs are the real run's.
    seed : int
        Seeds the subsample, the folds, the split and the trials.

    Returns
    -------
    Advice
        ``strategy``, ``k``, ``lr``, a readable ``reason`` and every measurement
        (``print(advice)``).
    """
    t_start = time.perf_counter()
    st = _setup(model, data, labels, epochs=epochs, val_samples=val_samples,
                probe_samples=probe_samples, folds=folds, batch_size=batch_size,
                trial_epochs=trial_epochs, time_budget=time_budget, lrs=lrs,
                lr_ratio=lr_ratio, weight_decay=weight_decay, channels_last=channels_last,
                seed=seed)
    _measure_probes(st)
    _size_and_prior(st)
    _measure_full_step(st, time_budget)
    _choose_depths(st, ks)
    results: Dict[str, Dict[str, Any]] = {}
    setup: Dict[str, Any] = {}
    if trials:
        results, setup = _run_trials(st, t_start)
    results["scratch"] = {
        "strategy": "scratch", "k": None, "lr": None, "accuracy": None, "stderr": None,
        "estimated_seconds": st.full_per_sample * st.n * st.epochs * 3, "cached": False,
        "note": "not trialled: needs far more data than a subsample; assumes 3x the epochs"}
    if trials:
        strategy, k_choice, lr_choice, reason = _decide(st, results, setup)
    else:
        strategy, k_choice, lr_choice, reason = st.quadrant, st.k, None, _prior_reason(st)
    reason += _domain_remark(st, strategy)
    return Advice(
        strategy=strategy, k=k_choice if strategy == "freeze_first" else None, reason=reason,
        size=st.size, probes=st.probes, bn_shift=st.bn_shift, trials=results,
        prior={"size": st.prior_size, "similarity": st.prior_sim, "quadrant": st.quadrant},
        thresholds={"small_per_class": SMALL_PER_CLASS, "similar_tolerance": SIMILAR_TOLERANCE,
                    "accuracy_tolerance": ACCURACY_TOLERANCE, "time_budget": st.budget,
                    "budget_share": BUDGET_SHARE},
        seconds=time.perf_counter() - t_start, block_names=st.work.block_names, lr=lr_choice,
        trial_setup=setup)


@dataclass
class _Study:
    """What :func:`advise` learns step by step, shared by its steps."""

    model: Any
    work: Any  # an eval-mode copy the probes and splits use
    x_sub: Any
    y_sub: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    n: int
    n_val_real: int
    folds: int
    dev: torch.device
    epochs: int
    batch_size: int
    trial_epochs: int
    lrs: Tuple[float, ...]
    lr_ratio: float
    weight_decay: float
    seed: int
    channels_last: bool
    # filled by the steps
    probes: List[Dict[str, Any]] = field(default_factory=list)
    bn_shift: List[Dict[str, Any]] = field(default_factory=list)
    head_feats: Any = None
    fwd_per_sample: float = 0.0
    share: Any = None
    best: int = 0
    similar: bool = True
    small: bool = True
    k: int = 1
    size: Dict[str, Any] = field(default_factory=dict)
    prior_size: str = ""
    prior_sim: str = ""
    quadrant: str = ""
    tr_pos: Any = None
    va_pos: Any = None
    n_val: int = 0
    full_per_sample: float = 0.0
    budget: float = 0.0
    ks: List[int] = field(default_factory=list)
    split_notes: Dict[int, str] = field(default_factory=dict)


def _setup(model: Any, data: Any, labels: Any, *, epochs: Any, val_samples: Any,
           probe_samples: Any, folds: Any, batch_size: Any, trial_epochs: Any,
           time_budget: Any, lrs: Any, lr_ratio: float, weight_decay: float,
           channels_last: Any, seed: int) -> _Study:
    """Checked arguments, the model (loaded from a spec if needed) and the stratified subsample."""
    from pyft.models import FineTunableModel, load_model

    data, y_all = _as_inputs_labels(data, labels)
    classes, y_idx = np.unique(y_all, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels must hold at least 2 classes; got {len(classes)}")
    if isinstance(model, str):
        model = load_model(model, len(classes))
    if not isinstance(model, FineTunableModel):
        raise TypeError(f"model must be a FineTunableModel (pyft.load_model) or a spec string; "
                        f"got {type(model).__name__}")
    if model.num_classes < len(classes):
        raise ValueError(f"labels hold {len(classes)} classes but the model's head has "
                         f"{model.num_classes} outputs; load it with num_classes={len(classes)}")
    for name, v, lo in (("epochs", epochs, 1), ("probe_samples", probe_samples, 20),
                        ("folds", folds, 2), ("batch_size", batch_size, 1),
                        ("trial_epochs", trial_epochs, 1)):
        check_int(name, v, lo)
    if time_budget is not None:
        check_positive("time_budget", time_budget, "a positive number of seconds")
    if val_samples is not None:
        check_int("val_samples", val_samples, 0)
    if channels_last is not None:
        check_bool("channels_last", channels_last)
    lrs = tuple(LR_GRIDS.get(model.kind, LR_GRIDS["image"]) if lrs is None else lrs)
    if not lrs:
        raise ValueError(f"lrs must be a non-empty sequence of positive numbers; got {lrs!r}")
    for v in lrs:
        check_positive("lrs", v, "a non-empty sequence of positive numbers")

    n = len(y_all)
    counts = np.bincount(y_idx)
    sub = _stratified_subsample(y_idx, probe_samples, np.random.default_rng(seed))
    y_sub = y_idx[sub]
    folds_eff = int(min(folds, np.bincount(y_sub).min()))
    if folds_eff < 2:
        raise ValueError("every class needs at least 2 samples in the probe subsample; "
                         f"the smallest class has {int(counts.min())}")
    cl = model.uses_channels_last(channels_last)
    work = copy.deepcopy(model)
    work.eval()
    if cl:
        work.net.to(memory_format=torch.channels_last)
    return _Study(model=model, work=work, x_sub=take(data, sub), y_sub=y_sub, classes=classes,
                  counts=counts, n=n,
                  n_val_real=int(round(0.1 * n)) if val_samples is None else int(val_samples),
                  folds=folds_eff, dev=next(model.parameters()).device, epochs=int(epochs),
                  batch_size=int(batch_size), trial_epochs=int(trial_epochs), lrs=lrs,
                  lr_ratio=lr_ratio, weight_decay=weight_decay, seed=seed,
                  channels_last=cl)


def _measure_probes(st: _Study) -> None:
    """One pass: pooled outputs of every block, the head's input, BatchNorm input statistics and
    the forward time up to each block; then a cross-validated linear probe per block."""
    bn = _BNStats(st.work.net)
    try:
        feats, st.head_feats, st.fwd_per_sample, st.share = _probe_pass(
            st.work, st.x_sub, 64, st.dev, st.channels_last)
    finally:
        bn.remove()
    for i in range(len(st.work.blocks)):
        acc, se = _probe(feats[i], st.y_sub, st.folds, st.seed)
        st.probes.append({"block": st.work.blocks[i].name, "index": i, "accuracy": acc,
                          "stderr": se, "dim": int(feats[i].shape[1]), "folds": st.folds,
                          "samples": int(len(st.y_sub)), "forward_share": float(st.share[i])})
    accs = np.array([p["accuracy"] for p in st.probes])
    st.best = int(accs.argmax())
    st.similar = float(accs[st.best] - accs[-1]) <= max(SIMILAR_TOLERANCE,
                                                         st.probes[-1]["stderr"])
    kl = bn.kl(st.work.net)
    for i, b in enumerate(st.work.blocks):
        vals = [v for k_, v in kl.items()
                if any(k_ == m or k_.startswith(m + ".") for m in b.modules)]
        if vals:
            st.bn_shift.append({"block": b.name, "index": i, "kl": float(np.mean(vals)),
                                "layers": len(vals)})


def _size_and_prior(st: _Study) -> None:
    """Trainable parameters per option, the playbook's quadrant and the trials' halves."""
    work, nb, n, counts = st.work, len(st.work.blocks), st.n, st.counts
    head_params = sum(p.numel() for p in work.head.parameters())
    total_params = work.num_parameters()
    suffix_params = [head_params + sum(p.numel() for j in range(i, nb)
                                       for p in work.block_parameters(j))
                     for i in range(nb + 1)]
    st.small = float(np.median(counts)) < SMALL_PER_CLASS
    # Freeze through the block whose features transfer best (at least the last two blocks train).
    k = st.k = max(1, min(st.best + 1, nb - 2))
    st.size = {"samples": int(n), "classes": int(len(st.classes)),
               "min_per_class": int(counts.min()), "max_per_class": int(counts.max()),
               "median_per_class": float(np.median(counts)),
               "trainable_parameters": {"head_only": head_params,
                                        f"freeze_first({k})": suffix_params[k],
                                        "full": total_params},
               "samples_per_parameter": {"head_only": n / head_params,
                                         f"freeze_first({k})": n / suffix_params[k],
                                         "full": n / total_params}}
    st.prior_size = "small" if st.small else "large"
    st.prior_sim = "similar" if st.similar else "dissimilar"
    st.quadrant = {("small", "similar"): "head_only", ("small", "dissimilar"): "freeze_first",
                   ("large", "similar"): "full",
                   ("large", "dissimilar"): "full"}[(st.prior_size, st.prior_sim)]
    # Trial halves of the subsample: the same for every candidate.
    n_sub, n_cls = len(st.y_sub), len(st.classes)
    n_val = max(2 * n_cls, int(round(0.3 * n_sub)))
    st.n_val = min(n_val, n_sub - max(n_cls, 2))
    st.tr_pos, st.va_pos = stratified_holdout(st.y_sub, st.n_val, st.seed, sort=False)


def _measure_full_step(st: _Study, time_budget: Optional[float]) -> None:
    """Cost of one full fine-tuning step, measured on one batch (forward + backward): it plans
    the trials and the default budget; the estimates come from the trials themselves."""
    probe_model = copy.deepcopy(st.model)
    probe_model.freeze("full")
    probe_model.train()
    if st.channels_last:
        probe_model.net.to(memory_format=torch.channels_last)
    nb_meas = min(st.batch_size, len(st.tr_pos))
    xb = _to(probe_model.preprocess(take(st.x_sub, st.tr_pos[:nb_meas])), st.dev,
             st.channels_last)
    yb = torch.as_tensor(st.y_sub[st.tr_pos[:nb_meas]], dtype=torch.long, device=st.dev)
    t0 = time.perf_counter()
    nn.functional.cross_entropy(probe_model.run(xb).float(), yb).backward()
    st.full_per_sample = (time.perf_counter() - t0) / nb_meas
    full_run = (st.full_per_sample * st.n * st.epochs
                + st.fwd_per_sample * st.n_val_real * st.epochs)
    st.budget = time_budget if time_budget is not None else \
        min(600.0, max(5.0, BUDGET_SHARE * full_run))


def _choose_depths(st: _Study, ks: Optional[Sequence[Any]]) -> None:
    """The freeze_first depths to try, each checked as FineTuner checks it (the suffix on the
    cached tap gives the model's logits on two real samples): a depth that fails trains end to
    end, and its cost estimate says so."""
    from pyft.split import split_support

    work, nb = st.work, len(st.work.blocks)
    st.ks = sorted({st.k, max(1, nb - 2)}) if ks is None else \
        sorted({max(1, work.block_index(v, argument="ks")) for v in ks})
    example = work.preprocess(take(st.x_sub, np.arange(min(2, len(st.y_sub)))))
    for kk in st.ks:
        ok, why = split_support(work, kk, example)
        if not ok:
            st.split_notes[kk] = why
    if st.split_notes:  # trialled end to end, one uncached depth is enough
        st.ks = [kk for kk in st.ks if kk not in st.split_notes] or [st.k]


def _full_rates(st: _Study) -> int:
    """How many rates ``full`` tries: one when a cached ``freeze_first`` trial gives it its rate
    (see :func:`_run_trials`), else the whole grid."""
    return 1 if any(kk not in st.split_notes for kk in st.ks) else len(st.lrs)


def _trial_rows(st: _Study, t_start: float) -> int:
    """Size the trials' training half to the budget left: every rate of every candidate runs
    trial_epochs passes over it, then one recalibration and one validation pass."""
    fwd, full = st.fwd_per_sample, st.full_per_sample
    # full: the steps, then one BatchNorm recalibration pass, at its share of the rates
    nf = _full_rates(st) / len(st.lrs)
    train_cost = nf * (full + fwd / st.trial_epochs)
    fixed = _full_rates(st) * st.n_val * fwd
    for kk in st.ks:
        pre = float(st.share[kk - 1])
        if kk in st.split_notes:
            train_cost += full * (1 - pre) + fwd * (1 + pre)
            fixed += len(st.lrs) * st.n_val * fwd
        else:
            train_cost += full * (1 - pre) + fwd * (1 - pre)
            fixed += len(st.y_sub) * fwd * pre
    per_row = len(st.lrs) * st.trial_epochs * train_cost
    left = st.budget - (time.perf_counter() - t_start) - fixed
    # Fewer rows than this measure noise, not strategies: the budget gives way.
    min_rows = min(len(st.tr_pos), max(8 * st.batch_size, 20 * len(st.classes)))
    return int(np.clip(left / per_row if per_row > 0 else len(st.tr_pos), min_rows,
                       len(st.tr_pos)))


_Rows = Callable[[np.ndarray], Any]


def _cached(x: torch.Tensor, dev: torch.device, mask: Optional[torch.Tensor] = None,
            channels_last: bool = False) -> _Rows:
    """Rows of cached activations (with each row's attention mask for text suffixes)."""
    if mask is None:
        return lambda idx: _to(x[torch.as_tensor(idx)], dev, channels_last)
    from pyft.cache import _trim_padding

    # Each batch cut to the token columns its rows use, as the real run's cache batches are.
    return lambda idx: _trim_padding({"features": x[torch.as_tensor(idx)].to(dev),
                                      "attention_mask": mask[torch.as_tensor(idx)].to(dev)})


def _prefix_activations(st: _Study) -> Dict[int, Tuple[Any, ...]]:
    """Each splittable depth's prefix output on the subsample, computed once through the feature
    cache as the real run does: (train rows, val rows, seconds per sample, train masks,
    val masks)."""
    acts: Dict[int, Tuple[Any, ...]] = {}
    if all(kk in st.split_notes for kk in st.ks):
        return acts
    from pyft.features import extract_features

    tr_i, va_i = torch.as_tensor(st.tr_pos), torch.as_tensor(st.va_pos)
    with tempfile.TemporaryDirectory(prefix="pyft-advise-") as tmp:
        for kk in st.ks:
            if kk in st.split_notes:
                continue
            t0 = time.perf_counter()
            entry = extract_features(st.work, st.x_sub, cut=kk, cache_dir=tmp, batch_size=64,
                                     channels_last=st.channels_last, progress=False,
                                     distributed=False)
            act = torch.from_numpy(np.asarray(entry.features, dtype=np.float32))
            # Text entries carry each row's attention mask, which the suffix needs.
            mask = entry.extras.get("attention_mask")
            if mask is not None:
                mask = torch.from_numpy(np.asarray(mask))
            acts[kk] = (act[tr_i], act[va_i], (time.perf_counter() - t0) / len(st.y_sub),
                        None if mask is None else mask[tr_i],
                        None if mask is None else mask[va_i])
            del entry, act, mask
    return acts


def _candidates(st: _Study, acts: Dict[int, Tuple[Any, ...]]
                ) -> List[Tuple[str, str, Optional[int], Callable[[float], Dict[str, Any]]]]:
    """(name, strategy, k, run(lr)) of every candidate. Every trial starts from the model as
    given (the same new head for all): head_only gets the same short AdamW run as the others,
    not a converged solver; what is frozen trains from its cache."""
    from pyft.split import split_model

    dev = st.dev
    y_tr, y_va = st.y_sub[st.tr_pos], st.y_sub[st.va_pos]
    raw_tr, raw_va = take(st.x_sub, st.tr_pos), take(st.x_sub, st.va_pos)
    h = torch.from_numpy(np.ascontiguousarray(st.head_feats, dtype=np.float32))
    h_tr, h_va = h[torch.as_tensor(st.tr_pos)], h[torch.as_tensor(st.va_pos)]

    def raw(x: Any) -> Callable[[Any], _Rows]:
        return lambda m: (lambda idx: _to(m.preprocess(take(x, idx)), dev, st.channels_last))

    def runner(policy: str, opts: Dict[str, Any], fwd: Callable[[Any], Callable[[Any], Any]],
               x_tr: Callable[[Any], _Rows], x_va: Callable[[Any], _Rows]
               ) -> Callable[[float], Dict[str, Any]]:
        def run(lr: float) -> Dict[str, Any]:
            m = copy.deepcopy(st.model)
            groups = m.freeze(policy, lr=lr, weight_decay=st.weight_decay, **opts)
            if st.channels_last:  # as the real run trains (FineTuner's channels_last)
                m.net.to(memory_format=torch.channels_last)
            return _short_run(fwd(m), m.train, groups, x_tr(m), y_tr, x_va(m), y_va,
                              st.trial_epochs, st.batch_size, st.seed, m.net)
        return run

    def suffix_of(kk: int) -> Callable[[Any], Callable[[Any], Any]]:
        def make(m: Any) -> Callable[[Any], Any]:
            suffix = split_model(m, kk)[1]
            return lambda x: suffix(**x) if isinstance(x, dict) else suffix(x)
        return make

    def ff_runner(kk: int) -> Callable[[float], Dict[str, Any]]:
        opts = {"k": kk, "lr_ratio": st.lr_ratio}
        if kk in acts:
            a_tr, a_va, _, m_tr, m_va = acts[kk]
            return runner("freeze_first", opts, suffix_of(kk),
                          lambda m: _cached(a_tr, dev, m_tr, st.channels_last),
                          lambda m: _cached(a_va, dev, m_va, st.channels_last))
        return runner("freeze_first", opts, lambda m: m.run, raw(raw_tr), raw(raw_va))

    cands = [("head_only", "head_only", None,
              lambda: runner("head_only", {}, lambda m: m.head, lambda m: _cached(h_tr, dev),
                             lambda m: _cached(h_va, dev)))]
    cands += [(f"freeze_first({kk})", "freeze_first", kk, (lambda kk=kk: ff_runner(kk)))
              for kk in st.ks]
    cands += [("full", "full", None,
               lambda: runner("full", {"lr_ratio": st.lr_ratio}, lambda m: m.run, raw(raw_tr),
                              raw(raw_va)))]
    return cands


def _trial_one(st: _Study, name: str, strat: str, kk: Optional[int],
               make: Callable[[], Callable[[float], Dict[str, Any]]],
               acts: Dict[int, Tuple[Any, ...]], lrs: Sequence[float]) -> Dict[str, Any]:
    """One candidate over the learning rates ``lrs``: its best rate's result and the estimated
    time of the real run from the costs it measured."""
    runs = []
    t_make = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(st.seed)
        run_one = make()
    t_make = time.perf_counter() - t_make
    for lr in lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(st.seed)
            r = run_one(lr)
        r["lr"] = float(lr)
        runs.append(r)
        _log.info("trial %s lr %g: accuracy %.3f in %.1f s", name, lr, r["accuracy"],
                  r["seconds"])
    ok = [r for r in runs if not r["diverged"]] or runs
    top = max(ok, key=lambda r: (r["accuracy"], -r["lr"]))
    tr_s, ev_s = top["train_per_sample"], top["eval_per_sample"]
    if strat == "head_only":
        pre, note = st.fwd_per_sample, "one body pass, then the head on the cache"
    elif strat == "freeze_first" and kk in acts:
        pre = acts[kk][2]
        note = f"cached prefix ({pre * 1e3:.1f} ms/sample once), suffix trains"
    elif strat == "freeze_first":
        pre = 0.0
        note = (f"NOT cached: {st.split_notes[kk]}; end to end with the prefix frozen, "
                "the estimate is uncached")
    else:
        pre, note = 0.0, "end to end"
    est = pre * (st.n + st.n_val_real) + st.epochs * (tr_s * st.n + ev_s * st.n_val_real)
    return {
        "strategy": strat, "k": kk, "lr": top["lr"], "accuracy": top["accuracy"],
        "stderr": top["stderr"], "estimated_seconds": est,
        "cached": strat == "head_only" or (strat == "freeze_first" and kk in acts),
        "cost": {"prefix_per_sample": pre, "train_per_sample": tr_s, "eval_per_sample": ev_s},
        "trial_seconds": t_make + float(sum(r["seconds"] for r in runs)),
        "lr_grid": [{"lr": r["lr"], "accuracy": r["accuracy"], "diverged": r["diverged"]}
                    for r in runs],
        "note": note, "_correct": top["correct"]}


def _run_trials(st: _Study, t_start: float) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Every candidate's short run on the same rows: results by candidate name, and the setup."""
    rows = _trial_rows(st, t_start)
    st.tr_pos = st.tr_pos[:rows]
    t_trials = time.perf_counter()
    acts = _prefix_activations(st)
    results: Dict[str, Dict[str, Any]] = {}
    for name, strat, kk, make in _candidates(st, acts):
        lrs: Sequence[float] = st.lrs
        cached_ff = [r for r in results.values()
                     if r["strategy"] == "freeze_first" and r["cached"]]
        if strat == "full" and cached_ff:
            # full costs the most per trial: it takes the rate of the cached freeze_first trial
            # that trains the most blocks (the same head rate, the body at lr_ratio of it), the
            # nearest relative it has, instead of its own pass over the grid.
            donor = min(cached_ff, key=lambda r: r["k"])
            lrs = [donor["lr"]]
        results[name] = _trial_one(st, name, strat, kk, make, acts, lrs)
        if strat == "full" and cached_ff:
            results[name]["lr_from"] = f"freeze_first({donor['k']})"
            results[name]["note"] += (f"; rate taken from freeze_first({donor['k']})'s grid, "
                                      "not searched again")
    setup = {"train_samples": int(rows), "val_samples": int(len(st.va_pos)),
             "steps": int(st.trial_epochs * math.ceil(rows / st.batch_size)),
             "epochs": int(st.trial_epochs), "batch_size": int(st.batch_size),
             "lrs": list(st.lrs), "seconds": time.perf_counter() - t_trials,
             "budget": float(st.budget)}
    return results, setup


def _decide(st: _Study, results: Dict[str, Dict[str, Any]], setup: Dict[str, Any]
            ) -> Tuple[str, Optional[int], Optional[float], str]:
    """The cheapest candidate within tolerance of the best trial accuracy, and why."""
    cands_r = {c: r for c, r in results.items() if r.get("accuracy") is not None}
    best_name = max(cands_r, key=lambda c: (cands_r[c]["accuracy"],
                                            -cands_r[c]["estimated_seconds"]))
    top = cands_r[best_name]
    for r in cands_r.values():
        r["gap"] = float(top["accuracy"] - r["accuracy"])
        r["gap_stderr"] = _paired_stderr(top["_correct"], r["_correct"])
    ok = [c for c, r in cands_r.items() if r["gap"] <= ACCURACY_TOLERANCE + 1e-12]
    choice = min(ok, key=lambda c: cands_r[c]["estimated_seconds"])
    for c, r in cands_r.items():
        r["recommended"] = c == choice
        del r["_correct"]
    ch = cands_r[choice]
    parts = [f"on a {setup['train_samples']}-sample trial ({setup['steps']} steps each), "
             f"{choice} at lr {ch['lr']:g} reached {ch['accuracy']:.1%} "
             f"(est. {_fmt_s(ch['estimated_seconds'])} for {st.epochs} epochs on all {st.n} "
             "samples)"]
    if best_name != choice:
        parts.append(f"{best_name} reached {top['accuracy']:.1%} at lr {top['lr']:g} "
                     f"(est. {_fmt_s(top['estimated_seconds'])}): a gap of {ch['gap']:.1%} "
                     f"+- {ch['gap_stderr']:.1%}, within tolerance, so the cheaper one is "
                     "preferred")
    others = [f"{c} {r['accuracy']:.1%} ({_fmt_s(r['estimated_seconds'])})"
              for c, r in cands_r.items() if c not in (choice, best_name)]
    if others:
        parts.append("others: " + ", ".join(others))
    if ch["strategy"] == "freeze_first" and not ch["cached"]:
        parts.append(f"freeze_first runs WITHOUT a cached prefix ({st.split_notes[ch['k']]})")
    if ch["strategy"] != st.quadrant:
        parts.append(f"the quadrant prior ({st.prior_size} data, {st.prior_sim} domain) said "
                     f"{st.quadrant}")
    return ch["strategy"], ch["k"], ch["lr"], "; ".join(parts)


def _prior_reason(st: _Study) -> str:
    accs = [p["accuracy"] for p in st.probes]
    return (f"{st.prior_size} data ({float(np.median(st.counts)):.0f} samples per class, "
            f"threshold {SMALL_PER_CLASS}) and a {st.prior_sim} domain (last-block probe "
            f"{accs[-1]:.1%} vs best {accs[st.best]:.1%} at {st.probes[st.best]['block']}); "
            "no trial runs")


def _domain_remark(st: _Study, strategy: str) -> str:
    accs = [p["accuracy"] for p in st.probes]
    out = ""
    if not st.similar:
        out += (f". Probes: {st.probes[st.best]['block']} ({accs[st.best]:.1%}) beats the last "
                f"block ({accs[-1]:.1%}), so the top blocks do not transfer as they are")
    if strategy == "full" and not st.small and not st.similar:
        out += ("; with this much dissimilar data, training from scratch is an alternative to "
                "compare")
    return out
