"""Strategy advice: which of the four fine-tuning strategies to use, from measurements.

:func:`advise` measures, on the user's own data:

1. **Size**: samples, samples per class, and samples per trainable parameter of each option.
2. **Similarity to the pretraining domain**:

   - one forward pass over a subsample records the pooled output of every block; a
     cross-validated linear probe (the native L-BFGS head trainer) at each depth tells how well
     each depth's features separate the user's classes. When an earlier block's probe beats the
     last block's, the top blocks do not transfer to this data;
   - where the body has BatchNorm, how far the data's per-channel activation statistics are from
     the stored running statistics (KL divergence of the two Gaussians, averaged per block).

3. **Trial runs** within a time budget: short runs of ``full`` and ``freeze_first(k)`` on the
   subsample (``head_only`` comes from the probe features), each giving a held-out accuracy and a
   measured cost per sample, extrapolated to a whole run over all the data.

Thresholds (module constants; the advice reports them):

``SMALL_PER_CLASS = 1000``
    Data is "small" below this many samples per class. ImageNet-1k, where the weights come from,
    has about 1,300 per class; the playbook (Yosinski et al. 2014, "How transferable are
    features in deep neural networks?"; the CS231n transfer-learning notes) calls data small
    relative to that.
``SIMILAR_TOLERANCE = 0.01``
    The domain counts as "similar" when the last block's probe accuracy is within one percentage
    point (or one standard error of the cross-validation, if larger) of the best depth's.
``ACCURACY_TOLERANCE = 0.01``
    Among trial results, a cheaper strategy is preferred when its accuracy is within this
    (or one standard error of the trial's validation accuracy, if larger) of the best.

The quadrant table is the prior; trial results, when they ran, decide. On real data full
fine-tuning from pretrained weights often wins even for "dissimilar" data, while freezing the
first blocks comes close at a fraction of the cost: the advice states both in numbers.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from pyft.data import take

__all__ = ["advise", "Advice", "SMALL_PER_CLASS", "SIMILAR_TOLERANCE", "ACCURACY_TOLERANCE"]

SMALL_PER_CLASS = 1000
SIMILAR_TOLERANCE = 0.01
ACCURACY_TOLERANCE = 0.01
_log = logging.getLogger("pyft")


@dataclass
class Advice:
    """The recommendation of :func:`advise` and every measurement behind it."""

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

    def policy(self) -> Any:
        """The recommended strategy as a :class:`pyft.freezing.Policy`."""
        from pyft import freezing

        if self.strategy == "freeze_first":
            return freezing.freeze_first(self.k)
        return getattr(freezing, self.strategy)()

    def to_dict(self) -> Dict[str, Any]:
        return {
            "strategy": self.strategy, "k": self.k, "reason": self.reason, "size": self.size,
            "probes": self.probes, "bn_shift": self.bn_shift, "trials": self.trials,
            "prior": self.prior, "thresholds": self.thresholds, "seconds": self.seconds,
        }

    def __str__(self) -> str:
        name = self.strategy + (f"(k={self.k}: {self.block_names[self.k - 1]})"
                                if self.strategy == "freeze_first" and self.k else "")
        lines = [f"Recommended: {name}", f"Why: {self.reason}"]
        s = self.size
        lines.append(f"Data: {s['samples']} samples, {s['classes']} classes, "
                     f"{s['min_per_class']}-{s['max_per_class']} per class ({self.prior['size']})")
        if self.probes:
            best = max(self.probes, key=lambda p: p["accuracy"])
            lines.append(
                f"Linear probes ({self.probes[0]['folds']}-fold CV on {self.probes[0]['samples']} samples): "
                + ", ".join(f"{p['block']} {p['accuracy']:.3f}" for p in self.probes)
                + f"; best {best['block']}; domain {self.prior['similarity']}")
        if self.bn_shift:
            worst = max(self.bn_shift, key=lambda b: b["kl"])
            lines.append(f"BatchNorm statistics shift (KL, nats): first block "
                         f"{self.bn_shift[0]['kl']:.2f}, largest {worst['kl']:.2f} at {worst['block']}")
        for name_, t in self.trials.items():
            acc = "n/a" if t.get("accuracy") is None else f"{t['accuracy']:.3f}"
            lines.append(f"  {name_:<22} accuracy {acc:>6}  est. run {_fmt_s(t['estimated_seconds'])}"
                         f"  ({t['note']})")
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
        raise ValueError(f"inputs and labels must have the same length; got {n} inputs and {len(y)} labels")
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


# ---------------------------------------------------------------------------- measurements
class _BNStats:
    """Per-channel mean and variance of every BatchNorm layer's input, accumulated over batches."""

    def __init__(self, net: nn.Module) -> None:
        self.sums: Dict[str, List[torch.Tensor]] = {}
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
            s[0] += x.sum(dims)
            s[1] += (x * x).sum(dims)
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
            rm = m.running_mean.double()
            rv = m.running_var.double() + m.eps
            kl = 0.5 * ((mu - rm) ** 2 / rv + var / rv - 1.0 - torch.log(var / rv))
            out[name] = float(kl.mean())
        return out


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


def _trial(model: Any, policy: Any, x_tr: Any, y_tr: np.ndarray, x_va: Any, y_va: np.ndarray,
           budget: float, lr: float, batch_size: int, seed: int, max_epochs: int
           ) -> Dict[str, Any]:
    """Train a copy of ``model`` under ``policy`` for at most ``budget`` seconds."""
    m = copy.deepcopy(model)
    groups = m.freeze(policy, lr=lr, weight_decay=1e-4)
    opt = torch.optim.AdamW(groups)
    gen = torch.Generator().manual_seed(seed)
    yt = torch.as_tensor(y_tr, dtype=torch.long)
    n = len(y_tr)
    seen, train_time, epochs = 0, 0.0, 0
    m.train()
    start = time.perf_counter()
    while epochs < max_epochs:
        order = torch.randperm(n, generator=gen).numpy()
        for sl in _batches(n, batch_size):
            idx = order[sl]
            t0 = time.perf_counter()
            xb = m.preprocess(take(x_tr, idx))
            loss = nn.functional.cross_entropy(m.run(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_time += time.perf_counter() - t0
            seen += len(idx)
            # The budget is soft for the first epoch: a trial that saw only part of the data
            # would measure an untrained network, not the strategy.
            if time.perf_counter() - start > budget and seen >= n:
                break
        else:
            epochs += 1
            continue
        break
    m.eval()
    correct = 0
    with torch.inference_mode():
        for sl in _batches(len(y_va), 64):
            pred = m.run(m.preprocess(take(x_va, np.arange(len(y_va))[sl]))).argmax(1).numpy()
            correct += int((pred == y_va[sl]).sum())
    acc = correct / len(y_va)
    return {"accuracy": acc, "stderr": math.sqrt(max(acc * (1 - acc), 1e-12) / len(y_va)),
            "seconds_per_sample": train_time / max(seen, 1), "samples_seen": seen,
            "epochs": seen / n, "trial_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------- advise
def advise(model: Any, data: Any, labels: Any = None, *, time_budget: Optional[float] = None,
           epochs: int = 10, probe_samples: int = 1000, folds: int = 3, trials: bool = True,
           batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> Advice:
    """Recommend ``head_only``, ``freeze_first(k)``, ``full`` or ``scratch`` for ``model`` on ``data``.

    Parameters
    ----------
    model : FineTunableModel or str
        A model from :func:`pyft.load_model` (a spec string is loaded with the labels' classes).
        It is not modified: trials run on copies.
    data : images or texts, or (inputs, labels)
        What :meth:`FineTunableModel.preprocess` accepts, indexable by sample.
    labels : array of shape (n,), optional
    time_budget : float, optional
        Seconds for the trial runs. Default: 10% of the estimated time of one full fine-tuning
        run of ``epochs`` epochs over all the data, between 5 s and 10 min.
    epochs : int
        Epochs of the real run the cost estimates assume.
    probe_samples : int
        Size of the stratified subsample that probes and trials use.
    folds : int
        Cross-validation folds of the linear probes.
    trials : bool
        ``False`` skips the trial runs (advice from size and probes only).
    batch_size, lr : int, float
        Trial runs use AdamW at ``lr`` for the head and ``0.1 * lr`` for pretrained layers.
    seed : int
        Seeds the subsample, the folds and the trials.

    Returns
    -------
    Advice
        ``strategy``, ``k``, a readable ``reason`` and every measurement (``print(advice)``).
    """
    from pyft.models import FineTunableModel, load_model

    t_start = time.perf_counter()
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
                        ("folds", folds, 2), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds; got {time_budget!r}")

    n = len(y_all)
    counts = np.bincount(y_idx)
    rng = np.random.default_rng(seed)
    sub = _stratified_subsample(y_idx, probe_samples, rng)
    y_sub = y_idx[sub]
    x_sub = take(data, sub)
    folds_eff = int(min(folds, np.bincount(y_sub).min()))
    if folds_eff < 2:
        raise ValueError("every class needs at least 2 samples in the probe subsample; "
                         f"the smallest class has {int(counts.min())}")

    # One pass: pooled outputs of every block and BatchNorm input statistics.
    work = copy.deepcopy(model)
    work.eval()
    bn = _BNStats(work.net)
    nb = len(work.blocks)
    pooled: List[List[np.ndarray]] = [[] for _ in range(nb)]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for sl in _batches(len(sub), 64):
                outs = work.block_outputs(work.preprocess(take(x_sub, np.arange(len(sub))[sl])),
                                          range(nb))
                for i in range(nb):
                    pooled[i].append(outs[i].float().numpy())
    finally:
        bn.remove()
    fwd_per_sample = (time.perf_counter() - t0) / len(sub)
    feats = [np.concatenate(p) for p in pooled]

    probes = []
    for i in range(nb):
        acc, se = _probe(feats[i], y_sub, folds_eff, seed)
        probes.append({"block": work.blocks[i].name, "index": i, "accuracy": acc, "stderr": se,
                       "dim": int(feats[i].shape[1]), "folds": folds_eff, "samples": int(len(sub))})
    accs = np.array([p["accuracy"] for p in probes])
    best = int(accs.argmax())
    last_gap = float(accs[best] - accs[-1])
    similar = last_gap <= max(SIMILAR_TOLERANCE, probes[-1]["stderr"])

    # BatchNorm shift per block.
    kl = bn.kl(work.net)
    bn_shift = []
    for i, b in enumerate(work.blocks):
        vals = [v for k_, v in kl.items() if any(k_ == m or k_.startswith(m + ".") for m in b.modules)]
        if vals:
            bn_shift.append({"block": b.name, "index": i, "kl": float(np.mean(vals)), "layers": len(vals)})

    # Size of the options.
    head_params = sum(p.numel() for p in work.head.parameters())
    total_params = work.num_parameters()
    suffix_params = [head_params + sum(p.numel() for j in range(i, nb) for p in work.block_parameters(j))
                     for i in range(nb + 1)]
    per_class_min, per_class_max = int(counts.min()), int(counts.max())
    small = float(np.median(counts)) < SMALL_PER_CLASS
    # Freeze through the block whose features transfer best (at least the last two blocks train).
    k = max(1, min(best + 1, nb - 2))
    size = {"samples": int(n), "classes": int(len(classes)), "min_per_class": per_class_min,
            "max_per_class": per_class_max, "median_per_class": float(np.median(counts)),
            "trainable_parameters": {"head_only": head_params, f"freeze_first({k})": suffix_params[k],
                                     "full": total_params},
            "samples_per_parameter": {"head_only": n / head_params,
                                      f"freeze_first({k})": n / suffix_params[k],
                                      "full": n / total_params}}
    prior_size = "small" if small else "large"
    prior_sim = "similar" if similar else "dissimilar"
    quadrant = {("small", "similar"): "head_only", ("small", "dissimilar"): "freeze_first",
                ("large", "similar"): "full", ("large", "dissimilar"): "full"}[(prior_size, prior_sim)]

    # Trials.
    from pyft.heads import HeadClassifier

    results: Dict[str, Dict[str, Any]] = {}
    n_val = max(len(classes) * 2, len(sub) // 4)
    va, tr = np.arange(len(sub))[:n_val], np.arange(len(sub))[n_val:]
    f_last = feats[-1]
    mu, sd = f_last[tr].mean(0), f_last[tr].std(0) + 1e-6
    clf = HeadClassifier(solver="lbfgs", C=1.0, max_iter=100, random_state=seed)
    clf.fit((f_last[tr] - mu) / sd, y_sub[tr])
    acc_head = float(clf.score((f_last[va] - mu) / sd, y_sub[va]))
    results["head_only"] = {
        "accuracy": acc_head, "stderr": math.sqrt(max(acc_head * (1 - acc_head), 1e-12) / len(va)),
        "estimated_seconds": fwd_per_sample * n, "note": "one body pass, then the native head trainer"}

    # Cost of a full fine-tuning run, measured on one batch (forward + backward).
    probe_model = copy.deepcopy(model)
    probe_model.freeze("full")
    probe_model.train()
    nb_meas = min(batch_size, len(tr))
    xb = probe_model.preprocess(take(x_sub, tr[:nb_meas]))
    yb = torch.as_tensor(y_sub[tr[:nb_meas]], dtype=torch.long)
    t0 = time.perf_counter()
    nn.functional.cross_entropy(probe_model.run(xb), yb).backward()
    full_per_sample = (time.perf_counter() - t0) / nb_meas
    del probe_model
    full_run = full_per_sample * n * epochs
    budget = time_budget if time_budget is not None else min(600.0, max(5.0, 0.1 * full_run))

    if trials:
        y_tr, y_va = y_sub[tr], y_sub[va]
        x_tr, x_va = take(x_sub, tr), take(x_sub, va)
        for name, policy, share in ((f"freeze_first({k})", ("freeze_first", {"k": k}), 0.4),
                                    ("full", ("full", {}), 0.6)):
            from pyft.freezing import freeze_first, full

            pol = freeze_first(k) if policy[0] == "freeze_first" else full()
            r = _trial(model, pol, x_tr, y_tr, x_va, y_va, budget * share, lr, batch_size, seed,
                       max_epochs=epochs)
            if name == "full":
                r["estimated_seconds"] = r["seconds_per_sample"] * n * epochs
                r["note"] = f"{r['epochs']:.1f} trial epochs on {len(tr)} samples"
            else:
                prefix = fwd_per_sample * (k / nb)  # rough split of the forward cost
                r["estimated_seconds"] = prefix * n + max(r["seconds_per_sample"] - prefix, 0) * n * epochs
                r["note"] = (f"{r['epochs']:.1f} trial epochs on {len(tr)} samples; "
                             "cached prefix in the real run")
            results[name] = r
            _log.info("trial %s: accuracy %.3f in %.1f s", name, r["accuracy"], r["trial_seconds"])
    results["scratch"] = {
        "accuracy": None, "estimated_seconds": full_per_sample * n * epochs * 3,
        "note": "not trialled: needs far more data than a subsample; assumes 3x the epochs"}

    # Decision.
    if trials:
        cands = {kname: r for kname, r in results.items() if r.get("accuracy") is not None}
        top = max(cands.values(), key=lambda r: r["accuracy"])
        tol = max(ACCURACY_TOLERANCE, top["stderr"])
        ok = [kname for kname, r in cands.items() if r["accuracy"] >= top["accuracy"] - tol]
        choice = min(ok, key=lambda kname: cands[kname]["estimated_seconds"])
        best_name = max(cands, key=lambda kname: cands[kname]["accuracy"])
        strategy = "freeze_first" if choice.startswith("freeze_first") else choice
        parts = [f"on a {len(tr)}-sample trial, {choice} reached {cands[choice]['accuracy']:.1%} "
                 f"(est. {_fmt_s(cands[choice]['estimated_seconds'])} for {epochs} epochs on all {n} samples)"]
        if best_name != choice:
            parts.append(f"{best_name} reached {cands[best_name]['accuracy']:.1%} at "
                         f"{_fmt_s(cands[best_name]['estimated_seconds'])}, within {tol:.1%}, so "
                         "the cheaper one is preferred")
        else:
            others = [f"{kname} {r['accuracy']:.1%} ({_fmt_s(r['estimated_seconds'])})"
                      for kname, r in cands.items() if kname != choice]
            parts.append("others: " + ", ".join(others))
        if strategy != quadrant:
            parts.append(f"the quadrant prior ({prior_size} data, {prior_sim} domain) said {quadrant}")
        reason = "; ".join(parts)
    else:
        strategy = quadrant
        reason = (f"{prior_size} data ({float(np.median(counts)):.0f} samples per class, threshold "
                  f"{SMALL_PER_CLASS}) and a {prior_sim} domain (last-block probe {accs[-1]:.1%} vs "
                  f"best {accs[best]:.1%} at {probes[best]['block']}); no trial runs")
    if not similar:
        reason += (f". Probes: {probes[best]['block']} ({accs[best]:.1%}) beats the last block "
                   f"({accs[-1]:.1%}), so the top blocks do not transfer as they are")
    if strategy == "full" and not small and not similar:
        reason += "; with this much dissimilar data, training from scratch is an alternative to compare"
    return Advice(
        strategy=strategy, k=k if strategy == "freeze_first" else None, reason=reason, size=size,
        probes=probes, bn_shift=bn_shift, trials=results,
        prior={"size": prior_size, "similarity": prior_sim, "quadrant": quadrant},
        thresholds={"small_per_class": SMALL_PER_CLASS, "similar_tolerance": SIMILAR_TOLERANCE,
                    "accuracy_tolerance": ACCURACY_TOLERANCE, "time_budget": budget},
        seconds=time.perf_counter() - t_start, block_names=work.block_names)
