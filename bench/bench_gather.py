#!/usr/bin/env python
"""Benchmark pyft's native batch gather against the NumPy / PyTorch lines a user would write.

Standalone script (no pytest). The feature cache keeps frozen features as a float16 memmap on
disk; training the unfrozen suffix reads shuffled mini-batches of rows from it as float32. One
run here is one epoch of that: a shuffled permutation of all rows cut into batches of 256, each
batch gathered into float32 by

- ``pyft``: ``_core.gather_rows(mm, idx, out=buf)`` into one reused buffer (all threads, and
  ``n_threads=1``);
- ``numpy``: ``mm[idx].astype(np.float32)``;
- ``numpy_sorted``: ``mm[np.sort(idx)].astype(np.float32)`` (sorted reads; same rows, another
  order within the batch, which training does not care about);
- ``torch``: ``torch.from_numpy(mm[idx]).float()``.

Every method is checked bit for bit against ``mm[idx].astype(np.float32)`` first, then warmed up
(the file is in the page cache after writing; warm-up maps its pages), then timed: the median
over ``--runs`` epochs, methods interleaved within each run so that drift hits all alike.
Bandwidth counts the bytes a gather must move: 2 bytes read + 4 written per element; the
machine's peak is a large float32 ``np.copyto`` (read + write) measured in the same run.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from pyft import _core

BYTES_PER_ELEMENT = 2 + 4  # float16 read, float32 written


def log(*a):
    print(*a, flush=True)


def copy_bandwidth(n_bytes=256 << 20, repeats=5):
    """Streaming read+write bandwidth (GB/s) of one float32 copy, best of a few."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best / 1e9


def make_memmap(path, rows, dim, seed):
    """Write a (rows, dim) float16 feature file chunk by chunk and map it read-only."""
    rng = np.random.default_rng(seed)
    w = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, dim))
    for lo in range(0, rows, 4096):
        hi = min(rows, lo + 4096)
        w[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    w.flush()
    del w
    return np.memmap(path, dtype=np.float16, mode="r", shape=(rows, dim))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--runs", type=int, default=7, help="timed epochs per method (median)")
    ap.add_argument("--threads", type=int, default=0, help="pyft threads (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write the memmap (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="10000 rows, 3 runs (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.runs = min(args.rows, 10000), min(args.runs, 3)

    threads = _core.num_threads(args.threads)
    log(f"pyft gather benchmark: ({args.rows}, {args.dim}) float16 memmap, batches of "
        f"{args.batch}, {args.runs} runs; pyft threads {threads}, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}")
    peak = copy_bandwidth()
    log(f"machine: float32 copy {peak:.1f} GB/s (read + write)")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        mm = make_memmap(os.path.join(tmp, "features.f16"), args.rows, args.dim, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        perm = rng.permutation(args.rows)
        batches = [perm[i:i + args.batch] for i in range(0, args.rows, args.batch)]
        buf = np.empty((args.batch, args.dim), np.float32)

        def pyft_all(idx):
            return _core.gather_rows(mm, idx, buf[: len(idx)], n_threads=args.threads)

        def pyft_one(idx):
            return _core.gather_rows(mm, idx, buf[: len(idx)], n_threads=1)

        methods = {
            "pyft": pyft_all,
            "pyft_1thread": pyft_one,
            "numpy": lambda idx: mm[idx].astype(np.float32),
            "numpy_sorted": lambda idx: mm[np.sort(idx)].astype(np.float32),
            "torch": lambda idx: torch.from_numpy(mm[idx]).float(),
        }

        # Correctness first: every method against the reference on a few batches (and the last,
        # shorter one).
        for idx in batches[:3] + batches[-1:]:
            want = mm[idx].astype(np.float32)
            for name, fn in methods.items():
                got = np.asarray(fn(idx))
                if name == "numpy_sorted":
                    want_sorted = mm[np.sort(idx)].astype(np.float32)
                    ok = np.array_equal(got.view(np.uint32), want_sorted.view(np.uint32))
                else:
                    ok = np.array_equal(got.view(np.uint32), want.view(np.uint32))
                if not ok:
                    raise SystemExit(f"{name} differs from mm[idx].astype(np.float32)")
        log("correctness: every method matches mm[idx].astype(np.float32) bit for bit")

        def epoch(fn):
            t = time.perf_counter()
            for idx in batches:
                fn(idx)
            return time.perf_counter() - t

        for fn in methods.values():  # warm-up: page mappings, allocator, thread pools
            epoch(fn)
        times = {name: [] for name in methods}
        for _ in range(args.runs):
            for name, fn in methods.items():
                time.sleep(0.05)  # lets OpenMP / torch worker threads stop spinning
                times[name].append(epoch(fn))
        del mm

    moved = args.rows * args.dim * BYTES_PER_ELEMENT
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {
            "epoch_s": med,
            "batch_us": med / len(batches) * 1e6,
            "gb_s": moved / med / 1e9,
            "min_epoch_s": min(ts),
        }
    baselines = ["numpy", "numpy_sorted", "torch"]
    best_base = min(baselines, key=lambda n: res[n]["epoch_s"])
    log(f"\n{'method':<14}{'us/batch':>10}{'GB/s':>8}{'of peak':>9}{'pyft x':>8}")
    for name, r in res.items():
        ratio = r["epoch_s"] / res["pyft"]["epoch_s"]
        log(f"{name:<14}{r['batch_us']:>10.1f}{r['gb_s']:>8.2f}{r['gb_s'] / peak:>9.0%}"
            f"{ratio:>8.2f}")
    ratios = {f"pyft_vs_{b}": res[b]["epoch_s"] / res["pyft"]["epoch_s"] for b in baselines}
    log(f"\npyft is {ratios['pyft_vs_numpy']:.2f}x mm[idx].astype(np.float32), "
        f"{ratios['pyft_vs_torch']:.2f}x torch.from_numpy(mm[idx]).float(), "
        f"{ratios['pyft_vs_' + best_base]:.2f}x the fastest baseline ({best_base})")
    summary = {
        "bench": "gather",
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
        "runs": args.runs,
        "batches_per_epoch": len(batches),
        "pyft_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "copy_peak_gb_s": peak,
        "bytes_per_element": BYTES_PER_ELEMENT,
        "methods": res,
        **ratios,
        "fastest_baseline": best_base,
        "pyft_vs_fastest_baseline": ratios["pyft_vs_" + best_base],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
