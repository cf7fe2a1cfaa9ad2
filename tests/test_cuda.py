"""The CUDA path: kernels against the CPU kernels and a PyTorch CUDA loop, and its bad inputs.

Tests marked ``cuda`` need a CUDA build (``PYFT_ENABLE_CUDA=ON``) and a GPU; they skip, with the
reason, only when the build is CPU-only or torch sees no GPU. On a CUDA build with a GPU every
failure (a kernel error, a RuntimeError from the provider) fails the test.

The unmarked tests run everywhere, without a GPU: a DLPack object that claims to live on a CUDA
device (tests/fake_dlpack.py) must reach the core's device dispatch and fail there with the
RuntimeError that names the missing piece (CPU build: rebuild with CUDA; CUDA build: no device).
"""

from __future__ import annotations

import numpy as np
import pyft_tests_fake_dlpack as fake  # registered by tests/conftest.py
import pyft_tests_reference as ref  # registered by tests/conftest.py
import pytest

import pyft
from pyft import _core

torch = pytest.importorskip("torch")



CUDA_BUILD = _core.cuda_version() >= 0
HAS_GPU = torch.cuda.is_available()


def _need_gpu():
    if not CUDA_BUILD:
        pytest.skip("pyft was built without CUDA (PYFT_ENABLE_CUDA=OFF)")
    if not HAS_GPU:
        pytest.skip("torch sees no CUDA device")


def _stream():
    return torch.cuda.current_stream().cuda_stream


# ------------------------------------------------------------------------------------------
# Build facts that hold with or without a GPU


def test_cuda_build_reports_itself_honestly():
    if CUDA_BUILD:
        assert _core.cuda_version() >= 11000
        assert set(_core.cuda_kernels()) == {"gather_rows", "train_head", "train_heads"}
    else:
        assert _core.cuda_version() == -1
        assert _core.cuda_kernels() == []
        assert _core.cuda_device_count() == 0
    assert isinstance(_core.cuda_device_count(), int) and _core.cuda_device_count() >= 0


def _no_device_message():
    if not CUDA_BUILD:
        return "pyft was built without CUDA; rebuild with PYFT_ENABLE_CUDA=ON"
    return "needs a CUDA device"


@pytest.fixture
def no_device():
    if _core.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: the fake tensor's pointer must not reach it")


def test_gather_of_a_device_tensor_without_cuda_raises(no_device):
    src = fake.FakeCudaTensor((10, 4))
    out = fake.FakeCudaTensor((3, 4))
    with pytest.raises(RuntimeError, match=_no_device_message()):
        _core.gather_rows(src, np.array([0, 1, 2]), out)
    with pytest.raises(RuntimeError, match=_no_device_message()):  # device-resident indices
        _core.gather_rows(src, fake.FakeCudaTensor((3,), code=fake.KDL_INT, bits=64), out)


def test_training_on_a_device_tensor_without_cuda_raises(no_device):
    X = fake.FakeCudaTensor((20, 5))
    y = np.arange(20) % 3
    p = pyft.init_head_params("linear", 5, 3, seed=0)
    with pytest.raises(RuntimeError, match=_no_device_message()):
        _core.train_head(p, X, y, num_classes=3, epochs=1)
    P = np.stack([p, p])
    with pytest.raises(RuntimeError, match=_no_device_message()):
        _core.train_heads(P, X, y, num_classes=3, lrs=[0.1, 0.2], weight_decays=[0, 0], epochs=1)


def test_device_tensors_are_validated_before_the_device_is_needed(no_device):
    # Argument errors are ValueErrors on every build, GPU or not.
    X = fake.FakeCudaTensor((20, 5))
    p = pyft.init_head_params("linear", 5, 3, seed=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got 7 at index 0"):
        _core.train_head(p, X, np.full(20, 7), num_classes=3, epochs=1)
    with pytest.raises(ValueError, match="labels must have one entry per feature row"):
        _core.train_head(p, X, np.zeros(19, np.int64), num_classes=3, epochs=1)
    with pytest.raises(ValueError, match="features must be float32, float16, bfloat16"):
        _core.train_head(p, fake.FakeCudaTensor((20, 5), code=fake.KDL_INT, bits=32),
                         np.zeros(20, np.int64), num_classes=3, epochs=1)
    with pytest.raises(ValueError, match="out is required when src is a CUDA tensor"):
        _core.gather_rows(X, np.array([0]))


def test_host_src_with_device_out_is_refused(no_device):
    with pytest.raises(ValueError, match="src is in host memory but indices or out are on a CUDA"):
        _core.gather_rows(np.zeros((4, 3), np.float32), np.array([0]),
                          fake.FakeCudaTensor((1, 3)))


# ------------------------------------------------------------------------------------------
# Gather on the GPU


GATHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_same_bits(got, want):
    """Bit-for-bit equal, except that a NaN only has to stay a NaN (its payload may change)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


def _cpu_gather(src_cpu, idx):
    if src_cpu.dtype == torch.bfloat16:
        return _core.gather_rows(src_cpu.view(torch.int16).numpy(), idx, bfloat16=True)
    return _core.gather_rows(src_cpu.numpy(), idx)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GATHER_DTYPES)
@pytest.mark.parametrize("D", [1, 7, 8, 64, 2048])
@pytest.mark.parametrize("device_indices", [False, True])
def test_gather_matches_cpu_bit_for_bit(dtype, D, device_indices):
    _need_gpu()
    g = torch.Generator().manual_seed(D)
    src_cpu = (torch.randn(300, D, generator=g) * 100).to(dtype)
    idx = torch.randint(0, 300, (517,), generator=g).numpy()  # repeats, any order
    src = src_cpu.cuda()
    out = torch.full((len(idx), D), float("nan"), device="cuda")
    indices = torch.from_numpy(idx).cuda() if device_indices else idx
    got = _core.gather_rows(src, indices, out, stream=_stream())
    assert got is out
    torch.cuda.synchronize()
    assert_same_bits(out.cpu().numpy(), _cpu_gather(src_cpu, idx))


@pytest.mark.cuda
def test_gather_all_float16_patterns_and_strided_rows():
    _need_gpu()
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).reshape(256, 256)
    src = bits.view(torch.float16).cuda()
    idx = np.arange(256)[::-1].copy()
    out = torch.empty(256, 256, device="cuda")
    _core.gather_rows(src, idx, out, stream=_stream())
    assert_same_bits(out.cpu().numpy(), _core.gather_rows(bits.view(torch.float16).numpy(), idx))
    # Rows of a wider tensor: row stride larger than the row (not 16-byte aligned either).
    wide = torch.randn(50, 37, device="cuda").to(torch.bfloat16)
    part = wide[:, 3:30]
    out2 = torch.empty(5, 27, device="cuda")
    _core.gather_rows(part, np.array([4, 0, 49, 4, 7]), out2, stream=_stream())
    torch.testing.assert_close(out2, part[[4, 0, 49, 4, 7]].float(), rtol=0, atol=0)


@pytest.mark.cuda
def test_gather_3d_rows_and_empty_indices():
    _need_gpu()
    src = torch.randn(10, 3, 4, device="cuda")
    out = torch.empty(2, 3, 4, device="cuda")
    _core.gather_rows(src, np.array([9, 1]), out, stream=_stream())
    torch.testing.assert_close(out, src[[9, 1]], rtol=0, atol=0)
    empty = torch.empty(0, 3, 4, device="cuda")
    _core.gather_rows(src, np.zeros(0, np.int64), empty, stream=_stream())


@pytest.mark.cuda
@pytest.mark.parametrize("device_indices", [False, True])
def test_gather_bad_index_leaves_out_untouched(device_indices):
    _need_gpu()
    src = torch.randn(10, 4, device="cuda")
    out = torch.full((3, 4), 5.0, device="cuda")
    idx = np.array([1, 10, 2])
    indices = torch.from_numpy(idx).cuda() if device_indices else idx
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\) .*got 10 at position 1"):
        _core.gather_rows(src, indices, out, stream=_stream())
    torch.cuda.synchronize()
    assert bool((out == 5.0).all())


@pytest.mark.cuda
def test_gather_device_mixes_and_out_checks():
    _need_gpu()
    src = torch.randn(10, 4, device="cuda")
    with pytest.raises(ValueError, match="out is required"):
        _core.gather_rows(src, np.array([0]))
    with pytest.raises(ValueError, match="out must be in the same place as src"):
        _core.gather_rows(src, np.array([0]), np.empty((1, 4), np.float32))
    with pytest.raises(ValueError, match="out must be float32"):
        _core.gather_rows(src, np.array([0]), torch.empty(1, 4, device="cuda",
                                                          dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4\)"):
        _core.gather_rows(src, np.array([0, 1]), torch.empty(3, 4, device="cuda"))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        _core.gather_rows(src, np.array([0, 1]), torch.empty(4, 2, device="cuda").t())
    with pytest.raises(ValueError, match="indices on a CUDA device must be a 1-D int64"):
        _core.gather_rows(src, torch.zeros(1, dtype=torch.int32, device="cuda"),
                          torch.empty(1, 4, device="cuda"))
    with pytest.raises(ValueError, match="src is in host memory"):
        _core.gather_rows(src.cpu().numpy(), np.array([0]), torch.empty(1, 4, device="cuda"))
    with pytest.raises(ValueError, match="could not be exported through DLPack"):
        _core.gather_rows(src.requires_grad_(), np.array([0]), torch.empty(1, 4, device="cuda"))


# ------------------------------------------------------------------------------------------
# Head training on the GPU against the CPU trainer and a PyTorch CUDA loop


def _data(n, d, c, seed=0):
    X, y = ref.make_data(n, d, c, seed=seed)
    return X, y


def _train(p, X, y, **kw):
    """train_head on X (NumPy: the CPU kernel; a CUDA tensor: the CUDA kernel)."""
    q = p.copy()
    extra = {"stream": _stream()} if isinstance(X, torch.Tensor) else {}
    res = _core.train_head(q, X, y, **kw, **extra)
    return q, res


SETTINGS = [
    dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, dampening=0.1, schedule="step", gamma=0.5),
    dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="cosine", warmup_steps=5),
    dict(optimizer="sgd", lr=0.1, label_smoothing=0.1, drop_last=True),
    dict(optimizer="adamw", lr=1e-3, class_weights="random", shuffle=False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("C", [3, 40])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("graphs", [True, False])
def test_train_head_matches_cpu_float32(C, setting, graphs):
    _need_gpu()
    kw = dict(SETTINGS[setting])
    X, y = _data(700, 24, C, seed=setting)
    if kw.get("class_weights") == "random":
        kw["class_weights"] = np.random.default_rng(0).uniform(0.5, 2.0, C).astype(np.float32)
    kw.update(num_classes=C, epochs=3, batch_size=64, seed=11)
    p = pyft.init_head_params("linear", 24, C, seed=1)
    cpu, rc = _train(p, X, y, **kw)
    gpu, rg = _train(p, torch.from_numpy(X).cuda(), y, cuda_graphs=graphs, **kw)
    assert rg["kernel"] == "cuda" and rg["epochs_run"] == 3 and rg["steps"] == rc["steps"]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
    for a, b in zip(rg["history"], rc["history"]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=3 / 700)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_train_head_matches_cpu_other_dtypes(dtype):
    _need_gpu()
    X, y = _data(600, 32, 10, seed=3)
    Xt = torch.from_numpy(X).to(dtype)
    kw = dict(num_classes=10, epochs=3, batch_size=50, optimizer="sgd", lr=0.05, momentum=0.9,
              seed=5)
    p = pyft.init_head_params("linear", 32, 10, seed=2)
    if dtype == torch.bfloat16:
        cpu, rc = _train(p, Xt.view(torch.int16).numpy(), y, bfloat16=True, **kw)
    else:
        cpu, rc = _train(p, Xt.numpy(), y, **kw)
    gpu, rg = _train(p, Xt.cuda(), y, **kw)
    # 16-bit features multiply against a 16-bit copy of the weights (and a 16-bit dL/dz) on the
    # GPU, in float32 on the CPU: the trajectories agree to 16-bit rounding, not to float32.
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float64 else dict(rtol=0.05, atol=0.02)
    np.testing.assert_allclose(gpu, cpu, **tol)
    assert rg["history"][-1]["train_loss"] == pytest.approx(rc["history"][-1]["train_loss"],
                                                            rel=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("C", [130, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_head_many_classes_and_unaligned_rows(C, dtype):
    # C >= 128 runs the softmax kernel with 4 (C < 512) or 8 warps per row, so its block
    # reductions go through shared memory (the tests above, C < 128, use one warp); label
    # smoothing with class weights takes every reduction. D = 30 gives rows of 120 or 60 bytes:
    # the element-wise gather instead of the 16-byte one.
    _need_gpu()
    X, y = _data(800, 30, C, seed=C)
    Xt = torch.from_numpy(X).to(dtype)
    cw = np.random.default_rng(1).uniform(0.5, 2.0, C).astype(np.float32)
    kw = dict(num_classes=C, epochs=3, batch_size=96, seed=4, optimizer="sgd", lr=0.3,
              momentum=0.9, weight_decay=0.01, label_smoothing=0.1, class_weights=cw)
    p = pyft.init_head_params("linear", 30, C, seed=5)
    if dtype == torch.bfloat16:
        Xh = Xt.view(torch.int16).numpy()
        cpu, rc = _train(p, Xh, y, val_features=Xh[:200], val_labels=y[:200], bfloat16=True, **kw)
        tol = dict(rtol=0.05, atol=0.02)
    else:
        cpu, rc = _train(p, X, y, val_features=X[:200], val_labels=y[:200], **kw)
        tol = dict(rtol=1e-3, atol=1e-4)
    Xg = Xt.cuda()
    gpu, rg = _train(p, Xg, y, val_features=Xg[:200], val_labels=y[:200], **kw)
    assert rg["kernel"] == "cuda"
    np.testing.assert_allclose(gpu, cpu, **tol)
    rel = 1e-3 if dtype == torch.float32 else 2e-2
    for a, b in zip(rg["history"], rc["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rel)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=rel)
    # the weights moved well beyond the tolerance: a kernel that skipped the update fails
    assert np.median(np.abs(cpu - p)) > 0.05


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_train_head_matches_pytorch_cuda_loop(optimizer):
    _need_gpu()
    X, y = _data(500, 20, 6, seed=4)
    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, weight_decay=1e-2,
              momentum=0.9 if optimizer == "sgd" else 0.0, schedule="cosine", warmup_steps=3,
              epochs=3, batch_size=32, seed=7, label_smoothing=0.05)
    p = pyft.init_head_params("linear", 20, 6, seed=3)
    gpu, rg = _train(p, torch.from_numpy(X).cuda(), y, num_classes=6, **kw)
    want, hist = ref.torch_train(p, X, y, permutation=_core.epoch_permutation, num_classes=6,
                                 device="cuda", **kw)
    np.testing.assert_allclose(gpu, want, rtol=1e-3, atol=1e-4)
    for a, b in zip(rg["history"], hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


@pytest.mark.cuda
def test_train_head_subset_validation_and_early_stopping():
    _need_gpu()
    X, y = _data(800, 16, 4, seed=6)
    rows = np.random.default_rng(0).permutation(800)
    tr, va = np.sort(rows[:600]), rows[600:]
    kw = dict(num_classes=4, epochs=8, batch_size=40, optimizer="adamw", lr=0.05, seed=2,
              train_rows=tr, patience=2)
    p = pyft.init_head_params("linear", 16, 4, seed=0)
    cpu, rc = _train(p, X, y, val_features=X[va], val_labels=y[va], **kw)
    Xg = torch.from_numpy(X).cuda()
    gpu, rg = _train(p, Xg, y, val_features=Xg[torch.from_numpy(va).cuda()],
                     val_labels=torch.from_numpy(y[va]).cuda(), **kw)
    assert rg["epochs_run"] == rc["epochs_run"] and rg["best_epoch"] == rc["best_epoch"]
    assert rg["stopped_early"] == rc["stopped_early"]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
    for a, b in zip(rg["history"], rc["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=2 / 200)


@pytest.mark.cuda
def test_train_head_callback_sees_each_epochs_weights_and_can_stop():
    _need_gpu()
    X, y = _data(300, 8, 3)
    p = pyft.init_head_params("linear", 8, 3, seed=0)
    seen = []
    q = p.copy()

    def cb(info):
        seen.append(q.copy())
        return info["epoch"] < 2

    res = _core.train_head(q, torch.from_numpy(X).cuda(), y, num_classes=3, epochs=10,
                           batch_size=32, callback=cb, stream=_stream())
    assert res["epochs_run"] == 3 and res["stopped_by_callback"]
    assert not np.array_equal(seen[0], p) and not np.array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[-1], q)


@pytest.mark.cuda
def test_train_head_bad_device_inputs():
    _need_gpu()
    X, y = _data(100, 8, 3)
    Xg = torch.from_numpy(X).cuda()
    p = pyft.init_head_params("linear", 8, 3, seed=0)
    with pytest.raises(ValueError, match="val_features must be in the same place|val_features "
                                         "must be on the device of features"):
        _core.train_head(p.copy(), Xg, y, num_classes=3, val_features=X[:10], val_labels=y[:10],
                         stream=_stream())
    with pytest.raises(ValueError, match="val_features are on cuda:0 but features are in host"):
        _core.train_head(p.copy(), X, y, num_classes=3, val_features=Xg[:10], val_labels=y[:10])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got 3 at index 5"):
        bad = y.copy()
        bad[5] = 3
        _core.train_head(p.copy(), Xg, torch.from_numpy(bad).cuda(), num_classes=3,
                         stream=_stream())
    with pytest.raises(ValueError, match="val_features must have the dtype of features"):
        _core.train_head(p.copy(), Xg, y, num_classes=3, val_features=Xg[:10].half(),
                         val_labels=y[:10], stream=_stream())
    with pytest.raises(ValueError, match="head='mlp' has no CUDA kernel"):
        q = pyft.init_head_params("mlp", 8, 3, hidden_size=4, seed=0)
        _core.train_head(q, Xg, y, head="mlp", hidden_size=4, num_classes=3, stream=_stream())
    with pytest.raises(ValueError, match="features on a CUDA device must have contiguous rows"):
        _core.train_head(p.copy(), torch.randn(8, 100, device="cuda").t(), y, num_classes=3,
                         stream=_stream())
    with pytest.raises(ValueError, match="features must be float32, float16, bfloat16"):
        _core.train_head(p.copy(), Xg.int(), y, num_classes=3, stream=_stream())
    Xn = Xg.clone()
    Xn[37, 5] = float("nan")
    with pytest.raises(ValueError, match="features must be finite; found NaN or infinity at row "
                                         "37, column 5"):
        _core.train_head(p.copy(), Xn, y, num_classes=3, stream=_stream())


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_train_heads_matches_cpu(graphs):
    _need_gpu()
    X, y = _data(900, 24, 7, seed=8)
    H = 5
    P = np.stack([pyft.init_head_params("linear", 24, 7, seed=h) for h in range(H)])
    lrs = np.array([0.01, 0.03, 0.1, 0.3, 0.05])
    wds = np.array([0.0, 1e-4, 1e-3, 0.0, 1e-2])
    rows = np.random.default_rng(1).permutation(900)
    kw = dict(num_classes=7, lrs=lrs, weight_decays=wds, optimizer="sgd", momentum=0.9,
              schedule="cosine", epochs=3, batch_size=64, seed=3, train_rows=rows[:700],
              val_rows=rows[700:])
    Pc = P.copy()
    rc = _core.train_heads(Pc, X, y, **kw)
    Pg = P.copy()
    rg = _core.train_heads(Pg, torch.from_numpy(X).cuda(), y, cuda_graphs=graphs,
                           stream=_stream(), **kw)
    np.testing.assert_allclose(Pg, Pc, rtol=1e-3, atol=1e-4)
    for a, b in zip(rg["history"], rc["history"]):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-3)
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-3)
        np.testing.assert_allclose(a["lr"], b["lr"], rtol=1e-12)


@pytest.mark.cuda
def test_train_heads_adamw_with_val_features_and_one_head_equals_train_head():
    _need_gpu()
    X, y = _data(500, 12, 5, seed=9)
    Xg = torch.from_numpy(X).cuda()
    P = np.stack([pyft.init_head_params("linear", 12, 5, seed=h) for h in range(3)])
    kw = dict(num_classes=5, lrs=[1e-3, 3e-3, 1e-2], weight_decays=[0.0, 0.01, 0.1],
              optimizer="adamw", epochs=2, batch_size=50, seed=1)
    Pc, Pg = P.copy(), P.copy()
    rc = _core.train_heads(Pc, X, y, val_features=X[:100], val_labels=y[:100], **kw)
    rg = _core.train_heads(Pg, Xg, y, val_features=Xg[:100], val_labels=y[:100],
                           stream=_stream(), **kw)
    np.testing.assert_allclose(Pg, Pc, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rg["history"][-1]["val_accuracy"],
                               rc["history"][-1]["val_accuracy"], atol=0.02)
    # head 1 of the grid follows train_head with that head's lr and weight decay
    q, _ = _train(P[1], Xg, y, num_classes=5, optimizer="adamw", lr=3e-3, weight_decay=0.01,
                  epochs=2, batch_size=50, seed=1)
    np.testing.assert_allclose(Pg[1], q, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_estimator_and_fit_grid_on_cuda_tensors():
    _need_gpu()
    X, y = _data(400, 10, 3, seed=2)
    Xg = torch.from_numpy(X).cuda()
    a = pyft.HeadClassifier(solver="sgd", epochs=3, random_state=0).fit(X, y)
    b = pyft.HeadClassifier(solver="sgd", epochs=3, random_state=0).fit(Xg, y)
    np.testing.assert_allclose(b.params_, a.params_, rtol=1e-3, atol=1e-4)
    c = pyft.HeadClassifier(solver="adamw", epochs=4, early_stopping=True, patience=1,
                            random_state=0)
    c.fit(Xg, y)  # the held-out rows are taken on the device
    with pytest.raises(ValueError, match="must be on the CPU for this operation"):
        b.predict(Xg)
    with pytest.raises(ValueError, match="solver='lbfgs' runs on the CPU"):
        pyft.HeadClassifier(solver="lbfgs").fit(Xg, y)
    ga = pyft.fit_grid(X, y, lrs=[0.01, 0.1], epochs=2, folds=2)
    gb = pyft.fit_grid(Xg, y, lrs=[0.01, 0.1], epochs=2, folds=2)
    np.testing.assert_allclose(gb.table_["val_loss"], ga.table_["val_loss"], rtol=1e-3)
    np.testing.assert_allclose(gb.params_, ga.params_, rtol=1e-3, atol=1e-4)
