"""Large memmaps train without a float32 copy; Ctrl-C stops a native training run cleanly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

_CHILD_TRAIN_MEMMAP = textwrap.dedent(
    """
    import resource, sys, numpy as np
    import pyft
    from pyft import _core
    path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    X = np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))
    y = (np.arange(n) % 7).astype(np.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = pyft.init_head_params("linear", d, 7)
    res = _core.train_head(p, X, y, num_classes=7, optimizer="sgd", lr=0.01, epochs=2)
    q = pyft.init_head_params("linear", d, 7)
    _core.train_head_lbfgs(q, X, y, num_classes=7, l2=1e-3, max_iter=3)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


@pytest.mark.slow
def test_float16_memmap_trains_without_float32_copy(tmp_path):
    # 24000 x 4096 float16 = 196 MB on disk; a float32 copy would add 393 MB of anonymous memory.
    n, d = 24000, 4096
    path = tmp_path / "features.f16"
    X = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    rng = np.random.default_rng(0)
    for s in range(0, n, 4000):
        X[s : s + 4000] = rng.standard_normal((min(4000, n - s), d), dtype=np.float32)
    X.flush()
    del X
    size = n * d * 2
    out = subprocess.run(
        [sys.executable, "-c", _CHILD_TRAIN_MEMMAP, str(path), str(n), str(d)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    peak_increase = int(out.stdout.strip().splitlines()[-1])
    # Mapped file pages count towards RSS, so reading the whole file once may add up to `size`;
    # any float32 copy would add 2 * size on top.
    assert peak_increase < 1.3 * size, (peak_increase, size)


_CHILD_INTERRUPT = textwrap.dedent(
    """
    import sys, time, numpy as np
    import signal
    # A shell that starts jobs in the background hands them SIGINT ignored; the test is about
    # pyft's handling of Ctrl-C, so the child takes Python's own handler whatever it inherited.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import pyft
    from pyft import _core
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20000, 256), dtype=np.float32)
    y = rng.integers(0, 10, 20000)
    p = pyft.init_head_params("linear", 256, 10)
    def cb(info):
        if info["epoch"] == 0:
            print("started", flush=True)
    try:
        _core.train_head(p, X, y, num_classes=10, epochs=100000, callback=cb)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
    print("finished", flush=True)
    """
)


def test_ctrl_c_interrupts_native_training():
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_INTERRUPT], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == "started"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert rest.strip() == "interrupted"
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()


def test_callback_exception_propagates_and_stops():
    import pyft
    from pyft import _core

    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 16), dtype=np.float32)
    y = rng.integers(0, 3, 512)
    p = pyft.init_head_params("linear", 16, 3)
    seen = []

    def cb(info):
        seen.append(info["epoch"])
        if info["epoch"] == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        _core.train_head(p, X, y, num_classes=3, epochs=50, callback=cb)
    assert seen == [0, 1, 2]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_threads_resolve():
    from pyft import _core

    assert _core.num_threads(1) == 1
    assert _core.num_threads(0) >= 1
