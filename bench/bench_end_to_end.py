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
run for the E-epoch loops. Last line: one JSON object.
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
from pyft.cache import extract_features
from pyft.datasets import load_mnist_5k
from pyft.split import split_model


def _batches(n, bs, perm):
    for i in range(0, n, bs):
        yield perm[i:i + bs]


def naive_head_only(model, imgs, y, epochs, bs, lr, seed):
    """The loop a PyTorch user writes: frozen body under no_grad every epoch, then the head."""
    torch.manual_seed(seed)
    head = nn.Linear(model.head.in_features, model.num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    model.eval()
    yt = torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).numpy()
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
    return loss.item()


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
            for i in range(0, args.n, bs):
                model.features(model.preprocess(imgs[i:i + bs]))

    bare, extract = [], []
    # Warm-up: the first forward pays for oneDNN primitive creation and thread start-up.
    with torch.inference_mode():
        model.features(model.preprocess(imgs[:bs]))
    for _ in range(args.repeats):
        t = time.perf_counter()
        bare_forward()
        bare.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            extract_features(model, imgs, y, cache_dir=d, batch_size=bs, progress=False)
            extract.append(time.perf_counter() - t)
    t_bare, t_extract = statistics.median(bare), statistics.median(extract)
    print(f"extraction: bare forward {t_bare:.2f} s, pyft extract+store {t_extract:.2f} s, "
          f"throughput ratio {t_bare / t_extract:.2f}x (target >= 0.9)", file=sys.stderr)

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
        acc_pyft = clf.score(entry.features, entry.labels)
        with torch.inference_mode():
            acc_naive = float((head(torch.from_numpy(np.asarray(entry.features, np.float32)))
                               .argmax(1).numpy() == y).mean())
        print(f"head_only E={E}: naive loop {t_naive:.1f} s, pyft {t_pyft:.2f} s "
              f"(extract {t_ext:.2f} + heads {t_head:.3f}); ratio {t_naive / t_pyft:.1f}x, "
              f"limit {limit:.1f}x, target {0.8 * E:.1f}x; train accuracy naive {acc_naive:.3f} "
              f"pyft {acc_pyft:.3f}", file=sys.stderr)

        # -- 4. warm cache ----------------------------------------------------------------
        warm = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            e2 = extract_features(model, imgs, y, cache_dir=cache_dir, batch_size=bs, progress=False)
            warm.append(time.perf_counter() - t)
            assert e2.reused
        t_warm = statistics.median(warm)
        print(f"warm cache: {t_warm * 1000:.1f} ms (no backbone pass; cold extraction {t_ext:.2f} s)",
              file=sys.stderr)

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
                                lambda epoch: ent.batches(bs, seed=0, epoch=epoch), E)

        t = time.perf_counter()
        loss_re = run_recompute()
        t_re = time.perf_counter() - t
        t = time.perf_counter()
        loss_ca = run_cached()
        t_ca = time.perf_counter() - t
        print(f"freeze_first(k={k}, {model.blocks[k - 1].name}) E={E}: recompute prefix "
              f"{t_re:.1f} s, cached prefix {t_ca:.1f} s; ratio {t_re / t_ca:.1f}x (target >= 3); "
              f"final loss {loss_re:.3f} vs {loss_ca:.3f}", file=sys.stderr)

    summary = {
        "bench": "end_to_end", "model": "efficientnet_lite0", "image_size": args.image_size,
        "n": args.n, "epochs": E,
        "head_only_ratio": t_naive / t_pyft, "head_only_limit": limit, "head_only_target": 0.8 * E,
        "head_only_naive_s": t_naive, "head_only_pyft_s": t_pyft,
        "freeze_first_k": k, "freeze_first_ratio": t_re / t_ca, "freeze_first_target": 3.0,
        "extraction_throughput_ratio": t_bare / t_extract, "extraction_target": 0.9,
        "warm_cache_s": t_warm, "cold_extract_s": t_ext,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
