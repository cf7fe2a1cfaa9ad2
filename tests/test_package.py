"""Packaging: one version everywhere, the build configuration, importability, the public API."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pyft_tests_helpers import run_python as _run  # tests/conftest.py

import pyft
from pyft import _core

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _pyproject_version() -> str:
    text = PYPROJECT.read_text(encoding="utf-8")
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.9/3.10
        try:
            import tomli as tomllib
        except ImportError:
            tomllib = None
    if tomllib is not None:
        return tomllib.loads(text)["project"]["version"]
    section = re.search(r"^\[project\]\s*$(.*?)(?=^\[)", text, re.M | re.S)
    assert section, "no [project] table in pyproject.toml"
    m = re.search(r'^version\s*=\s*["\']([^"\']+)["\']', section.group(1), re.M)
    assert m, "no static version in [project]"
    return m.group(1)


# ------------------------------------------------------------------------------------------
# version


@pytest.mark.skipif(not PYPROJECT.exists(), reason="not run from a source checkout")
def test_version_single_sourced():
    v = _pyproject_version()
    assert pyft.__version__ == v
    assert _core.__version__ == v
    assert importlib.metadata.version("pyft") == v


def test_version_is_pep440():
    # X.Y.Z with an optional pre/post/dev suffix
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", pyft.__version__)


def test_pyproject_version_is_static_and_not_duplicated():
    """The version lives in pyproject.toml only: CMake and the C++ code get it from the build."""
    if not PYPROJECT.exists():
        pytest.skip("not run from a source checkout")
    v = _pyproject_version()
    for path in [ROOT / "CMakeLists.txt", *sorted((ROOT / "csrc").rglob("*.[ch]pp")),
                 *sorted((ROOT / "csrc").rglob("*.h")), *sorted((ROOT / "pyft").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(rf"['\"]{re.escape(v)}['\"]", text), (
            f"{path.relative_to(ROOT)} hard-codes the version {v!r}"
        )


# ------------------------------------------------------------------------------------------
# build configuration


def _cuda_requested() -> bool:
    return os.environ.get("PYFT_ENABLE_CUDA", "OFF").upper() in ("ON", "1", "TRUE", "YES")


def test_cuda_version_default_build():
    v = _core.cuda_version()
    assert isinstance(v, int)
    if _cuda_requested():
        assert v >= 0
    else:
        assert v == -1, "the default build (PYFT_ENABLE_CUDA=OFF) is CPU-only"


@pytest.mark.cuda
def test_cuda_tensor():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X = torch.randn(32, 4, device="cuda")
    y = (torch.arange(32) % 2).numpy()
    clf = pyft.HeadClassifier(solver="sgd", random_state=0)
    if _core.cuda_version() < 0:
        # CPU build: a clear error, not a crash or a silent device copy
        with pytest.raises(RuntimeError, match="built without CUDA; rebuild with PYFT_ENABLE_CUDA"):
            clf.fit(X, y)
        return
    clf.fit(X, y)  # a CUDA build with a GPU must train on the device; any error fails the test
    on_cpu = pyft.HeadClassifier(solver="sgd", random_state=0).fit(X.cpu(), y)
    np.testing.assert_allclose(clf.params_, on_cpu.params_, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(clf.predict(X.cpu()), on_cpu.predict(X.cpu()))


def test_blas_config_mentions_openblas():
    cfg = _core.blas_config()
    assert isinstance(cfg, str)
    assert "openblas" in cfg.lower(), cfg


def test_threads():
    assert _core.num_threads() >= 1
    assert _core.num_threads(0) == _core.num_threads()
    assert isinstance(_core.has_openmp(), bool)
    if _core.has_openmp():
        assert _core.num_threads(3) == 3
    else:
        assert _core.num_threads(3) == 1


# ------------------------------------------------------------------------------------------
# importability


def test_import_in_subprocess(tmp_path):
    # from an unrelated directory, so the source tree is not what makes the import work
    proc = _run("import pyft; print(pyft.__version__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == pyft.__version__
    assert proc.stderr == ""


def test_import_does_not_load_torch(tmp_path):
    """torch is optional (test extra only); importing pyft must not import it."""
    proc = _run(
        "import sys, pyft; from pyft import HeadClassifier, _core; "
        "print('torch' in sys.modules)",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_import_with_warnings_as_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import pyft, pyft.heads, pyft._arrays"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_core_is_the_compiled_extension():
    import importlib.machinery

    assert _core.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert pyft._core is _core


# ------------------------------------------------------------------------------------------
# public API


def test_public_api_names_exist():
    assert "__version__" in pyft.__all__
    assert len(set(pyft.__all__)) == len(pyft.__all__)
    for name in pyft.__all__:
        assert hasattr(pyft, name), name
    ns: dict = {}
    exec("from pyft import *", ns)  # star import exports exactly __all__
    assert set(pyft.__all__) <= set(ns)


def test_public_api_objects():
    assert inspect.isclass(pyft.HeadClassifier)
    from sklearn.base import BaseEstimator, ClassifierMixin

    assert issubclass(pyft.HeadClassifier, BaseEstimator)
    assert issubclass(pyft.HeadClassifier, ClassifierMixin)
    p = pyft.init_head_params("linear", 4, 3, seed=0)
    assert p.dtype == np.float32 and p.shape == (pyft.head_param_count("linear", 4, 3),)
    q = pyft.init_head_params("mlp", 4, 3, hidden_size=5, seed=0)
    assert q.shape == (pyft.head_param_count("mlp", 4, 3, 5),) == (5 * 4 + 5 + 3 * 5 + 3,)
    np.testing.assert_array_equal(p, pyft.init_head_params("linear", 4, 3, seed=0))


NATIVE_FUNCTIONS = [
    "train_head", "train_heads", "train_head_lbfgs", "objective", "predict", "epoch_permutation",
    "lr_factor",
    "num_threads", "blas_config", "cuda_version", "cuda_kernels", "cuda_device_count",
    "gather_rows",
]


@pytest.mark.parametrize("name", NATIVE_FUNCTIONS)
def test_native_functions_exist(name):
    fn = getattr(_core, name)
    assert callable(fn)
    assert fn.__doc__


def test_type_stub_matches_module():
    stub = ROOT / "pyft" / "_core.pyi"
    if not stub.exists():
        pytest.skip("no type stub in this checkout")
    text = stub.read_text(encoding="utf-8")
    stub_names = set(re.findall(r"^def (\w+)\(", text, re.M))
    native_names = {n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))}
    assert stub_names == native_names


def test_console_script_entry_point():
    eps = importlib.metadata.entry_points()
    scripts = (
        eps.select(group="console_scripts") if hasattr(eps, "select")
        else eps.get("console_scripts", [])
    )
    ours = [ep for ep in scripts if ep.name == "pyft"]
    if not ours:
        pytest.skip("pyft declares no console script")
    main = ours[0].load()
    assert callable(main)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.splitlines()
                if line.strip().endswith("python -m pytest")
                and line.strip().startswith("pip install")]
    assert len(commands) == 1, commands
    assert commands[0] in ci.splitlines()
    # torch is pinned wherever it is installed (an unpinned torch may pull a multi-GB build)
    for line in readme.splitlines() + ci.splitlines():
        if line.strip().startswith("pip install") and "torch" in line:
            assert re.search(r'"torch==[0-9.]+"', line), line


def test_models_are_lazy_attributes():
    code = ("import sys, pyft; assert 'torch' not in sys.modules; "
            "pyft.load_model; assert 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pyft.nope  # noqa: B018


def test_no_python_function_over_100_lines():
    """The codebase stays enterable: a function that grows past 100 lines is split into steps
    (docstrings count; issue 14)."""
    import ast

    long = []
    for path in sorted((ROOT / "pyft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
