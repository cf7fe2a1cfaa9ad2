"""The pyft command line: every subcommand, the demo (README's main job) and error exits."""

import json
import os

import numpy as np
import pytest
from pyft_tests_helpers import run_cli as run  # tests/conftest.py


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
    for sub in ("demo", "advise", "extract", "fit", "eval", "export", "predict", "info"):
        assert sub in out.stdout


@pytest.mark.parametrize("sub", ["demo", "advise", "extract", "fit", "eval", "export", "predict",
                                 "info"])
def test_help_of_each_subcommand(sub):
    out = run(sub, "--help")
    assert out.returncode == 0
    assert "--json" in out.stdout


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("data")
    d = load_digits()
    for i in range(90):
        c = root / "train" / f"digit{d.target[i] % 3}"
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(c / f"{i}.png")
    for i in range(90, 120):
        c = root / "test" / f"digit{d.target[i] % 3}"
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(c / f"{i}.png")
    return root


def test_extract_fit_eval_export_predict(image_folder, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    common = ["--image-size", "32"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    out = run("extract", str(image_folder / "train"), *common, *cache, "--json")
    assert out.returncode == 0, out.stderr
    ex = json.loads(out.stdout)
    assert ex["shape"] == [90, 1280] and not ex["reused"]
    out = run("extract", str(image_folder / "train"), *common, *cache, "--json")
    assert json.loads(out.stdout)["reused"]

    out = run("fit", str(image_folder / "train"), "--val", str(image_folder / "test"),
              "--strategy", "head_only", "--out", str(tmp_path / "run"), *common, *cache, "--json")
    assert out.returncode == 0, out.stderr
    fit = json.loads(out.stdout)
    assert fit["strategy"] == "head_only" and fit["val_accuracy"] > 0.5
    report = tmp_path / "run" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["strategy"] == "head_only"
    assert metrics["classes"] == ["digit0", "digit1", "digit2"]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()

    out = run("eval", str(tmp_path / "run" / "model"), str(image_folder / "test"), "--json")
    assert out.returncode == 0, out.stderr
    ev = json.loads(out.stdout)
    assert ev["n"] == 30 and abs(ev["accuracy"] - fit["val_accuracy"]) < 1e-9

    out = run("predict", str(tmp_path / "run" / "model"), str(image_folder / "test" / "digit0"),
              "--json")
    assert out.returncode == 0, out.stderr
    preds = json.loads(out.stdout)["predictions"]
    assert len(preds) == len(os.listdir(image_folder / "test" / "digit0"))
    assert all(p["label"] in ("digit0", "digit1", "digit2") for p in preds)

    onnx_path = tmp_path / "m.onnx"
    out = run("export", str(tmp_path / "run" / "model"), str(onnx_path), "--json")
    assert out.returncode == 0, out.stderr
    assert onnx_path.exists()
    out = run("predict", str(onnx_path), str(image_folder / "test" / "digit0"), "--json")
    assert out.returncode == 0, out.stderr
    onnx_preds = json.loads(out.stdout)["predictions"]
    assert [p["label"] for p in onnx_preds] == [p["label"] for p in preds]


def test_advise_on_a_folder(image_folder):
    pytest.importorskip("efficientnet_lite_pytorch")
    out = run("advise", str(image_folder / "train"), "--image-size", "32", "--no-trials",
              "--probe-samples", "60", "--json")
    assert out.returncode == 0, out.stderr
    adv = json.loads(out.stdout)
    assert adv["strategy"] in ("head_only", "freeze_first", "full") and adv["reason"]


def test_errors_exit_nonzero_with_a_message(tmp_path):
    out = run("fit", str(tmp_path / "missing"))
    assert out.returncode == 1 and "error" in out.stderr and "missing" in out.stderr
    out = run("eval", str(tmp_path), "digits")
    assert out.returncode == 1 and "not a saved FineTuner" in out.stderr
    out = run("demo", "--dataset", "imagenet")
    assert out.returncode == 2 and "invalid choice" in out.stderr


QUICK_DEMO = ["--subset", "300", "--image-size", "32", "--epochs", "2", "--advise-budget", "1",
              "--probe-samples", "100", "--naive-batches", "2"]


def _demo(tmp_path, *extra):
    pytest.importorskip("efficientnet_lite_pytorch")
    out = run("demo", "--json", "--cache-dir", str(tmp_path / "cache"), *QUICK_DEMO, *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_quick_freeze_first_runs_finetuner_on_the_cached_prefix(tmp_path):
    res = _demo(tmp_path, "--strategy", "freeze_first")
    assert res["n_train"] == 240 and res["n_test"] == 60
    assert res["strategy"]["followed"] == "freeze_first" and res["strategy"]["k"] >= 1
    assert res["strategy"]["advised"] in ("head_only", "freeze_first", "full")
    run_ = res["run"]
    assert run_["epochs_run"] >= 1
    assert set(run_["phases"]) == {"setup", "extract", "train", "evaluate"}
    # the prefix went into the cache: an entry cut after k blocks
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    cuts = {json.loads(m.read_text()).get("cut") for m in manifests}
    assert manifests and "head" not in cuts, cuts
    t = res["time"]
    assert t["naive_measured"]["batches_measured"] == 3  # 2 training batches + the 1 validation
    assert t["naive_measured"]["batches_per_epoch"] == 5  # 216 training rows (4) + 24 validation
    assert t["epochs_counted"] == run_["epochs_run"]
    assert t["naive_seconds"] == pytest.approx(t["naive_epoch_seconds"] * run_["epochs_run"])
    assert t["pyft_seconds"] == pytest.approx(sum(run_["phases"].values()))
    assert 0.0 <= res["test_accuracy"] <= 1.0
    assert res["onnx"]["agreement"] > 0.95


def test_demo_quick_head_only_keeps_the_cross_validated_grid(tmp_path):
    res = _demo(tmp_path, "--strategy", "head_only", "--no-export")
    assert res["strategy"]["followed"] == "head_only" and res["strategy"]["k"] is None
    assert res["run"]["grid"]["folds"] == 5 and res["run"]["grid"]["points"] >= 8
    assert res["time"]["epochs_counted"] == 2 * res["run"]["heads_trained"]
    assert "onnx" not in res


def test_demo_rejects_a_bad_subset():
    out = run("demo", "--subset", "10")
    assert out.returncode == 1 and "--subset" in out.stderr


@pytest.mark.slow
def test_demo_json(tmp_path):
    """The README's main job: follows the advice and reaches the issue's accuracy."""
    out = run("demo", "--json", "--cache-dir", str(tmp_path / "cache"), timeout=900)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dataset"] == "mnist-5k" and res["n_train"] == 4000 and res["n_test"] == 1000
    assert res["strategy"]["followed"] == res["advice"]["strategy"]
    assert res["test_accuracy"] >= 0.96
    assert res["onnx"]["agreement"] > 0.99
    if res["strategy"]["followed"] != "full":
        assert res["time"]["naive_seconds"] > res["time"]["pyft_seconds"]


def test_fashion_mnist_from_debian():
    from pyft import datasets

    if not os.path.exists(datasets.FASHION_MNIST_DIR):
        with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
            datasets.load_fashion_mnist()
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    X, y = datasets.load_fashion_mnist("test")
    assert X.shape == (10000, 28, 28) and X.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="split"):
        datasets.load_fashion_mnist("val")
