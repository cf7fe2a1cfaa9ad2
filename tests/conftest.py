"""What the test modules share: the plain references, the fake DLPack producer and the
subprocess runners.

pytest imports the tests with ``--import-mode=importlib`` (they must exercise the installed pyft,
not the source tree), so a test module cannot ``import reference`` by name. pytest imports this
conftest before any test module of the folder; it loads each helper module once and registers it
under a name no installed package uses:

    import pyft_tests_reference as ref       # tests/reference.py: plain NumPy / PyTorch references
    import pyft_tests_fake_dlpack as fake    # tests/fake_dlpack.py: a CUDA-looking DLPack producer
    from pyft_tests_helpers import run_cli, run_python   # the runners below
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from types import ModuleType

HERE = pathlib.Path(__file__).resolve().parent


def load_test_module(name: str) -> ModuleType:
    """``tests/<name>.py`` as the module ``pyft_tests_<name>``, loaded once per session."""
    key = f"pyft_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def run_python(code: str, *, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter (what an import or a crash does to a process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_cli(*args: str, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """``python -m pyft *args`` as a user runs it (Python's own warnings silenced)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "pyft", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


load_test_module("reference")
load_test_module("fake_dlpack")
sys.modules.setdefault("pyft_tests_helpers", sys.modules[__name__])
