#!/usr/bin/env python
"""Benchmark onnxruntime (CPU) on pyft's exported graph against PyTorch eager on the same model.

Standalone script (no pytest). The model is the fine-tuned EfficientNet-Lite0 users get from
``pyft.load_model("efficientnet_lite0", 10)``, exported with ``pyft.export_onnx`` twice:

- a float32 graph taking normalised (n, 3, 224, 224) pixels, against ``net(x)`` under
  ``torch.inference_mode()``: batch-1 latency and batch-32 throughput;
- a graph with the preprocessing inside (uint8 (n, 224, 224, 3) RGB in), timed from uint8 images
  to labels against the PyTorch lines a user would write for the same thing (from_numpy, permute,
  scale, normalise, forward, argmax).

Inputs are the same real photos for both (scikit-image's coffee, chelsea and astronaut, cropped
at 32 deterministic places, through the model's evaluation transform). Correctness first: both
graphs against PyTorch on those inputs (largest logit difference <= 1e-4, top-1 agreement on
every input); if either fails the script times nothing and exits with status 1. Then each
measurement is warmed up and repeated, PyTorch and onnxruntime interleaved within each repeat so
that drift hits both alike; the numbers are medians. Both use the same number of threads
(``--threads``, default all cores). FLOP/s are counted with torch's FlopCounterMode and set
against the machine's float32 GEMM rate measured in the same run.

Targets: onnxruntime >= 1.2x PyTorch's throughput at batch 32, and no worse latency at batch 1.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

import pyft
from pyft.export import export_onnx
from pyft.inference import InferenceSession
from pyft.preprocessing import ImagePreprocessing

THROUGHPUT_TARGET = 1.2


def log(*a):
    print(*a, flush=True)


def photos_and_crops(n, seed=0):
    """The three scikit-image photos and ``n`` deterministic crops of them (varied sizes)."""
    from skimage import data

    photos = [data.coffee(), data.chelsea(), data.astronaut()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        p = photos[i % 3]
        h, w = p.shape[:2]
        s = int(min(h, w) * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crops.append(np.ascontiguousarray(p[top:top + s, left:left + s]))
    return photos, crops


def to_uint8_nhwc(images, pre):
    """The model's resize / centre crop without its normalisation, rounded to uint8 NHWC."""
    same = ImagePreprocessing(pre.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), pre.resize)
    x = (same(images) * 255).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def sgemm_gflops(threads, n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_image(net, x1):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(x1)
    return counter.get_total_flops()


def interleaved(fns, repeats, warmup):
    """Median seconds of each function, the functions alternating within every repeat."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both PyTorch and onnxruntime (default: all cores)")
    ap.add_argument("--batch", type=int, default=32, help="throughput batch size (default 32)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats at the large batch (default 7, --quick 3); batch 1 "
                         "gets 10x as many")
    ap.add_argument("--workdir", default=None, help="where to write the graphs (default: temp)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.batch < 1:
        ap.error("--threads and --batch must be >= 1")
    repeats = args.repeats or (3 if args.quick else 7)
    small_repeats = 10 * repeats
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = pyft.load_model("efficientnet_lite0", 10).eval()
    net, pre = model.net, model.preprocessing
    photos, crops = photos_and_crops(args.batch)
    xb = model.preprocess(crops)  # float32 (batch, 3, 224, 224)
    x1 = xb[:1].clone()
    u8b = to_uint8_nhwc(crops, pre)
    u81 = u8b[:1].copy()
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    log(f"bench_inference: efficientnet_lite0 (10 classes) at {pre.input_size[0]}px, "
        f"{args.threads} threads, torch {torch.__version__}, batch {args.batch}, "
        f"{repeats} repeats (batch 1: {small_repeats})")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        t = time.perf_counter()
        res = export_onnx(model, os.path.join(work, "lite0.onnx"), sample_inputs=photos)
        export_s = time.perf_counter() - t
        res_u8 = export_onnx(model, os.path.join(work, "lite0_uint8.onnx"),
                             sample_inputs=photos, preprocessing=True)
        log(f"  export: {res}")
        log(f"  export (uint8 in): {res_u8}")
        sess = InferenceSession(res.path, device="cpu", intra_op_num_threads=args.threads)
        sess_u8 = InferenceSession(res_u8.path, device="cpu", intra_op_num_threads=args.threads)

        # ---------------------------------------------------------------- correctness first
        with torch.inference_mode():
            ref = net(xb).numpy()
            ref_u8 = net((torch.from_numpy(u8b).permute(0, 3, 1, 2).float() / 255 - mean) / std)
        out = sess.run(xb.numpy())["logits"]
        out_u8 = sess_u8.run(u8b)["logits"]
        diff = float(np.abs(out - ref).max())
        diff_u8 = float(np.abs(out_u8 - ref_u8.numpy()).max())
        agree = int((out.argmax(1) == ref.argmax(1)).sum())
        agree_u8 = int((out_u8.argmax(1) == ref_u8.numpy().argmax(1)).sum())
        ok = diff <= 1e-4 and diff_u8 <= 1e-4 and agree == agree_u8 == args.batch
        log(f"  correctness: max |logit diff| {diff:.2e} (uint8 graph {diff_u8:.2e}), top-1 "
            f"{agree}/{args.batch} and {agree_u8}/{args.batch} -> {'ok' if ok else 'FAILED'}")
        if not ok:  # a faster wrong graph is no speed-up: report the check, time nothing
            log("  CORRECTNESS FAILED: onnxruntime does not reproduce PyTorch; no timing")
            print(json.dumps({"bench": "inference", "correct": False,
                              "max_abs_logit_diff": diff, "max_abs_logit_diff_uint8": diff_u8,
                              "top1_agree": agree, "top1_agree_uint8": agree_u8,
                              "batch": args.batch}))
            return 1

        # ---------------------------------------------------------------- timing
        xbn, x1n = xb.numpy(), x1.numpy()

        def torch_forward(x):
            with torch.inference_mode():
                return net(x)

        def torch_uint8_to_label(u8):
            with torch.inference_mode():
                x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std
                return [sess_u8.class_names[i] for i in net(x).argmax(1).tolist()]

        def ort_uint8_to_label(u8):
            idx = sess_u8.run(u8)["logits"].argmax(1)
            return [sess_u8.class_names[i] for i in idx.tolist()]

        lat = interleaved({"pytorch": lambda: torch_forward(x1),
                           "onnxruntime": lambda: sess.run(x1n)}, small_repeats, warmup=3)
        # Not the target's baseline, for context: PyTorch is faster on channels-last tensors.
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        xb_cl = xb.contiguous(memory_format=torch.channels_last)

        def torch_channels_last():
            with torch.inference_mode():
                return net_cl(xb_cl)

        thr = interleaved({"pytorch": lambda: torch_forward(xb),
                           "onnxruntime": lambda: sess.run(xbn),
                           "pytorch_channels_last": torch_channels_last}, repeats, warmup=1)
        lat_u8 = interleaved({"pytorch": lambda: torch_uint8_to_label(u81),
                              "onnxruntime": lambda: ort_uint8_to_label(u81)},
                             small_repeats, warmup=3)
        thr_u8 = interleaved({"pytorch": lambda: torch_uint8_to_label(u8b),
                              "onnxruntime": lambda: ort_uint8_to_label(u8b)},
                             repeats, warmup=1)

    flops = flops_per_image(net, x1)
    peak = sgemm_gflops(args.threads)
    b = args.batch
    img_s = {k: b / v for k, v in thr.items()}
    img_s_u8 = {k: b / v for k, v in thr_u8.items()}
    thr_ratio = img_s["onnxruntime"] / img_s["pytorch"]
    lat_ratio = lat["pytorch"] / lat["onnxruntime"]
    targets = {
        f"throughput_batch{b}_ratio_ge_{THROUGHPUT_TARGET}": thr_ratio >= THROUGHPUT_TARGET,
        "batch1_latency_no_worse": lat["onnxruntime"] <= lat["pytorch"],
    }
    rows = [
        ("batch 1 latency (ms)", lat["pytorch"] * 1e3, lat["onnxruntime"] * 1e3, lat_ratio),
        (f"batch {b} throughput (img/s)", img_s["pytorch"], img_s["onnxruntime"], thr_ratio),
        ("  vs channels-last PyTorch (img/s)", img_s["pytorch_channels_last"],
         img_s["onnxruntime"], img_s["onnxruntime"] / img_s["pytorch_channels_last"]),
        ("uint8 -> label, batch 1 (ms)", lat_u8["pytorch"] * 1e3, lat_u8["onnxruntime"] * 1e3,
         lat_u8["pytorch"] / lat_u8["onnxruntime"]),
        (f"uint8 -> label, batch {b} (img/s)", img_s_u8["pytorch"], img_s_u8["onnxruntime"],
         img_s_u8["onnxruntime"] / img_s_u8["pytorch"]),
    ]
    log(f"  {'':34s} {'pytorch':>10s} {'onnxruntime':>12s} {'speedup':>8s}")
    for name, a, c, r in rows:
        log(f"  {name:34s} {a:10.2f} {c:12.2f} {r:7.2f}x")
    gflops = {k: v * flops / 1e9 for k, v in img_s.items()}
    ratio_cl = img_s["onnxruntime"] / img_s["pytorch_channels_last"]
    log(f"  {flops / 1e9:.3f} GFLOP per image: {gflops['pytorch']:.1f} / "
        f"{gflops['onnxruntime']:.1f} GFLOP/s at batch {b}; float32 GEMM peak here "
        f"{peak:.1f} GFLOP/s")
    for k, v in targets.items():
        log(f"  target {k}: {'met' if v else 'NOT met'}")

    summary = {
        "bench": "inference",
        "model": "efficientnet_lite0",
        "num_classes": 10,
        "image_size": int(pre.input_size[0]),
        "threads": args.threads,
        "batch": b,
        "repeats": repeats,
        "batch1_repeats": small_repeats,
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "platform": platform.platform(),
        "provider": sess.provider,
        "exporter": res.exporter,
        "exporter_uint8": res_u8.exporter,
        "export_seconds": export_s,
        "export_verification": res.verification.as_dict(),
        "correct": ok,
        "max_abs_logit_diff": diff,
        "max_abs_logit_diff_uint8": diff_u8,
        "top1_agree": agree,
        "top1_agree_uint8": agree_u8,
        "batch1_latency_ms": {"pytorch": lat["pytorch"] * 1e3,
                              "onnxruntime": lat["onnxruntime"] * 1e3, "speedup": lat_ratio},
        f"batch{b}_throughput_img_per_s": dict(img_s, ratio=thr_ratio,
                                               ratio_vs_channels_last=ratio_cl),
        "uint8_to_label": {
            "batch1_ms": {"pytorch": lat_u8["pytorch"] * 1e3,
                          "onnxruntime": lat_u8["onnxruntime"] * 1e3,
                          "speedup": lat_u8["pytorch"] / lat_u8["onnxruntime"]},
            f"batch{b}_img_per_s": dict(img_s_u8,
                                        ratio=img_s_u8["onnxruntime"] / img_s_u8["pytorch"]),
        },
        "gflop_per_image": flops / 1e9,
        f"gflop_per_s_batch{b}": gflops,
        "sgemm_peak_gflop_per_s": peak,
        "targets": targets,
        "targets_met": all(targets.values()),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
