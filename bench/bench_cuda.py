#!/usr/bin/env python
"""Benchmark pyft's CUDA kernels on a GPU against what a PyTorch user would write, same run.

Standalone script (no pytest), run by bench/gpu_check.sh after the CUDA tests pass. Needs a
build with PYFT_ENABLE_CUDA=ON and a GPU; it exits non-zero when either is missing or when a
correctness check fails (then no speed-up is reported).

1. Correctness first: one linear head (2048 -> 1000, bf16 features, SGD momentum) trained by
   pyft's CUDA trainer and by the PyTorch CUDA eager loop below on the same batches
   (``_core.epoch_permutation``), 2 epochs on 32,768 rows: final weights and losses must agree.
2. Head training at ImageNet scale: 1,281,167 x 2048 bf16 features (5.2 GB, generated on the GPU,
   class-structured so the loss moves), 1000 classes, seconds per epoch (median over epochs 2..k;
   epoch 1 also captures the CUDA graph) against the PyTorch CUDA eager loop (bf16 autocast,
   fp32 master weights, fused SGD, batches by index), and against the bf16 GEMM limit: the
   epoch's 4*N*D*C GEMM flops at the bf16 rate measured here (8192^3 matmul).
3. The gather: ``gather_rows`` of 262,144 random rows (bf16 -> fp32) against
   ``torch.index_select(X, 0, idx).float()``; GB/s counting bytes read + written.
4. The linear-probe sweep: ``pyft.fit_grid`` with 13 learning rates x 5 folds (+ the refit) on
   the ImageNet-sized features, wall-clock seconds.
5. Inference: onnxruntime's CUDA execution provider on pyft's exported EfficientNet-Lite0
   against PyTorch CUDA eager on the same model (batch 64, 224 x 224); skipped, with the reason,
   when onnxruntime has no CUDA provider or the bundled weights are not installed.

The last line printed is one JSON object with every number.
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
import torch.nn.functional as F

import pyft
from pyft import _core

N_IMAGENET, D, C = 1_281_167, 2048, 1000


def log(*a):
    print(*a, flush=True)


def fail(msg: str) -> None:
    log(f"FAIL: {msg}")
    print(json.dumps({"ok": False, "error": msg}))
    sys.exit(1)


def cuda_time(fn, repeat: int = 3, warmup: int = 1):
    """Median seconds of fn() over `repeat` runs, each ended by a device synchronise."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_features(n: int, seed: int = 0, sep: float = 0.5):
    """(n, D) bf16 features near one of C class centres, labels int64: made on the GPU in chunks."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    centres = torch.randn(C, D, device="cuda", generator=g)
    y = torch.randint(0, C, (n,), device="cuda", generator=g)
    X = torch.empty(n, D, device="cuda", dtype=torch.bfloat16)
    for i in range(0, n, 65536):
        j = min(n, i + 65536)
        X[i:j] = (sep * centres[y[i:j]] + torch.randn(j - i, D, device="cuda", generator=g)).to(
            torch.bfloat16)
    return X, y


def bf16_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: torch.mm(a, b), repeat=10, warmup=3)
    return 2 * 8192**3 / t / 1e12


class TorchLoop:
    """The PyTorch CUDA eager loop a competent user writes for a linear probe on cached bf16
    features: fp32 master weights, bf16 autocast, fused SGD, one index_select per batch, the
    loss summed on the device (no per-step synchronisation)."""

    def __init__(self, params, X, y, lr, momentum, batch_size, seed):
        self.X, self.y, self.B, self.seed = X, y, batch_size, seed
        W = torch.from_numpy(params[: C * D].reshape(C, D).copy()).cuda()
        b = torch.from_numpy(params[C * D:].copy()).cuda()
        self.model = torch.nn.Linear(D, C).cuda()
        with torch.no_grad():
            self.model.weight.copy_(W)
            self.model.bias.copy_(b)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, fused=True)

    def epoch(self, epoch: int, order=None) -> float:
        n = self.X.shape[0]
        if order is None:
            order = _core.epoch_permutation(n, self.seed, epoch)
        perm = torch.from_numpy(order).cuda()
        total = torch.zeros((), device="cuda")
        for s in range(0, n, self.B):
            idx = perm[s : s + self.B]
            xb, yb = self.X.index_select(0, idx), self.y.index_select(0, idx)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach() * len(idx)
        return float(total) / n

    def params(self) -> np.ndarray:
        return np.concatenate([self.model.weight.detach().cpu().numpy().ravel(),
                               self.model.bias.detach().cpu().numpy()])


def pyft_train(params, X, y_host, epochs, lr, momentum, batch_size, seed, graphs=True):
    p = params.copy()
    res = _core.train_head(p, X, y_host, num_classes=C, optimizer="sgd", lr=lr, momentum=momentum,
                           epochs=epochs, batch_size=batch_size, seed=seed, cuda_graphs=graphs,
                           stream=torch.cuda.current_stream().cuda_stream)
    return p, res


def check_correctness(args) -> dict:
    X, y = make_features(32768, seed=1)
    y_host = y.cpu().numpy()
    p0 = pyft.init_head_params("linear", D, C, seed=0)
    lr, mom, B = 0.05, 0.9, 256
    got, res = pyft_train(p0, X, y_host, 2, lr, mom, B, seed=3)
    loop = TorchLoop(p0, X, y, lr, mom, B, seed=3)
    losses = [loop.epoch(e) for e in range(2)]
    want = loop.params()
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    pyft_losses = [h["train_loss"] for h in res["history"]]
    log(f"correctness: max |pyft - torch| = {err:.3g} (weights up to {scale:.3g}); "
        f"losses pyft {pyft_losses} torch {losses}")
    # Both multiply bf16 inputs with fp32 accumulation; torch keeps dL/dz in bf16 too (autocast),
    # so two epochs agree to a few bf16 ulps of the weights.
    if not err <= 0.02 * max(1.0, scale):
        fail(f"pyft's CUDA trainer differs from the PyTorch loop: max abs diff {err:.3g}")
    for a, b in zip(pyft_losses, losses):
        if abs(a - b) > 0.01 * abs(b) + 1e-3:
            fail(f"epoch losses differ: pyft {pyft_losses} vs torch {losses}")
    if not pyft_losses[-1] < pyft_losses[0]:
        fail(f"pyft did not learn: losses {pyft_losses}")
    return {"max_abs_diff": err, "pyft_losses": pyft_losses, "torch_losses": losses}


def bench_head(args, X, y, peak) -> dict:
    y_host = y.cpu().numpy()
    p0 = pyft.init_head_params("linear", D, C, seed=0)
    out = {}
    flops = 4.0 * X.shape[0] * D * C  # forward and weight-gradient GEMMs per epoch
    limit_s = flops / (peak * 1e12)
    for B in args.batch_sizes:
        lr = 0.1 * B / 256
        _, res = pyft_train(p0, X, y_host, args.epochs, lr, 0.9, B, seed=0)
        secs = [h["seconds"] for h in res["history"]]
        pyft_s = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
        loop = TorchLoop(p0, X, y, lr, 0.9, B, seed=0)
        loop.epoch(0)  # warm-up (cuBLAS heuristics, allocator)
        torch_times = []
        for e in range(1, 1 + args.torch_epochs):
            order = _core.epoch_permutation(X.shape[0], 0, e)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loop.epoch(e, order)
            torch.cuda.synchronize()
            torch_times.append(time.perf_counter() - t0)
        torch_s = statistics.median(torch_times)
        row = {"batch_size": B, "pyft_s": pyft_s, "pyft_first_epoch_s": secs[0],
               "torch_eager_s": torch_s, "speedup": torch_s / pyft_s,
               "gemm_limit_s": limit_s, "pyft_over_limit": pyft_s / limit_s,
               "pyft_final_loss": res["history"][-1]["train_loss"]}
        log(f"head epoch B={B}: pyft {pyft_s:.3f} s (first {secs[0]:.3f} s), torch eager "
            f"{torch_s:.3f} s -> {row['speedup']:.2f}x; bf16 GEMM limit {limit_s * 1e3:.1f} ms "
            f"-> pyft at {row['pyft_over_limit']:.2f}x the limit")
        out[f"B{B}"] = row
    return out


def bench_gather(args, X) -> dict:
    n = 262_144
    idx = torch.randint(0, X.shape[0], (n,), device="cuda")
    out = torch.empty(n, D, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _core.gather_rows(X, idx, out, stream=stream)
    want = torch.index_select(X, 0, idx).float()
    if not torch.equal(out, want):
        fail("gather_rows differs from torch.index_select(...).float()")
    t_pyft = cuda_time(lambda: _core.gather_rows(X, idx, out, stream=stream), repeat=5)
    t_torch = cuda_time(lambda: torch.index_select(X, 0, idx).float(), repeat=5)
    moved = n * D * (2 + 4)  # bf16 read, fp32 written
    row = {"rows": n, "pyft_GBps": moved / t_pyft / 1e9, "torch_GBps": moved / t_torch / 1e9,
           "speedup": t_torch / t_pyft}
    log(f"gather {n} rows bf16->fp32: pyft {row['pyft_GBps']:.0f} GB/s, torch index_select+float "
        f"{row['torch_GBps']:.0f} GB/s -> {row['speedup']:.2f}x")
    return row


def bench_sweep(args, X, y) -> dict:
    lrs = np.logspace(-3, 0, 13)
    t0 = time.perf_counter()
    res = pyft.fit_grid(X, y.cpu().numpy(), lrs=lrs, folds=5, epochs=args.sweep_epochs,
                        batch_size=args.sweep_batch)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    best = float(res.best_lr_)
    log(f"sweep 13 lrs x 5 folds (+ refit), {args.sweep_epochs} epochs, batch {args.sweep_batch}: "
        f"{secs:.1f} s (best lr {best:.3g}, mean val acc "
        f"{float(np.max(res.table_['val_accuracy_mean'])):.3f})")
    return {"seconds": secs, "epochs": args.sweep_epochs, "batch_size": args.sweep_batch,
            "best_lr": best}


def bench_inference(args) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"skipped": f"onnxruntime not installed ({exc})"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"}
    try:
        model = pyft.load_model("efficientnet_lite0", 10).eval()
    except Exception as exc:  # the bundled weights are an optional install on a bare machine
        return {"skipped": f"EfficientNet-Lite0 unavailable: {exc}"}
    from pyft.export import export_onnx
    from pyft.inference import InferenceSession

    x = torch.randn(64, 3, 224, 224)
    with tempfile.TemporaryDirectory() as work:
        res = export_onnx(model, os.path.join(work, "lite0.onnx"), sample_inputs=x[:4])
        sess = InferenceSession(res.path, device="cuda")
        net = model.cuda()
        xc = x.cuda()
        with torch.inference_mode():
            want = net(xc).float().cpu().numpy()
        got = sess.run(xc)["logits"]
        err = float(np.max(np.abs(got - want)))
        if err > 1e-2 * max(1.0, float(np.max(np.abs(want)))):
            fail(f"onnxruntime CUDA logits differ from PyTorch: {err:.3g}")

        def torch_run():
            with torch.inference_mode():
                net(xc)

        t_torch = cuda_time(torch_run, repeat=10, warmup=3)
        t_ort = cuda_time(lambda: sess.run(xc), repeat=10, warmup=3)
    row = {"batch": 64, "torch_ms": t_torch * 1e3, "ort_cuda_ms": t_ort * 1e3,
           "speedup": t_torch / t_ort, "max_abs_logit_diff": err}
    log(f"EfficientNet-Lite0 batch 64: torch CUDA {row['torch_ms']:.2f} ms, onnxruntime CUDA EP "
        f"{row['ort_cuda_ms']:.2f} ms -> {row['speedup']:.2f}x")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=N_IMAGENET)
    ap.add_argument("--epochs", type=int, default=4, help="pyft epochs per batch size")
    ap.add_argument("--torch-epochs", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--sweep-epochs", type=int, default=10, help="fit_grid's default")
    ap.add_argument("--sweep-batch", type=int, default=256, help="fit_grid's default")
    ap.add_argument("--skip", nargs="*", default=[], choices=["head", "gather", "sweep", "onnx"])
    args = ap.parse_args(argv)
    if _core.cuda_version() < 0:
        fail("pyft was built without CUDA; build with PYFT_ENABLE_CUDA=ON (bench/gpu_check.sh)")
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"pyft CUDA {_core.cuda_version()}")
    out = {"ok": True, "device": torch.cuda.get_device_name(), "rows": args.rows}
    out["correctness"] = check_correctness(args)
    peak = bf16_peak_tflops()
    log(f"bf16 GEMM rate (8192^3): {peak:.0f} TFLOP/s")
    out["bf16_tflops"] = peak
    X, y = make_features(args.rows)
    if "head" not in args.skip:
        out["head"] = bench_head(args, X, y, peak)
    if "gather" not in args.skip:
        out["gather"] = bench_gather(args, X)
    if "sweep" not in args.skip:
        out["sweep"] = bench_sweep(args, X, y)
    del X, y
    torch.cuda.empty_cache()
    if "onnx" not in args.skip:
        out["onnx"] = bench_inference(args)
        if "skipped" in out["onnx"]:
            log(f"onnxruntime CUDA EP vs PyTorch: skipped ({out['onnx']['skipped']})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
