"""CI check of a PYFT_ENABLE_CUDA=ON build on a machine without a GPU.

Usage: python .ci/cuda_build_check.py BUILD_DIR/_core....so

Loads the freshly built extension by path (the CI environment's own pyft is the editable CPU
build, which an import by name would find first) and checks what holds without a GPU: the
module imports without a driver, says which ops have CUDA kernels, still computes on host
arrays, and refuses CUDA-resident inputs with a RuntimeError that says no device is present.
The kernels themselves run in `pytest -m cuda` on a GPU machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_core(path: str):
    import scipy_openblas32 as sob

    # What pyft/_blas.py does before importing pyft._core.
    ctypes.CDLL(os.path.join(sob.get_lib_dir(), sob.get_library(fullname=True)),
                mode=ctypes.RTLD_GLOBAL)
    loader = importlib.machinery.ExtensionFileLoader("_core", path)
    spec = importlib.util.spec_from_loader("_core", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def expect_runtime_error(fn, needle: str) -> None:
    try:
        fn()
    except RuntimeError as exc:
        if needle not in str(exc):
            raise SystemExit(f"FAIL: RuntimeError without {needle!r}: {exc}") from None
        print(f"  ok: RuntimeError: {str(exc)[:110]}...")
        return
    raise SystemExit(f"FAIL: no RuntimeError (expected one mentioning {needle!r})")


def main() -> int:
    core = load_core(sys.argv[1])
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_dlpack as fake

    v = core.cuda_version()
    kernels = core.cuda_kernels()
    print(f"cuda_version={v} cuda_kernels={kernels} devices={core.cuda_device_count()}")
    if v < 11000:
        raise SystemExit(f"FAIL: a CUDA build must report its toolkit version; got {v}")
    if set(kernels) != {"gather_rows", "train_head", "train_heads"}:
        raise SystemExit(f"FAIL: unexpected cuda_kernels() {kernels}")

    # Host arrays still take the CPU kernels in a CUDA build.
    src = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float16)
    idx = np.array([3, 49, 0, 3])
    if not np.array_equal(core.gather_rows(src, idx), src[idx].astype(np.float32)):
        raise SystemExit("FAIL: host gather_rows differs from NumPy")
    X = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    p = np.zeros(2 * 6 + 2, np.float32)
    hist = core.train_head(p, X, y, num_classes=2, epochs=3, lr=0.1, optimizer="sgd")["history"]
    if not hist[-1]["train_loss"] < hist[0]["train_loss"] < np.log(2) + 1e-6:
        raise SystemExit(f"FAIL: host training did not learn: {hist}")

    if core.cuda_device_count() > 0:
        print("a CUDA device is present: the no-device checks do not apply (run "
              "bench/gpu_check.sh for the GPU tests)")
        return 0
    Xd = fake.FakeCudaTensor((200, 6))
    needle = "needs a CUDA device"
    expect_runtime_error(lambda: core.gather_rows(Xd, idx, fake.FakeCudaTensor((4, 6))), needle)
    expect_runtime_error(lambda: core.train_head(p.copy(), Xd, y, num_classes=2), needle)
    expect_runtime_error(
        lambda: core.train_heads(np.stack([p, p]), Xd, y, num_classes=2, lrs=[0.1, 0.2],
                                 weight_decays=[0.0, 0.0]), needle)
    print("CUDA build check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
