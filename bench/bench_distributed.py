#!/usr/bin/env python
"""Benchmark sharded extraction under torchrun against one process on the same cores.

Standalone script (no pytest). The feature cache splits an entry's chunks over torch.distributed
ranks; docs/SCALING.md models a rank's time as ``n / (N r) + T_start``. On one 2-core machine
more ranks cannot add compute, so this measures what sharding costs: the same ``pyft extract``
of the bundled MNIST digits with EfficientNet-Lite0,

- ``one``: one process with all ``--cores`` threads (what a user runs without torchrun);
- ``torchrun``: ``torchrun --nproc-per-node N`` with ``cores / N`` threads per rank, the
  shards written into one cache entry and the manifest by rank 0.

Each run starts from an empty cache folder; the two are interleaved, ``--runs`` times, and the
medians compared. Two times per run: the command's wall time (process start, model load,
process-group set-up, extraction, barriers) and the extraction time the command reports.

The entries of the two are compared too. With the same threads per process they are byte for
byte equal (tests/test_distributed.py); here the thread counts differ (cores vs cores / N), and
torch's CPU convolutions may round a batch differently with another thread count, so the bench
reports how many rows differ and by how much; more than ``MAX_DIFF`` is a correctness failure:
the script then exits with status 1 before printing any ratio.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MAX_DIFF = 1e-2  # float16 features of one model: thread-count rounding stays far below this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, threads: int, cache: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    res = subprocess.run(cmd + ["--cache-dir", cache, "--json"], capture_output=True, text=True,
                         env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    out = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][0])
    feats = np.fromfile(os.path.join(out["path"], "features.bin"), np.float16)
    return {"wall": wall, "extract": out["seconds"], "features": feats.reshape(out["shape"]),
            "shape": out["shape"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", default="mnist-5k", help="a bundled set or a folder")
    args = ap.parse_args()
    if args.cores % args.ranks:
        raise SystemExit(f"--cores ({args.cores}) must be a multiple of --ranks ({args.ranks})")
    base = ["-m", "pyft", "extract", args.data, "--image-size", str(args.image_size)]
    one_cmd = [sys.executable] + base
    tmp = tempfile.mkdtemp(prefix="pyft-bench-dist-")
    rows = {"one": [], "torchrun": []}
    try:
        for i in range(args.runs):
            for name in ("one", "torchrun"):
                cache = os.path.join(tmp, f"{name}{i}")
                if name == "one":
                    r = _run(one_cmd, args.cores, cache)
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(args.ranks), "--master-port", str(_free_port())] + base[1:]
                    r = _run(cmd, args.cores // args.ranks, cache)
                rows[name].append(r)
                print(f"run {i} {name:>8}: wall {r['wall']:6.1f} s, extraction "
                      f"{r['extract']:6.1f} s", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
                if i:
                    r.pop("features")  # keep run 0's entries for the comparison
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = rows["one"][0]["features"]
    kept = [r for v in rows.values() for r in v if "features" in r]
    if any(r["features"].shape != ref.shape for r in kept):
        raise SystemExit("CORRECTNESS FAILED: the entries have different shapes "
                         f"({[r['shape'] for r in kept]}); no ratio reported")
    diff_rows = max(int((r["features"] != ref).any(1).sum()) for r in kept)
    max_diff = max(float(np.abs(r["features"].astype(np.float32) - ref.astype(np.float32)).max())
                   for r in kept)
    if max_diff > MAX_DIFF:  # checked before any ratio is printed
        print(f"entries: {diff_rows} of {ref.shape[0]} rows differ, max |diff| {max_diff:.2g}")
        raise SystemExit(f"CORRECTNESS FAILED: the entries differ by {max_diff:.2g}, more than "
                         f"thread-count rounding ({MAX_DIFF}); no ratio reported")
    med = {name: {k: statistics.median(r[k] for r in v) for k in ("wall", "extract")}
           for name, v in rows.items()}
    n = rows["one"][0]["shape"][0]
    ratio_wall = med["one"]["wall"] / med["torchrun"]["wall"]
    ratio_extract = med["one"]["extract"] / med["torchrun"]["extract"]
    print(f"\n{n} images, {args.image_size} px, EfficientNet-Lite0 -> {rows['one'][0]['shape']}; "
          f"{args.cores} cores; medians of {args.runs} runs")
    print(f"one process, {args.cores} threads:     wall {med['one']['wall']:.1f} s, extraction "
          f"{med['one']['extract']:.1f} s ({n / med['one']['extract']:.0f} images/s)")
    print(f"torchrun, {args.ranks} x {args.cores // args.ranks} threads:     wall "
          f"{med['torchrun']['wall']:.1f} s, extraction {med['torchrun']['extract']:.1f} s "
          f"({n / med['torchrun']['extract']:.0f} images/s)")
    print(f"ratio one / torchrun: wall {ratio_wall:.2f}x, extraction {ratio_extract:.2f}x")
    print(f"entries: {diff_rows} of {n} rows differ, max |diff| {max_diff:.2g} (fp16)")
    print(json.dumps({"bench": "distributed_extraction", "images": n,
                      "image_size": args.image_size, "cores": args.cores, "ranks": args.ranks,
                      "runs": args.runs, "median": med, "ratio_wall": ratio_wall,
                      "ratio_extract": ratio_extract, "rows_differing": diff_rows,
                      "max_abs_diff": max_diff,
                      "all_runs": {k: [{kk: r[kk] for kk in ("wall", "extract")} for r in v]
                                   for k, v in rows.items()},
                      "python": platform.python_version()}))


if __name__ == "__main__":
    main()
