#!/usr/bin/env bash
# The GPU check of pyft's CUDA path, in one short run (under 8 minutes on an H200):
#   1. build pyft._core with PYFT_ENABLE_CUDA=ON (native code for this GPU) into build/gpu and
#      put it into pyft/ (the source tree, as /work/build_core.sh does for the CPU build);
#   2. run the CUDA tests: pytest -m cuda on tests/test_cuda.py and tests/test_package.py (every
#      CUDA kernel against the CPU kernel and a PyTorch CUDA loop; on a GPU they may not skip);
#   3. run bench/bench_cuda.py (head training at ImageNet scale against the PyTorch CUDA eager
#      loop and the bf16 GEMM limit, the gather, the 13-lr x 5-fold sweep, onnxruntime's CUDA EP
#      against PyTorch on EfficientNet-Lite0); its last line is a JSON summary.
# Any failure (build, a test, a benchmark's correctness check) stops the script with a non-zero
# status. Logs go to $OUT (the device tool's folder) when set, else to build/gpu/.
#
# Needs: nvcc, cmake, ninja, and a Python with torch (CUDA), numpy, scikit-learn, pybind11,
# pytest and scipy-openblas32. A machine without scipy-openblas32 can take it as a wheel in .whl/
# (git-ignored; fetch it beside the repo with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# and carry .whl): this script installs wheels from .whl into /tmp/pyft-site first.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
logs="${OUT:-build/gpu}"
mkdir -p "$logs" build/gpu
t0=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - t0)) s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/pyft-site .whl/*.whl
  export PYTHONPATH="/tmp/pyft-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# CMake finds nvcc on the PATH (or through CUDACXX); the toolkit's usual folder as a fallback.
if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" - <<'EOF'
import importlib.util, os, sys, sysconfig
missing = [m for m in ("torch", "numpy", "sklearn", "pybind11", "pytest", "scipy_openblas32")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {missing}")
# CMake's Development.Module needs the interpreter's headers: fail here, not after a minute.
inc = sysconfig.get_paths()["include"]
if not os.path.isfile(os.path.join(inc, "Python.h")):
    sys.exit(f"gpu_check: no Python.h in {inc} (the Python development headers are missing)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print("gpu_check: torch", torch.__version__, "on", torch.cuda.get_device_name())
EOF

stamp "building with PYFT_ENABLE_CUDA=ON"
version="$("$py" -c 'import re;print(re.search(r"^version = \"(.+)\"", open("pyproject.toml").read(), re.M).group(1))')"
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKBUILD_PROJECT_VERSION="$version" \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DPYFT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native >"$logs/cmake.log" 2>&1 \
  || { tail -30 "$logs/cmake.log"; exit 1; }
cmake --build build/gpu -j "$(nproc)" >"$logs/build.log" 2>&1 || { tail -40 "$logs/build.log"; exit 1; }
rm -f pyft/_core*.so
cp build/gpu/_core*.so pyft/
# PYFT_ENABLE_CUDA=ON tells tests/test_package.py which build to expect.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYFT_ENABLE_CUDA=ON
"$py" -c 'from pyft import _core; print("pyft CUDA", _core.cuda_version(), _core.cuda_kernels(), "devices", _core.cuda_device_count())'

stamp "pytest -m cuda"
# -m cuda selects the GPU tests; on this machine a skip would hide a broken path, so any skip of
# them fails the check too (-rs lists the reasons).
set +e
"$py" -m pytest -m cuda -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_package.py \
  2>&1 | tee "$logs/pytest.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { echo "gpu_check: CUDA tests failed"; exit 1; }
if grep -q "^SKIPPED" "$logs/pytest.log"; then
  echo "gpu_check: CUDA tests skipped on a GPU machine"; exit 1
fi

stamp "bench/bench_cuda.py"
set +e
"$py" bench/bench_cuda.py "$@" 2>&1 | tee "$logs/bench_cuda.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || { echo "gpu_check: benchmark failed"; exit 1; }
stamp "done"
