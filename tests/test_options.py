"""The training bindings' keyword table (csrc/bindings/py_train.h) is the one source of truth for
the option list: _core.pyi and tests/reference.py must agree with it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pyft_tests_reference as ref  # registered by tests/conftest.py
import pytest

from pyft import _core

# The repository's stub: an editable install puts only the compiled module in site-packages.
STUB = Path(__file__).resolve().parents[1] / "pyft" / "_core.pyi"
# torch_train's own arguments, not train_head options.
REFERENCE_ONLY = {"permutation", "dtype", "device"}


def _stub_keywords(function: str):
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    out = []
    for arg, default in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
        out.append((arg.arg, default is None,
                    None if default is None else ast.literal_eval(default)))
    return out


@pytest.mark.parametrize("function", ["train_head", "train_heads"])
def test_stub_matches_native_table(function):
    assert _stub_keywords(function) == _core.train_head_options(function)


@pytest.mark.parametrize("function", ["train_head", "train_heads"])
def test_native_signature_matches_table(function):
    # pybind11 renders the signature from the same table; its keyword names come in that order.
    sig = getattr(_core, function).__doc__.split("\n", 1)[0]
    names = [part.split(":")[0].strip() for part in sig.split("*, ", 1)[1].split(", ")
             if ":" in part]
    assert names == [name for name, _, _ in _core.train_head_options(function)]


def test_reference_options_match_native_table():
    table = {name: (required, default) for name, required, default in _core.train_head_options()}
    params = inspect.signature(ref.torch_train).parameters
    for name, p in params.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or name in REFERENCE_ONLY:
            continue
        assert name in table, f"reference.torch_train takes {name!r}, which train_head does not"
        required, default = table[name]
        if required:
            assert p.default is inspect.Parameter.empty, name
        else:
            assert p.default == default, f"{name}: reference {p.default!r}, native {default!r}"


def test_options_unknown_function():
    with pytest.raises(ValueError, match="function must be 'train_head' or 'train_heads'"):
        _core.train_head_options("predict")
