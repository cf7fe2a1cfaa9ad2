"""Sharded extraction over torch.distributed ranks (gloo, two processes on this machine)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

_WORKER = textwrap.dedent("""
    import datetime, json, os, sys, time
    import numpy as np
    import torch
    import torch.distributed as dist

    mode, root, marker, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank() if world > 1 else 0
    if mode == "synthetic":
        from pyft.cache import FeatureCache
        src = np.random.default_rng(0).standard_normal((1000, 13)).astype(np.float32)
        def compute(b, e):
            with open(marker, "a") as f:
                f.write(f"{rank} {b}\\n")
            time.sleep(delay)
            return src[b:e] * 3.0
        from pyft.distributed import Ranks
        e = FeatureCache(root, chunk_size=100).get_or_compute(
            {"t": 1}, 1000, compute, batch_size=50, labels=np.arange(1000) % 4, progress=False,
            ranks=Ranks(rank, world))
    else:
        import pyft
        from pyft.features import extract_features
        from sklearn.datasets import load_digits
        d = load_digits()
        imgs = (d.images[:300] * (255 / 16)).astype(np.uint8)
        model = pyft.load_model("efficientnet_lite0", 10, image_size=32)
        e = extract_features(model, imgs, d.target[:300], cache_dir=root, batch_size=25,
                             progress=False, cache=__import__("pyft.cache").cache.FeatureCache(
                                 root, chunk_size=50))
    print(json.dumps({"rank": rank, "key": e.key, "path": e.path}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script, world, *args):
    """``world`` processes of ``script`` joined by torchrun-style environment variables."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _launch(tmp_path, mode, root, marker, world, delay=0.0):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    return _start(script, world, mode, root, marker, delay)


def _wait(procs, timeout=300):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _bytes(path):
    with open(os.path.join(path, "features.bin"), "rb") as f:
        return f.read()


def test_sharded_extraction_equals_single_process(tmp_path):
    single = _wait(_launch(tmp_path, "synthetic", tmp_path / "one", tmp_path / "m1", 1))[0]
    outs = _wait(_launch(tmp_path, "synthetic", tmp_path / "two", tmp_path / "m2", 2))
    assert outs[0]["key"] == outs[1]["key"] == single["key"]
    assert _bytes(outs[0]["path"]) == _bytes(single["path"])
    with open(os.path.join(outs[0]["path"], "manifest.json")) as f:
        man = json.load(f)
    with open(os.path.join(single["path"], "manifest.json")) as f:
        assert man["chunk_crc32"] == json.load(f)["chunk_crc32"]
    # Disjoint, deterministic shards: chunk c (100 rows, 2 batches) belongs to rank c % 2.
    calls = [tuple(map(int, line.split())) for line in (tmp_path / "m2").read_text().splitlines()]
    assert len(calls) == 20
    assert all(rank == (start // 100) % 2 for rank, start in calls)
    assert not [f for f in os.listdir(outs[0]["path"]) if f.startswith("progress")]


def test_sharded_real_model_extraction_is_bit_identical(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    single = _wait(_launch(tmp_path, "model", tmp_path / "one", tmp_path / "m1", 1))[0]
    outs = _wait(_launch(tmp_path, "model", tmp_path / "two", tmp_path / "m2", 2))
    assert outs[0]["key"] == single["key"]
    assert _bytes(outs[0]["path"]) == _bytes(single["path"])


def _start_and_wait_for_rank1(tmp_path, root, marker):
    """A two-rank synthetic extraction, returned once rank 1 has computed 3 batches."""
    procs = _launch(tmp_path, "synthetic", root, marker, 2, delay=0.05)
    deadline = time.time() + 120
    while time.time() < deadline:
        if marker.exists() and sum(1 for line in marker.read_text().splitlines()
                                   if line.startswith("1 ")) >= 3:
            break
        time.sleep(0.02)
    return procs


def test_a_rank_killed_mid_extraction_then_rerun_completes(tmp_path):
    root, marker = tmp_path / "c", tmp_path / "calls"
    procs = _start_and_wait_for_rank1(tmp_path, root, marker)
    os.kill(procs[1].pid, signal.SIGKILL)  # rank 1 dies half way
    procs[0].communicate(timeout=120)  # rank 0 does not hang: gloo reports the lost peer
    assert procs[0].returncode != 0
    procs[1].communicate()
    entry_dir = next(p for p in root.iterdir() if p.is_dir())
    assert not (entry_dir / "manifest.json").exists()
    assert (entry_dir / "progress.rank1.json").exists()
    before = len(marker.read_text().splitlines())
    # Rerun with two ranks again: they reuse what both ranks finished.
    outs = _wait(_launch(tmp_path, "synthetic", root, marker, 2))
    rerun = len(marker.read_text().splitlines()) - before
    assert 0 < rerun < 20
    ref = _wait(_launch(tmp_path, "synthetic", tmp_path / "ref", tmp_path / "m3", 1))[0]
    assert outs[0]["path"] == outs[1]["path"]
    assert _bytes(outs[0]["path"]) == _bytes(ref["path"])
    assert not [f for f in os.listdir(outs[0]["path"]) if f.startswith("progress")]


def test_a_rank_killed_then_a_one_process_rerun_completes(tmp_path):
    root, marker = tmp_path / "c", tmp_path / "calls"
    procs = _start_and_wait_for_rank1(tmp_path, root, marker)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)  # the whole job dies (e.g. torchrun torn down)
        p.communicate()
    before = len(marker.read_text().splitlines())
    out = _wait(_launch(tmp_path, "synthetic", root, marker, 1))[0]
    assert 0 < len(marker.read_text().splitlines()) - before < 20
    ref = _wait(_launch(tmp_path, "synthetic", tmp_path / "ref", tmp_path / "m3", 1))[0]
    assert _bytes(out["path"]) == _bytes(ref["path"])


_GRID_WORKER = textwrap.dedent("""
    import datetime, json, os, sys
    import numpy as np
    import torch.distributed as dist
    from pyft.grid import fit_grid

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 32)).astype(np.float32)
    W = rng.standard_normal((32, 4))
    y = (X @ W + 0.5 * rng.standard_normal((3000, 4))).argmax(1)
    g = fit_grid(X, y, lrs=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], weight_decays=[0.0, 1e-3], folds=3,
                 epochs=3, batch_size=128, n_threads=1)
    print(json.dumps({"best": g.best_index_, "acc": g.table_["val_accuracy_mean"].tolist(),
                      "params": g.params_.tolist()}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
""")


def test_grid_split_over_ranks_selects_the_same_head(tmp_path):
    script = tmp_path / "grid.py"
    script.write_text(_GRID_WORKER)
    one = _wait(_start(script, 1))[0]
    two = _wait(_start(script, 2))
    for out in two:  # every rank ends with the whole table and the same refit head
        assert out["best"] == one["best"]
        np.testing.assert_allclose(out["acc"], one["acc"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out["params"], one["params"], rtol=1e-6, atol=1e-7)


_DP_CONFIGS = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=3, batch_size=100, seed=3),
    "nesterov_cosine": dict(lr=0.05, momentum=0.9, nesterov=True, schedule="cosine",
                            warmup_steps=4, epochs=3, batch_size=96, seed=1),
    "adamw_mlp": dict(optimizer="adamw", lr=3e-3, weight_decay=1e-2, head="mlp", hidden_size=16,
                      epochs=3, batch_size=128, seed=2),
}

_DP_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch.distributed
    from pyft.distributed import init_from_env
    from pyft.training import train_head_data_parallel

    configs, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    init_from_env()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng = np.random.default_rng(1)
    X = rng.standard_normal((1000, 24)).astype(np.float32)
    y = (X[:, :5] @ rng.standard_normal((5, 5))).argmax(1)
    # The features as a cache entry holds them: a float16 memmap on disk.
    path = os.path.join(out_dir, f"x{rank}.f16")
    mm = np.memmap(path, np.float16, "w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    mm = np.memmap(path, np.float16, "r", shape=X.shape)
    out = {}
    for name, cfg in configs.items():
        p, hist = train_head_data_parallel(mm, y, 5, **cfg)
        np.save(os.path.join(out_dir, f"{name}-{rank}.npy"), p)
        out[name] = [h["train_loss"] for h in hist]
    print(json.dumps(out), flush=True)
    if torch.distributed.is_initialized():  # leave the group cleanly: gloo aborts otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


def test_data_parallel_head_matches_one_process_and_the_native_trainer(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(_DP_WORKER)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _wait(_start(script, 1, json.dumps(_DP_CONFIGS), tmp_path / "one"))[0]
    two = _wait(_start(script, 2, json.dumps(_DP_CONFIGS), tmp_path / "two"))
    import pyft
    from pyft import _core

    rng = np.random.default_rng(1)
    X = rng.standard_normal((1000, 24)).astype(np.float32)
    y = (X[:, :5] @ rng.standard_normal((5, 5))).argmax(1)
    X16 = X.astype(np.float16)
    for name, cfg in _DP_CONFIGS.items():
        p1 = np.load(tmp_path / "one" / f"{name}-0.npy")
        p2 = [np.load(tmp_path / "two" / f"{name}-{r}.npy") for r in range(2)]
        np.testing.assert_array_equal(p2[0], p2[1])  # the ranks hold one head
        np.testing.assert_allclose(p2[0], p1, rtol=1e-4, atol=1e-5, err_msg=name)
        for out in two:
            np.testing.assert_allclose(out[name], one[name], rtol=1e-5, err_msg=name)
        # ... and the one-process run is the native fused trainer with the same settings.
        cfg = dict(cfg)
        head, hidden = cfg.pop("head", "linear"), cfg.pop("hidden_size", 0)
        cfg.setdefault("optimizer", "sgd")
        p = pyft.init_head_params(head, 24, 5, hidden, seed=cfg["seed"])
        res = _core.train_head(p, X16, y, num_classes=5, head=head, hidden_size=hidden, **cfg)
        np.testing.assert_allclose(p1, p, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(one[name], [h["train_loss"] for h in res["history"]],
                                   rtol=1e-4, err_msg=name)


def test_data_parallel_head_rejects_bad_input():
    from pyft.training import train_head_data_parallel

    X = np.zeros((10, 3), np.float32)
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="optimizer"):
        train_head_data_parallel(X, y, 2, optimizer="lamb")
    with pytest.raises(ValueError, match="labels must be in"):
        train_head_data_parallel(X, y + 5, 2)
    with pytest.raises(ValueError, match="10 entries"):
        train_head_data_parallel(X, y[:4], 2)
    with pytest.raises(ValueError, match="params must hold 8"):
        train_head_data_parallel(X, y, 2, params=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="hidden_size"):
        train_head_data_parallel(X, y, 2, head="mlp")
    with pytest.raises(ValueError, match="features must be a 2-D"):
        train_head_data_parallel(X.ravel(), y, 2)
    with pytest.raises(ValueError, match="at least 1 row"):
        train_head_data_parallel(X[:0], y[:0], 2)


def test_data_parallel_head_keeps_its_old_import_path():
    import pyft.distributed
    from pyft.distributed import train_head_data_parallel as old
    from pyft.training import train_head_data_parallel

    assert old is train_head_data_parallel
    assert "train_head_data_parallel" not in pyft.distributed.__all__  # plumbing only
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pyft.distributed.nope


_RANK0_WORKER = textwrap.dedent("""
    import json
    import torch.distributed as dist
    from pyft.distributed import Ranks, init_from_env, on_rank0, rank_and_world

    init_from_env()
    rank, world = rank_and_world()
    ok = on_rank0(lambda: {"value": 41 + 1}, "computing", Ranks(rank, world))

    def broken():
        raise ValueError("no such file: data.csv")

    try:
        on_rank0(broken, "advising a strategy", Ranks(rank, world))
        err = None
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    print(json.dumps({"rank": rank, "ok": ok, "error": err}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_a_failure_on_rank0_reaches_every_rank(tmp_path):
    """What rank 0 decides alone (advice, the L-BFGS head) reaches the others, and so does its
    failure: they raise at once instead of waiting for a result until the group times out."""
    script = tmp_path / "rank0.py"
    script.write_text(_RANK0_WORKER)
    outs = _wait(_start(script, 2))
    assert [o["ok"] for o in outs] == [{"value": 42}] * 2
    assert outs[0]["error"] == "ValueError: no such file: data.csv"
    assert outs[1]["error"] == ("RuntimeError: rank 0 failed while advising a strategy: "
                                "ValueError: no such file: data.csv")


def test_fine_tuner_ranks_with_other_settings_stop_with_a_clear_error(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(_FIT_WORKER)
    for p in _start(script, 2, "full", tmp_path / "c", "mismatch"):
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0
        assert "ranks disagree on the settings of FineTuner.fit: rank(s) [1]" in err, err[-2000:]


_MISMATCH_WORKER = textwrap.dedent("""
    import datetime, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from pyft.features import extract_features
    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing

    mode, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    m = wrap_model(net, 3, preprocessing=ImagePreprocessing((8, 8), (0.5,) * 3, (0.25,) * 3))
    X = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    if mode == "data" and rank == 1:
        X[3] += 1  # one pixel of one image differs on rank 1
    cache_dir = os.path.join(root, f"rank{rank}") if mode == "root" else root
    try:
        extract_features(m, X, cut=1, cache_dir=cache_dir, batch_size=8, progress=False)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
""")


@pytest.mark.parametrize("mode", ["data", "root"])
def test_ranks_that_disagree_get_a_clear_error(tmp_path, mode):
    """Different data on one rank, or a cache folder the ranks do not share, is an error that
    names the cause, not a hang or a half-written entry."""
    script = tmp_path / "mismatch.py"
    script.write_text(_MISMATCH_WORKER)
    procs = _start(script, 2, mode, tmp_path / "cache")
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        errs.append(err)
        assert p.returncode != 0
    if mode == "data":
        for err in errs:  # both ranks stop with the same message
            assert "ranks disagree on the data of the cache entry: rank(s) [1]" in err, err[-2000:]
    else:
        assert "rank 1 cannot see the cache entry rank 0 prepared" in errs[1], errs[1][-2000:]
        assert "must be on a file system every rank shares" in errs[1]
    for dirpath, _, files in os.walk(tmp_path / "cache"):
        assert "manifest.json" not in files


_SUBGROUP_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    import pyft
    from pyft.features import extract_features
    from pyft.distributed import init_from_env
    from pyft.grid import fit_grid
    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing
    from pyft.training import train_head_data_parallel

    out_dir = sys.argv[1]
    init_from_env()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    group = dist.new_group([1, 2])  # every rank calls new_group; ranks 1 and 2 split the work
    ref = rank == 0  # rank 0 computes the one-process reference
    how = False if ref else group
    res = {}
    if ref:
        try:
            fit_grid(np.zeros((10, 2), np.float32), np.arange(10) % 2, distributed=group)
        except ValueError as e:
            res["outsider"] = str(e)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 16)).astype(np.float32)
    y = (X[:, :4] @ rng.standard_normal((4, 3))).argmax(1)
    g = fit_grid(X, y, lrs=[1e-3, 1e-2, 1e-1, 1.0], weight_decays=[0.0], folds=3, epochs=2,
                 batch_size=64, n_threads=1, distributed=how)
    res["grid_best"] = int(g.best_index_)
    np.save(os.path.join(out_dir, f"grid{rank}.npy"), g.params_)
    p, _ = train_head_data_parallel(X, y, 3, lr=0.05, epochs=2, batch_size=50, distributed=how)
    np.save(os.path.join(out_dir, f"dp{rank}.npy"), p)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    m = wrap_model(net, 3, preprocessing=ImagePreprocessing((8, 8), (0.5,) * 3, (0.25,) * 3))
    imgs = rng.integers(0, 255, (90, 8, 8), dtype=np.uint8)
    cache = os.path.join(out_dir, "ref" if ref else "group")
    e = extract_features(m, imgs, cut=1, cache_dir=cache, batch_size=8, progress=False,
                         distributed=how)
    np.save(os.path.join(out_dir, f"cache{rank}.npy"), np.asarray(e.features))
    ft = pyft.FineTuner(m, strategy="freeze_first", k=1, epochs=2, batch_size=16, lr=1e-2,
                        patience=0, cache_dir=cache, progress=False, distributed=how)
    ft.fit(imgs, labels=np.arange(90) % 3)
    np.save(os.path.join(out_dir, f"ft{rank}.npy"),
            torch.cat([q.detach().reshape(-1) for q in ft.model_.net.parameters()]).numpy())
    print(json.dumps(res), flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_a_process_group_passed_as_distributed(tmp_path):
    """``distributed=<ProcessGroup>``: ranks 1 and 2 of 3 split extraction, grid, data-parallel
    head and fine-tuning among themselves and match rank 0's one-process results."""
    script = tmp_path / "sub.py"
    script.write_text(_SUBGROUP_WORKER)
    outs = _wait(_start(script, 3, tmp_path))
    assert "not a member of the process group" in outs[0]["outsider"]
    assert outs[1]["grid_best"] == outs[2]["grid_best"] == outs[0]["grid_best"]
    for name, tol in (("grid", 1e-6), ("dp", 1e-5), ("cache", 0), ("ft", 1e-4)):
        ref = np.load(tmp_path / f"{name}0.npy")
        for r in (1, 2):
            np.testing.assert_allclose(np.load(tmp_path / f"{name}{r}.npy"), ref, rtol=tol,
                                       atol=tol / 10, err_msg=name)


def test_init_from_env_without_torchrun_is_a_no_op(monkeypatch):
    from pyft.distributed import init_from_env, rank_and_world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_from_env()


def test_pyft_extract_under_torchrun(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(40):
        c = tmp_path / "data" / f"c{d.target[i] % 2}"
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).save(c / f"{i}.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "pyft", "extract", str(tmp_path / "data"),
           "--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][0])
    assert res["shape"] == [40, 1280] and not res["reused"]
    single = subprocess.run([sys.executable, "-m", "pyft", "extract", str(tmp_path / "data"),
                             "--image-size", "32", "--cache-dir", str(tmp_path / "cache"),
                             "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["reused"]  # the same entry: one key, complete
    adv = subprocess.run(cmd[:5] + ["-m", "pyft", "advise", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert adv.returncode != 0 and "runs in one process, not under torchrun" in adv.stderr


def _fit_cli(tmp_path, env, torchrun, out, *extra):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), "-m", "pyft"] if torchrun
              else [sys.executable, "-m", "pyft"])
    res = subprocess.run(launch + ["fit", str(tmp_path / "data"), "--image-size", "32",
                                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                                   "--json", *extra],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one report, from rank 0
    return json.loads(lines[0])


def test_pyft_fit_under_torchrun(tmp_path):
    """'pyft fit' under torchrun: the ranks share the extraction and the training, rank 0 writes
    the model; head_only gives the one-process model exactly."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image
    from safetensors.numpy import load_file
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(60):
        c = tmp_path / "data" / f"c{d.target[i] % 3}"
        c.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).save(c / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    two = _fit_cli(tmp_path, env, True, tmp_path / "two", "--strategy", "head_only")
    one = _fit_cli(tmp_path, env, False, tmp_path / "one", "--strategy", "head_only")
    assert two["strategy"] == one["strategy"] == "head_only"
    assert two["val_accuracy"] == one["val_accuracy"]
    w2 = load_file(os.path.join(two["model"], "model.safetensors"))
    w1 = load_file(os.path.join(one["model"], "model.safetensors"))
    assert w2.keys() == w1.keys()
    for k in w1:
        np.testing.assert_array_equal(w2[k], w1[k], err_msg=k)
    assert sorted(os.listdir(two["model"])) == ["config.json", "model.safetensors"]
    # freeze_first trains the unfrozen blocks data-parallel on the cached prefix (BatchNorm in
    # train mode normalises per rank, so it is not compared with one process bit for bit).
    ff = _fit_cli(tmp_path, env, True, tmp_path / "ff", "--strategy", "freeze_first", "--k",
                  "14", "--epochs", "2")
    assert ff["strategy"] == "freeze_first" and ff["k"] == 14
    with open(os.path.join(ff["model"], "config.json")) as f:
        assert len(json.load(f)["history"]) == 2
    # A bad --out stops every rank at once, with rank 0's reason.
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "pyft", "fit",
                          str(tmp_path / "data"), "--out", str(tmp_path / "no" / "run")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0
    assert "pyft fit: error: --out" in bad.stderr and "does not exist" in bad.stderr
    assert "rank 0 failed while checking --out: FileNotFoundError" in bad.stderr
    # auto: rank 0 advises (timed trials) and every rank follows its choice.
    auto = _fit_cli(tmp_path, env, True, tmp_path / "auto", "--budget", "2", "--epochs", "1")
    with open(os.path.join(tmp_path / "auto", "report", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["advice"]["strategy"] == auto["strategy"]


_FIT_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    from torch import nn
    import pyft
    from pyft.models import wrap_model
    from pyft.preprocessing import ImagePreprocessing
    from sklearn.datasets import load_digits

    strategy, root = sys.argv[1], sys.argv[2]
    # No init_process_group here: under torchrun's variables, fit initialises the group itself.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # No BatchNorm or dropout: a data-parallel step is then exactly the one-process step.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))
    model = wrap_model(net, 10, preprocessing=ImagePreprocessing((16, 16), (0.5,) * 3, (0.25,) * 3))
    d = load_digits()
    X = (d.images[:303] * (255 / 16)).astype(np.uint8)
    lr = 2e-2 if sys.argv[3:] == ["mismatch"] and os.environ.get("RANK") == "1" else 1e-2
    ft = pyft.FineTuner(model, strategy=strategy, k=1, epochs=4, batch_size=49, lr=lr,
                        patience=0, cache_dir=root, progress=False)
    ft.fit(X, labels=d.target[:303])
    params = torch.cat([p.detach().reshape(-1) for p in ft.model_.net.parameters()])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = os.path.join(os.path.dirname(root), f"params-{os.path.basename(root)}-{rank}.npy")
    np.save(out, params.numpy())
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    print(json.dumps({"params": out, "history": ft.history_, "world": world,
                      "val": ft.val_metrics_["accuracy"], "n_val": ft.val_metrics_["n"]}),
          flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


@pytest.mark.parametrize("strategy", ["freeze_first", "full"])
def test_data_parallel_fine_tuning_matches_one_process(tmp_path, strategy):
    """FineTuner under 2 ranks (cache + suffix for freeze_first, end to end for full) takes the
    steps of one process with the same global batch: same weights, losses and validation."""
    script = tmp_path / "fit.py"
    script.write_text(_FIT_WORKER)
    one = _wait(_start(script, 1, strategy, tmp_path / "c1"))[0]
    two = _wait(_start(script, 2, strategy, tmp_path / "c2"))
    assert one["world"] == 1 and [o["world"] for o in two] == [2, 2]  # fit joined the group
    for out in [one] + two:
        out["params"] = np.load(out["params"])
    np.testing.assert_array_equal(two[0]["params"], two[1]["params"])  # ranks agree exactly
    for out in two:
        np.testing.assert_allclose(out["params"], one["params"], rtol=1e-4, atol=2e-5)
        assert len(out["history"]) == len(one["history"]) == 4
        for h2, h1 in zip(out["history"], one["history"]):
            assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
            assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=1e-4)
            assert h2["val_accuracy"] == h1["val_accuracy"]
        assert out["val"] == one["val"] and out["n_val"] == one["n_val"] == 30
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"]
    assert one["val"] > 0.5  # it learns: 10 classes, chance is 0.1
