"""Feature cache: exact reuse, key sensitivity, resume after interruption, damage detection."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pyft.cache import CacheError, FeatureCache, data_fingerprint


def _source(n=1000, d=37, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _compute_from(src, calls=None, fail_after=None):
    def compute(b, e):
        if calls is not None:
            calls.append((b, e))
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt
        return src[b:e] * 2.0
    return compute


def test_compute_once_then_reuse(tmp_path):
    src = _source()
    cache = FeatureCache(tmp_path, chunk_size=256)
    calls = []
    e1 = cache.get_or_compute({"x": 1}, len(src), _compute_from(src, calls), batch_size=64,
                              labels=np.arange(len(src)) % 3, progress=False)
    assert not e1.reused and len(calls) == len(src) // 64 + 1
    assert e1.features.dtype == np.float16 and e1.features.shape == src.shape
    np.testing.assert_array_equal(e1.features, (src * 2).astype(np.float16))
    np.testing.assert_array_equal(e1.labels, np.arange(len(src)) % 3)
    assert not e1.features.flags.writeable
    e2 = cache.get_or_compute({"x": 1}, len(src), _compute_from(src, calls), batch_size=64,
                              progress=False)
    assert e2.reused and len(calls) == len(src) // 64 + 1  # no compute at all
    assert e2.key == e1.key
    e3 = cache.get_or_compute({"x": 2}, len(src), _compute_from(src, calls), batch_size=64,
                              progress=False)
    assert not e3.reused and e3.key != e1.key


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_storage_dtypes(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    src = _source(300, 5)
    e = FeatureCache(tmp_path).get_or_compute({}, 300, _compute_from(src), dtype=dtype,
                                              progress=False)
    if dtype == "bfloat16":
        ref = torch.from_numpy(src * 2).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert e.is_bfloat16
    else:
        ref = (src * 2).astype(dtype)
    np.testing.assert_array_equal(np.asarray(e.features), ref)


def test_interrupted_extraction_resumes_bit_identical(tmp_path):
    src = _source(1000, 11)
    ref = FeatureCache(tmp_path / "a", chunk_size=128).get_or_compute(
        {}, 1000, _compute_from(src), batch_size=32, progress=False)
    cache = FeatureCache(tmp_path / "b", chunk_size=128)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute({}, 1000, _compute_from(src, calls, fail_after=13), batch_size=32,
                             progress=False)
    d = cache.entry_dir(ref.key)
    assert not os.path.exists(os.path.join(d, "manifest.json"))  # never read as complete
    with open(os.path.join(d, "progress.json")) as f:
        done = json.load(f)["crc32"]
    assert sorted(map(int, done)) == [0, 1, 2]  # 3 chunks of 4 batches finished
    calls2 = []
    e = cache.get_or_compute({}, 1000, _compute_from(src, calls2), batch_size=32, progress=False)
    assert calls2[0] == (384, 416)  # resumed at the first incomplete chunk
    with open(os.path.join(d, "features.bin"), "rb") as f1, \
            open(os.path.join(ref.path, "features.bin"), "rb") as f2:
        assert f1.read() == f2.read()
    assert not e.reused and not os.path.exists(os.path.join(d, "progress.json"))


def test_corrupted_chunk_of_a_partial_run_is_recomputed(tmp_path):
    src = _source(512, 8)
    cache = FeatureCache(tmp_path, chunk_size=128)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute({}, 512, _compute_from(src, [], fail_after=9), batch_size=32,
                             progress=False)
    key_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    with open(key_dir / "features.partial", "r+b") as f:  # damage chunk 1
        f.seek(128 * 8 * 2 + 10)
        f.write(b"\xff\xff")
    calls = []
    e = cache.get_or_compute({}, 512, _compute_from(src, calls), batch_size=32, progress=False)
    assert (128, 160) in calls and (0, 32) not in calls
    np.testing.assert_array_equal(e.features, (src * 2).astype(np.float16))


def test_damaged_entry_is_detected_and_rebuilt(tmp_path):
    src = _source(400, 6)
    cache = FeatureCache(tmp_path, chunk_size=100)
    e = cache.get_or_compute({}, 400, _compute_from(src), batch_size=50, progress=False)
    path = os.path.join(e.path, "features.bin")
    del e
    with open(path, "r+b") as f:
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0x55]))
    with pytest.raises(CacheError, match="checksum.*rebuild=True"):
        cache.get_or_compute({}, 400, _compute_from(src), batch_size=50, progress=False)
    e = cache.get_or_compute({}, 400, _compute_from(src), batch_size=50, progress=False,
                             rebuild=True)
    assert not e.reused
    np.testing.assert_array_equal(e.features, (src * 2).astype(np.float16))
    del e
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match="damaged.*bytes"):
        cache.get_or_compute({}, 400, _compute_from(src), batch_size=50, progress=False)
    with open(os.path.join(os.path.dirname(path), "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CacheError, match="manifest"):
        cache.get_or_compute({}, 400, _compute_from(src), batch_size=50, progress=False)


def test_inconsistent_shapes_and_nan_leave_no_complete_entry(tmp_path):
    cache = FeatureCache(tmp_path)

    def ragged(b, e):
        return np.zeros((e - b, 4 if b == 0 else 5), np.float32)

    with pytest.raises(ValueError, match="same shape"):
        cache.get_or_compute({"r": 1}, 100, ragged, batch_size=10, progress=False)

    def nan(b, e):
        x = np.zeros((e - b, 4), np.float32)
        if b == 20:
            x[3, 1] = np.nan
        return x

    with pytest.raises(ValueError, match="item 23"):
        cache.get_or_compute({"r": 2}, 100, nan, batch_size=10, progress=False)
    assert not list(tmp_path.glob("*/manifest.json"))


def test_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        ro = "/proc/pyft-cache"  # root may write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    with pytest.raises(CacheError, match="cache"):
        FeatureCache(ro).get_or_compute({}, 10, _compute_from(_source(10, 2)), progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        FeatureCache(tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="verify"):
        FeatureCache(tmp_path, verify="some")
    c = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        c.get_or_compute({}, 10, _compute_from(_source(10, 2)), dtype="int8")
    with pytest.raises(ValueError, match="at least one sample"):
        c.get_or_compute({}, 0, _compute_from(_source(10, 2)))
    with pytest.raises(TypeError, match="ranks must be a pyft.distributed.Ranks"):
        c.get_or_compute({}, 10, _compute_from(_source(10, 2)), ranks=(0, 2, lambda: None))
    with pytest.raises(TypeError, match="fingerprint"):
        data_fingerprint(object())


def test_extract_features_still_imports_from_pyft_cache():
    # The README showed `from pyft.cache import extract_features` before it moved.
    from pyft.cache import extract_features
    from pyft.features import extract_features as moved

    assert extract_features is moved


def test_fingerprint_sensitivity(tmp_path):
    a = np.arange(100, dtype=np.uint8).reshape(4, 25)
    b = a.copy()
    b[2, 3] += 1
    assert data_fingerprint(a) == data_fingerprint(a.copy())
    assert data_fingerprint(a) != data_fingerprint(b)
    assert data_fingerprint(a) != data_fingerprint(a.astype(np.int16))
    assert data_fingerprint(["x", "y"]) != data_fingerprint(["x", "z"])
    f = tmp_path / "img.bin"
    f.write_bytes(b"abc")
    fp1 = data_fingerprint([str(f)])
    time.sleep(0.01)
    f.write_bytes(b"abcd")
    assert data_fingerprint([str(f)])["kind"] == "files"
    assert data_fingerprint([str(f)]) != fp1


_WORKER = textwrap.dedent("""
    import sys, time, numpy as np
    from pyft.cache import FeatureCache
    root, marker, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    src = np.random.default_rng(0).standard_normal((600, 9)).astype(np.float32)
    def compute(b, e):
        with open(marker, "a") as f:
            f.write(f"{b}\\n")
        time.sleep(delay)
        return src[b:e] * 2.0
    e = FeatureCache(root, chunk_size=100).get_or_compute({}, 600, compute, batch_size=50,
                                                          progress=False)
    print("reused" if e.reused else "computed", flush=True)
""")


def _spawn(tmp_path, root, marker, delay):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    return subprocess.Popen([sys.executable, str(script), str(root), str(marker), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_extraction_then_resume(tmp_path):
    marker = tmp_path / "calls.txt"
    p = _spawn(tmp_path, tmp_path / "c", marker, 0.05)
    deadline = time.time() + 60
    while time.time() < deadline:
        if marker.exists() and len(marker.read_text().split()) >= 5:
            break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    n_before = len(marker.read_text().split())
    assert n_before < 12  # killed half way
    q = _spawn(tmp_path, tmp_path / "c", marker, 0.0)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 0, err
    assert out.strip() == "computed"
    starts = [int(s) for s in marker.read_text().split()[n_before:]]
    assert starts[0] >= 100  # chunk 0 (two batches) was complete and reused
    src = np.random.default_rng(0).standard_normal((600, 9)).astype(np.float32)
    e = FeatureCache(tmp_path / "c").load(
        next(x.name for x in (tmp_path / "c").iterdir() if (x / "manifest.json").exists()))
    np.testing.assert_array_equal(e.features, (src * 2).astype(np.float16))


def test_two_processes_one_computes_the_other_reuses(tmp_path):
    marker = tmp_path / "calls.txt"
    p1 = _spawn(tmp_path, tmp_path / "c", marker, 0.02)
    p2 = _spawn(tmp_path, tmp_path / "c", marker, 0.02)
    o1, e1 = p1.communicate(timeout=120)
    o2, e2 = p2.communicate(timeout=120)
    assert p1.returncode == 0 and p2.returncode == 0, (e1, e2)
    assert sorted([o1.strip(), o2.strip()]) == ["computed", "reused"]
    assert len(marker.read_text().split()) == 12  # every batch computed exactly once


def test_batches_gather_shuffled_rows_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    src = _source(300, 12).reshape(300, 3, 4)
    e = FeatureCache(tmp_path).get_or_compute({}, 300, _compute_from(src),
                                              labels=np.arange(300) % 7, progress=False)
    stored = np.asarray(e.features, np.float32)
    rows, labels = [], []
    for x, y in e.batches(64, seed=3, epoch=1):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 4)
        rows.append(x.clone().numpy())
        labels.append(y.numpy())
    rows, labels = np.concatenate(rows), np.concatenate(labels)
    order = np.random.default_rng([3, 1]).permutation(300)
    np.testing.assert_array_equal(rows, stored[order])
    np.testing.assert_array_equal(labels, order % 7)
    # another epoch, another order; same epoch, same order
    a = np.concatenate([x.clone().numpy() for x, _ in e.batches(64, seed=3, epoch=2)])
    b = np.concatenate([x.clone().numpy() for x, _ in e.batches(64, seed=3, epoch=2)])
    assert not np.array_equal(a, rows) and np.array_equal(a, b)
    assert sum(len(x) for x, _ in e.batches(64, drop_last=True)) == 256
    plain = np.concatenate([x.clone().numpy() for x, _ in e.batches(100, shuffle=False)])
    np.testing.assert_array_equal(plain, stored)
    with pytest.raises(ValueError, match="batch_size"):
        next(e.batches(0))


_CHILD_TRAIN_ON_CACHE = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    import torch  # imported before the baseline: torch itself takes ~100 MB
    import pyft
    from pyft.cache import FeatureCache

    def anon_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    root, key = sys.argv[1], sys.argv[2]
    entry = FeatureCache(root, verify="size").load(key)
    base = anon_kb()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    clf = pyft.HeadClassifier(solver="sgd", lr=0.01, epochs=2, batch_size=256, random_state=0)
    clf.fit(entry.features, entry.labels)
    n = 0
    for x, y in entry.batches(512, seed=0):
        n += len(x)
    stop.set()
    t.join()
    print((peak[0] - base) * 1024, n)
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_training_on_a_cache_holds_no_copy_of_it(tmp_path):
    # A 24000 x 4096 float16 entry: 196 MB on disk. Training reads it through the memmap; the
    # process's own (anonymous) memory grows by far less than the entry's size. File pages the
    # reads bring in belong to the OS page cache and can be evicted.
    n, d = 24000, 4096
    rng = np.random.default_rng(0)

    def compute(b, e):
        return rng.standard_normal((e - b, d), dtype=np.float32)

    e = FeatureCache(tmp_path, chunk_size=4000).get_or_compute(
        {"big": 1}, n, compute, labels=np.arange(n) % 7, batch_size=1000, progress=False)
    size = e.features.nbytes
    key = e.key
    del e
    out = subprocess.run([sys.executable, "-c", _CHILD_TRAIN_ON_CACHE, str(tmp_path), key],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    growth, rows = map(int, out.stdout.split())
    assert rows == n
    assert growth < 0.2 * size, (growth, size)
