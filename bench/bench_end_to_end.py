"""End to end on the real EfficientNet-Lite0 and real MNIST digits: the cache against the loop a
user would otherwise write, in one run.

1. head_only, E epochs: pyft (one extraction into the cache + native head training on it) against
   the plain PyTorch transfer-learning loop that runs the frozen body every epoch with the same
   head and optimizer (SGD, momentum 0.9, batch 64). Limit: E body passes / (one body pass + E
   head epochs). Target: ratio >= 0.8 x E.
2. freeze_first(k), E epochs: the cached prefix (extracted once, batches gathered natively from
   the memmap) against recomputing the prefix every epoch; the trainable suffix is the same
   PyTorch code in both. Target: >= 3x.
3. Extraction throughput against a bare torch.inference_mode() forward over the same data.
   Target: >= 0.9x (the cache costs at most 10%).
4. A second run with a warm cache: no backbone pass.

    python bench/bench_end_to_end.py                 # ~4 minutes on 2 cores
    python bench/bench_end_to_end.py --quick         # smoke run

Each timing is the median of --repeats runs where it is cheap (extraction, warm cache) and one
run for the E-epoch loops. Correctness gates, checked before any ratio is printed: the cached
features equal the bare forward's within float16 rounding; the warm run reuses the entry; the
naive and pyft heads, and the suffixes trained on recomputed and on cached prefix outputs (same
batch order), end at the same loss and accuracy on the training data within noise. If any check
fails the script prints why, reports no speed-up and exits with status 1.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import pyft
from pyft.datasets import load_mnist_5k
from pyft.features import extract_features
from pyft.split import split_model


def _batches(n, bs, perm):
    for i in range(0, n, bs):
        yield perm[i:i + bs]


def naive_head_only(model, imgs, y, epochs, bs, lr, seed):
    """The loop a PyTorch user writes: frozen body under no_grad every epoch, then the head.

    For the correctness check it starts from pyft's initial head and draws pyft's sample order
    (``_core.epoch_permutation``), so the two runs differ only by the cache's float16 rounding;
    neither changes what a step costs.
    """
    from pyft import _core

    d, c = model.head.in_features, model.num_classes
    p0 = pyft.init_head_params("linear", d, c, seed=seed)
    head = nn.Linear(d, c)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(p0[:c * d].reshape(c, d)))
        head.bias.copy_(torch.from_numpy(p0[c * d:]))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    model.eval()
    yt = torch.as_tensor(y)
    for epoch in range(epochs):
        perm = np.asarray(_core.epoch_permutation(len(y), seed, epoch))
        for idx in _batches(len(y), bs, perm):
            with torch.no_grad():
                f = model.features(model.preprocess(imgs[idx]))
            loss = nn.functional.cross_entropy(head(f), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


def train_suffix(suffix, params, batches_fn, epochs):
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    suffix.train()
    for epoch in range(epochs):
        for x, yb in batches_fn(epoch):
            loss = nn.functional.cross_entropy(suffix(x), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return suffix


@torch.no_grad()
def loss_and_accuracy(module, features, y, bs=256):
    """Mean cross-entropy and accuracy of ``module`` (eval mode) on float32 ``features``."""
    module.eval()
    tot, correct = 0.0, 0
    yt = torch.as_tensor(y)
    for i in range(0, len(y), bs):
        out = module(torch.as_tensor(np.asarray(features[i:i + bs], np.float32)))
        tot += float(nn.functional.cross_entropy(out, yt[i:i + bs], reduction="sum"))
        correct += int((out.argmax(1) == yt[i:i + bs]).sum())
    return tot / len(y), correct / len(y)


def agree(a, b):
    """Two (loss, accuracy) pairs of the same training, up to sample order or float16 inputs."""
    return abs(a[0] - b[0]) <= 0.05 * max(a[0], 0.02) + 0.01 and abs(a[1] - b[1]) <= 0.02


FAILED = []


def check(ok, what):
    if not ok:
        FAILED.append(what)
        print(f"CORRECTNESS FAILED: {what}; no speed-up reported", file=sys.stderr)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="MNIST images (of the 5000)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", default="blocks.13", help="freeze_first cut (block name or count)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.image_size, args.epochs, args.repeats = 256, 64, 3, 1
    torch.manual_seed(0)
    X, y = load_mnist_5k()
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(y))[:args.n]
    imgs = X[pick].reshape(-1, 28, 28).astype(np.uint8)
    y = y[pick].astype(np.int64)
    E, bs = args.epochs, args.batch_size
    model = pyft.load_model("efficientnet_lite0", 10, image_size=args.image_size)
    model.eval()
    print(f"EfficientNet-Lite0 at {args.image_size}px, {args.n} MNIST images, E={E}, batch {bs}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)

    # -- 3. extraction throughput against a bare forward ------------------------------------
    def bare_forward():
        with torch.inference_mode():
            return torch.cat([model.features(model.preprocess(imgs[i:i + bs]))
                              for i in range(0, args.n, bs)]).numpy()

    bare, extract = [], []
    # Warm-up: the first forward pays for oneDNN primitive creation and thread start-up.
    with torch.inference_mode():
        model.features(model.preprocess(imgs[:bs]))
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = bare_forward()
        bare.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            e = extract_features(model, imgs, y, cache_dir=d, batch_size=bs, progress=False)
            extract.append(time.perf_counter() - t)
            cached = np.asarray(e.features, np.float32)
    t_bare, t_extract = statistics.median(bare), statistics.median(extract)
    # float16 storage: |x - fp16(x)| <= 2^-11 |x| (+ subnormal spacing)
    feat_err = float(np.max(np.abs(cached - ref) - 2.0 ** -11 * np.abs(ref)))
    if check(cached.shape == ref.shape and feat_err <= 1e-6,
             f"cached features differ from the bare forward beyond float16 rounding "
             f"({feat_err:.2e})"):
        print(f"extraction: bare forward {t_bare:.2f} s, pyft extract+store {t_extract:.2f} s, "
              f"throughput ratio {t_bare / t_extract:.2f}x (target >= 0.9); features equal "
              "within float16 rounding", file=sys.stderr)

    with tempfile.TemporaryDirectory() as cache_dir:
        # -- 1. head_only -----------------------------------------------------------------
        lr = 0.01
        t = time.perf_counter()
        head = naive_head_only(model, imgs, y, E, bs, lr, seed=0)
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        entry = extract_features(model, imgs, y, cache_dir=cache_dir, batch_size=bs, progress=False)
        t_ext = time.perf_counter() - t
        t = time.perf_counter()
        clf = pyft.HeadClassifier(solver="sgd", lr=lr, momentum=0.9, weight_decay=0.0,
                                  epochs=E, batch_size=bs, schedule="constant", random_state=0)
        clf.fit(entry.features, entry.labels)
        t_head = time.perf_counter() - t
        t_pyft = t_ext + t_head
        limit = (E * t_bare) / (t_bare + t_head)
        head_pyft = nn.Linear(model.head.in_features, model.num_classes)
        with torch.no_grad():
            head_pyft.weight.copy_(torch.from_numpy(clf.coef_))
            head_pyft.bias.copy_(torch.from_numpy(clf.intercept_))
        la_pyft = loss_and_accuracy(head_pyft, entry.features, y)
        la_naive = loss_and_accuracy(head, entry.features, y)
        head_ok = check(agree(la_naive, la_pyft),
                        f"head_only: naive head loss/accuracy {la_naive[0]:.4f}/{la_naive[1]:.4f}"
                        f", pyft {la_pyft[0]:.4f}/{la_pyft[1]:.4f}")
        if head_ok:
            print(f"head_only E={E}: naive loop {t_naive:.1f} s, pyft {t_pyft:.2f} s "
                  f"(extract {t_ext:.2f} + heads {t_head:.3f}); ratio {t_naive / t_pyft:.1f}x, "
                  f"limit {limit:.1f}x, target {0.8 * E:.1f}x; train loss/accuracy naive "
                  f"{la_naive[0]:.4f}/{la_naive[1]:.3f}, pyft {la_pyft[0]:.4f}/{la_pyft[1]:.3f}",
                  file=sys.stderr)

        # -- 4. warm cache ----------------------------------------------------------------
        warm = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            e2 = extract_features(model, imgs, y, cache_dir=cache_dir, batch_size=bs,
                                  progress=False)
            warm.append(time.perf_counter() - t)
        t_warm = statistics.median(warm)
        if check(e2.reused and np.array_equal(np.asarray(e2.features), np.asarray(entry.features)),
                 "the warm run did not reuse the cold run's entry unchanged"):
            print(f"warm cache: {t_warm * 1000:.1f} ms (no backbone pass; cold extraction "
                  f"{t_ext:.2f} s)", file=sys.stderr)

        # -- 2. freeze_first(k) -------------------------------------------------------------
        k = model.block_index(int(args.k) if str(args.k).isdigit() else args.k)
        yt = torch.as_tensor(y)

        def run_recompute():
            torch.manual_seed(0)
            m = pyft.load_model("efficientnet_lite0", 10, image_size=args.image_size)
            groups = m.freeze("freeze_first", k=k)
            prefix, suffix = split_model(m, k)
            prefix.eval()
            params = [p for g in groups for p in g["params"]]

            def batches(epoch):
                perm = np.random.default_rng([0, epoch]).permutation(len(y))
                for idx in _batches(len(y), bs, perm):
                    with torch.no_grad():
                        z = prefix(m.preprocess(imgs[idx]))
                    yield z, yt[idx]

            return train_suffix(suffix, params, batches, E)

        def run_cached():
            torch.manual_seed(0)
            m = pyft.load_model("efficientnet_lite0", 10, image_size=args.image_size)
            groups = m.freeze("freeze_first", k=k)
            _, suffix = split_model(m, k)
            params = [p for g in groups for p in g["params"]]
            ent = extract_features(m, imgs, y, cut=k, cache_dir=cache_dir, batch_size=bs,
                                   progress=False)
            return train_suffix(suffix, params,
                                lambda epoch: ent.batches(bs, seed=0, epoch=epoch), E), ent

        t = time.perf_counter()
        suffix_re = run_recompute()
        t_re = time.perf_counter() - t
        t = time.perf_counter()
        suffix_ca, ent = run_cached()
        t_ca = time.perf_counter() - t
        la_re = loss_and_accuracy(suffix_re, ent.features, y)
        la_ca = loss_and_accuracy(suffix_ca, ent.features, y)
        ff_ok = check(agree(la_re, la_ca),
                      f"freeze_first: suffix on the recomputed prefix ends at loss/accuracy "
                      f"{la_re[0]:.4f}/{la_re[1]:.4f}, on the cached prefix {la_ca[0]:.4f}/"
                      f"{la_ca[1]:.4f}")
        if ff_ok:
            print(f"freeze_first(k={k}, {model.blocks[k - 1].name}) E={E}: recompute prefix "
                  f"{t_re:.1f} s, cached prefix {t_ca:.1f} s; ratio {t_re / t_ca:.1f}x (target "
                  f">= 3); train loss/accuracy {la_re[0]:.4f}/{la_re[1]:.3f} vs "
                  f"{la_ca[0]:.4f}/{la_ca[1]:.3f}", file=sys.stderr)

    ok = not FAILED
    summary = {
        "bench": "end_to_end", "model": "efficientnet_lite0", "image_size": args.image_size,
        "n": args.n, "epochs": E,
        "correct": ok, "failed_checks": FAILED,
        "head_only_ratio": t_naive / t_pyft if ok else None, "head_only_limit": limit,
        "head_only_target": 0.8 * E, "head_only_naive_s": t_naive, "head_only_pyft_s": t_pyft,
        "head_only_train_loss_accuracy": {"naive": la_naive, "pyft": la_pyft},
        "freeze_first_k": k, "freeze_first_ratio": t_re / t_ca if ok else None,
        "freeze_first_target": 3.0, "freeze_first_recompute_s": t_re,
        "freeze_first_cached_s": t_ca,
        "freeze_first_train_loss_accuracy": {"recompute": la_re, "cached": la_ca},
        "extraction_throughput_ratio": t_bare / t_extract if ok else None,
        "extraction_target": 0.9, "extraction_max_excess_over_fp16_rounding": feat_err,
        "warm_cache_s": t_warm, "cold_extract_s": t_ext,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
