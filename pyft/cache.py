"""Frozen-layer feature cache: run the frozen part of a model over a dataset once, store the result.

An entry is a folder ``<root>/<key>/`` holding

- ``features.bin``: the activations, one row per sample, raw little-endian float16 (default),
  bfloat16 or float32, read back as a read-only ``np.memmap`` without loading it whole;
- ``labels.npy``: the labels, when given;
- ``<name>.npy``: per-row side arrays the suffix needs besides the activations, e.g. text
  encoders' ``attention_mask.npy`` (uint8, one row per sample, padded like the hidden states);
- ``manifest.json``: shape, dtype, the key's parts, and a CRC-32 per chunk of rows (of the
  activations and of each side array).

The key is a SHA-256 over the frozen weights, the cut point, the preprocessing, the storage
dtype, the numerics options and a fingerprint of the data (a hash of array bytes or texts, or each
file's path, size and modification time). An entry whose key differs in any part is never used.

Extraction writes ``features.partial`` chunk by chunk and records each finished chunk (with its
checksum) in ``progress.json`` through a temporary file and a rename, so an interrupted run
(Ctrl-C, kill -9) resumes from the last complete chunk; batches never straddle chunks, so the
result is bit-identical to an uninterrupted run. The manifest is written last, by rename: an entry
without one is never read as complete. A file lock lets one process compute while another waits
and then reuses the entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

__all__ = ["FeatureCache", "CacheEntry", "CacheError", "data_fingerprint", "default_cache_dir"]

FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


class CacheError(RuntimeError):
    """A cache entry is damaged or cannot be written."""


def default_cache_dir() -> str:
    """``$PYFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyft``, else ``~/.cache/pyft``."""
    env = os.environ.get("PYFT_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyft")


# ---------------------------------------------------------------------------- fingerprints
def data_fingerprint(data: Any) -> Dict[str, Any]:
    """A description of ``data`` that changes when any item changes.

    Arrays and tensors: SHA-256 of their bytes, shape and dtype. Lists of strings that are
    existing files: path, size and modification time of each. Other strings (texts): SHA-256.
    Lists of arrays / PIL images: SHA-256 over each item's bytes and shape.
    """
    h = hashlib.sha256()
    if hasattr(data, "fingerprint_paths"):  # pyft.data.ImageFiles: lazily read image files
        data = data.fingerprint_paths()
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # torch tensor
        data = data.detach().cpu().numpy() if str(data.dtype) != "torch.bfloat16" \
            else data.detach().cpu().view(-1).float().numpy()
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
        return {"kind": "array", "n": int(arr.shape[0]) if arr.ndim else 1, "sha256": h.hexdigest()}
    if isinstance(data, (list, tuple)):
        if all(isinstance(x, (str, os.PathLike)) for x in data) and data and \
                all(os.path.isfile(os.fspath(x)) for x in data):
            for x in data:
                p = os.path.abspath(os.fspath(x))
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return {"kind": "files", "n": len(data), "sha256": h.hexdigest()}
        for x in data:
            if isinstance(x, str):
                h.update(b"s")
                h.update(x.encode("utf-8", "surrogatepass"))
                h.update(b"\0")
            else:
                if type(x).__module__.startswith("PIL"):
                    x = np.asarray(x)
                a = np.ascontiguousarray(np.asarray(x))
                h.update(str(a.shape).encode() + str(a.dtype).encode())
                h.update(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
        return {"kind": "list", "n": len(data), "sha256": h.hexdigest()}
    raise TypeError(f"cannot fingerprint data of type {type(data).__name__}; pass an array, a "
                    "tensor, or a list of arrays, images, file paths or texts")


# ---------------------------------------------------------------------------- entries
@dataclass
class CacheEntry:
    """A complete cache entry.

    Attributes
    ----------
    path : str
        The entry's folder.
    features : np.memmap
        Read-only, shape ``(n, dim)`` (or the stored activation shape), float16 by default;
        bfloat16 entries are exposed as their uint16 bit pattern (``is_bfloat16``).
    labels : ndarray or None
    manifest : dict
    extras : dict of str to ndarray
        Per-row side arrays stored with the activations (text entries cut between encoder
        layers: ``"attention_mask"``, uint8 of shape (n, tokens)).
    """

    path: str
    features: np.ndarray
    labels: Optional[np.ndarray]
    manifest: Dict[str, Any]
    reused: bool
    extras: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def is_bfloat16(self) -> bool:
        return self.manifest["dtype"] == "bfloat16"

    @property
    def columns(self) -> Dict[str, slice]:
        """For pooled multi-depth entries: the column slice of each block."""
        cols = self.manifest.get("meta", {}).get("columns", {})
        return {name: slice(a, b) for name, (a, b) in cols.items()}

    @property
    def views(self) -> int:
        """Augmented views per sample (1 without augmentation)."""
        return int(self.manifest["parts"].get("augment", {}).get("views", 1))

    def __len__(self) -> int:
        """Number of samples (rows / views)."""
        return int(self.features.shape[0]) // self.views

    def batches(self, batch_size: int = 256, *, shuffle: bool = True, seed: int = 0,
                epoch: int = 0, drop_last: bool = False, n_threads: int = 0) -> Iterator[Any]:
        """Mini-batches of one epoch as ``(features, labels)`` torch tensors (float32, int64).

        When the entry holds side arrays (``extras``), ``features`` is a dict:
        ``{"features": tensor, "attention_mask": int64 tensor, ...}``, the same rows of each,
        ready for ``suffix(**features)``.

        Rows are gathered by the native multi-threaded gatherer straight from the memmap into
        one reused float32 buffer (float16/bfloat16 converted on the way): the tensors of a batch
        are valid until the next batch is drawn. With augmented views, each sample contributes one
        randomly drawn view per epoch.
        """
        import torch

        from pyft import _core

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        n = len(self)
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(n) if shuffle else np.arange(n)
        if self.views > 1:
            order = order + n * rng.integers(0, self.views, size=n)
        order = order.astype(np.int64)
        row_shape = self.features.shape[1:]
        buf = np.empty((min(batch_size, n),) + tuple(row_shape), np.float32)
        src = self.features
        labels = None if self.labels is None else torch.from_numpy(np.asarray(self.labels, np.int64))
        stop = n - (n % batch_size) if drop_last else n
        for b in range(0, stop, batch_size):
            idx = order[b:b + batch_size]
            out = buf[:len(idx)]
            if self.is_bfloat16:
                _core.gather_rows(src, idx, out=out, n_threads=n_threads, bfloat16=True)
            else:
                _core.gather_rows(src, idx, out=out, n_threads=n_threads)
            x = torch.from_numpy(out)
            if self.extras:
                x = dict({name: torch.from_numpy(np.asarray(a[idx], np.int64))
                          for name, a in self.extras.items()}, features=x)
            yield x, (None if labels is None else labels[torch.from_numpy(idx)])


def _atomic_write_json(path: str, obj: Any) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _crc(block: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))


class FeatureCache:
    """A folder of feature-cache entries (default :func:`default_cache_dir`).

    Parameters
    ----------
    root : str, optional
    chunk_size : int
        Rows per chunk: the unit of checksums and of resuming (a multiple of the batch size is
        used so batches never straddle chunks).
    verify : {"full", "size"}
        On reuse, ``"full"`` checks every chunk's CRC-32 (about a second per GB), ``"size"`` only
        the file size.
    """

    def __init__(self, root: Optional[Union[str, os.PathLike]] = None, *, chunk_size: int = 2048,
                 verify: str = "full") -> None:
        self.root = os.fspath(root) if root is not None else default_cache_dir()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size'; got {verify!r}")
        self.chunk_size = chunk_size
        self.verify = verify

    # ------------------------------------------------------------------ keys
    @staticmethod
    def make_key(parts: Dict[str, Any]) -> str:
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def entry_dir(self, key: str) -> str:
        return os.path.join(self.root, key)

    # ------------------------------------------------------------------ reading
    def load(self, key: str) -> Optional[CacheEntry]:
        """The complete entry for ``key``, ``None`` if there is none; raises on damage."""
        d = self.entry_dir(key)
        mpath = os.path.join(d, "manifest.json")
        if not os.path.exists(mpath):
            return None
        try:
            with open(mpath) as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise CacheError(f"cache entry {d} has an unreadable manifest ({e}); delete the folder "
                             "or pass rebuild=True") from e
        if man.get("key") != key or man.get("format") != FORMAT_VERSION:
            raise CacheError(f"cache entry {d} has a manifest for another key or format; delete "
                             "the folder or pass rebuild=True")
        fpath = os.path.join(d, "features.bin")
        shape = tuple(man["shape"])
        dtype = np.dtype(_DTYPES[man["dtype"]])
        expected = int(np.prod(shape)) * dtype.itemsize
        size = os.path.getsize(fpath) if os.path.exists(fpath) else -1
        if size != expected:
            raise CacheError(f"cache entry {d} is damaged: features.bin has {size} bytes, the "
                             f"manifest says {expected}; pass rebuild=True to recompute it")
        feats = np.memmap(fpath, dtype=dtype, mode="r", shape=shape) if expected else \
            np.zeros(shape, dtype)
        if self.verify == "full":
            rows = man["chunk_rows"]
            for i, want in enumerate(man["chunk_crc32"]):
                got = _crc(feats[i * rows:(i + 1) * rows])
                if got != want:
                    raise CacheError(
                        f"cache entry {d} is damaged: rows {i * rows}-{min((i + 1) * rows, shape[0]) - 1} "
                        f"fail their checksum; pass rebuild=True to recompute it")
        labels = None
        lpath = os.path.join(d, "labels.npy")
        if os.path.exists(lpath):
            labels = np.load(lpath)
        extras = {}
        for name, info in man.get("extras", {}).items():
            epath = os.path.join(d, info["file"])
            try:
                arr = np.load(epath)
            except (OSError, ValueError) as e:
                raise CacheError(f"cache entry {d} is damaged: {info['file']} cannot be read "
                                 f"({e}); pass rebuild=True to recompute it") from e
            if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
                raise CacheError(f"cache entry {d} is damaged: {info['file']} holds "
                                 f"{arr.dtype} {arr.shape}, the manifest says {info['dtype']} "
                                 f"{tuple(info['shape'])}; pass rebuild=True to recompute it")
            if self.verify == "full":
                rows = man["chunk_rows"]
                for i, want in enumerate(info["chunk_crc32"]):
                    if _crc(arr[i * rows:(i + 1) * rows]) != want:
                        raise CacheError(
                            f"cache entry {d} is damaged: rows {i * rows}-"
                            f"{min((i + 1) * rows, shape[0]) - 1} of {info['file']} fail their "
                            "checksum; pass rebuild=True to recompute it")
            extras[name] = arr
        return CacheEntry(d, feats, labels, man, reused=True, extras=extras)

    # ------------------------------------------------------------------ writing
    def get_or_compute(self, key_parts: Dict[str, Any], n: int, compute: Any, *, labels: Optional[np.ndarray] = None,
                       dtype: str = "float16", batch_size: int = 64, rebuild: bool = False,
                       progress: bool = True, desc: str = "extracting",
                       meta: Optional[Dict[str, Any]] = None,
                       dist: Optional[Tuple[int, int, Any]] = None,
                       extras: Optional[Callable[[], Dict[str, np.ndarray]]] = None) -> CacheEntry:
        """Return the entry for ``key_parts``, computing it with ``compute(start, stop)`` if needed.

        ``compute(start, stop)`` returns the float32 activations of samples ``start:stop`` as an
        array of shape ``(stop - start, *row_shape)``; it is called batch by batch, and not at all
        when a complete entry exists. ``meta`` (a dict the computation may fill) is stored in the
        manifest when the entry is written. ``extras()``, called once when the entry is
        written (not on reuse), returns per-row side arrays (first dimension ``n``) stored and
        checksummed beside the activations (``entry.extras``).

        ``dist=(rank, world_size, barrier)`` splits the work over processes that share the cache
        folder (e.g. torch.distributed ranks): chunk ``c`` is computed by rank ``c % world_size``
        into the same file, rank 0 writes the manifest once every chunk is done, and the entry is
        byte for byte the one a single process writes. Each rank records its finished chunks in
        its own progress file, so a rerun (with any number of ranks) resumes after a rank died.
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"the dataset must hold at least one sample; got {n}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        parts = dict(key_parts, dtype=dtype, format=FORMAT_VERSION, n=int(n))
        key = self.make_key(parts)
        d = self.entry_dir(key)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {d}: {e.strerror}; pass another "
                             "cache directory (cache_dir=... or $PYFT_CACHE_DIR)") from e
        if not os.access(d, os.W_OK):
            raise CacheError(f"the cache folder {d} is not writable; pass another cache directory "
                             "(cache_dir=... or $PYFT_CACHE_DIR)")
        if dist is not None and int(dist[1]) > 1:
            rank, world, barrier = int(dist[0]), int(dist[1]), dist[2]
            if rank == 0 and rebuild:
                self._remove_entry_files(d)
            barrier()
            entry = self.load(key)
            if entry is not None:
                return entry
            return self._extract(d, key, parts, int(n), compute, labels, dtype, int(batch_size),
                                 progress and rank == 0, desc, meta, dist=(rank, world, barrier),
                                 extras=extras)
        with _file_lock(os.path.join(d, ".lock")):
            if rebuild:
                self._remove_entry_files(d)
            entry = self.load(key)
            if entry is not None:
                return entry
            return self._extract(d, key, parts, int(n), compute, labels, dtype, int(batch_size),
                                 progress, desc, meta, extras=extras)

    @staticmethod
    def _remove_entry_files(d: str) -> None:
        names = ["manifest.json", "features.bin", "features.partial", "progress.json", "labels.npy"]
        names += [f for f in os.listdir(d) if f.startswith("progress.rank")
                  or (f.endswith(".npy") and f != "labels.npy")]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))

    @staticmethod
    def _write_extras(d: str, arrays: Dict[str, np.ndarray], n: int, rows: int
                      ) -> Dict[str, Any]:
        """Write each side array as ``<name>.npy`` (atomically); their manifest records."""
        out = {}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if not name.isidentifier() or name in ("features", "labels"):
                raise ValueError(f"extras names must be identifiers other than 'features' and "
                                 f"'labels'; got {name!r}")
            if arr.ndim < 1 or arr.shape[0] != n:
                raise ValueError(f"extras[{name!r}] must have {n} rows; got shape {arr.shape}")
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=d)
            os.close(fd)
            np.save(tmp, arr)
            os.replace(tmp, os.path.join(d, f"{name}.npy"))
            out[name] = {"file": f"{name}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape),
                         "chunk_crc32": [_crc(arr[i:i + rows]) for i in range(0, n, rows)]}
        return out

    @staticmethod
    def _recorded_crcs(d: str, key: str, state: Dict[str, Any]) -> Dict[str, int]:
        """Finished chunks: those in progress.json and in every rank's progress file."""
        crcs = dict(state.get("crc32", {}))
        for f in sorted(os.listdir(d)):
            if f.startswith("progress.rank") and f.endswith(".json"):
                try:
                    with open(os.path.join(d, f)) as fh:
                        other = json.load(fh)
                except (OSError, ValueError):
                    continue
                if other.get("key") == key and other.get("chunk_rows") == state.get("chunk_rows"):
                    crcs.update(other.get("crc32", {}))
        return crcs

    def _extract(self, d: str, key: str, parts: Dict[str, Any], n: int, compute: Any,
                 labels: Optional[np.ndarray], dtype: str, batch_size: int, progress: bool,
                 desc: str, meta: Optional[Dict[str, Any]] = None,
                 dist: Optional[Tuple[int, int, Any]] = None,
                 extras: Optional[Callable[[], Dict[str, np.ndarray]]] = None) -> CacheEntry:
        from tqdm.auto import tqdm

        rank, world, barrier = dist if dist is not None else (0, 1, lambda: None)
        np_dtype = np.dtype(_DTYPES[dtype])
        rows = max(batch_size, (self.chunk_size // batch_size) * batch_size)
        n_chunks = (n + rows - 1) // rows
        ppath = os.path.join(d, "progress.json")
        fpath = os.path.join(d, "features.partial")
        done: List[int] = []
        state = None
        first = None  # the first batch, when computed to learn the activation shape
        if rank == 0 and os.path.exists(ppath) and os.path.exists(fpath):
            try:
                with open(ppath) as f:
                    state = json.load(f)
                row_shape = tuple(int(s) for s in state["row_shape"])
                nbytes = int(np.prod((n,) + row_shape)) * np_dtype.itemsize
            except (OSError, ValueError, KeyError, TypeError):
                state = None
            if state is None or state.get("key") != key or state.get("chunk_rows") != rows \
                    or os.path.getsize(fpath) != nbytes:
                state = None
        if rank == 0 and state is None:
            first = np.asarray(compute(0, min(batch_size, n)))
            row_shape = tuple(int(s) for s in first.shape[1:])
            nbytes = int(np.prod((n,) + row_shape)) * np_dtype.itemsize
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fpath)
            try:
                with open(fpath, "wb") as f:
                    if nbytes:
                        try:
                            os.posix_fallocate(f.fileno(), 0, nbytes)
                        except AttributeError:  # pragma: no cover - not on Linux
                            f.truncate(nbytes)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(fpath)
                if e.errno == errno.ENOSPC:
                    free = shutil.disk_usage(d).free
                    raise CacheError(f"not enough disk space for the cache entry in {d}: it needs "
                                     f"{nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free") from e
                raise CacheError(f"cannot write the cache entry in {d}: {e}") from e
            state = {"key": key, "chunk_rows": rows, "row_shape": list(row_shape), "crc32": {}}
            _atomic_write_json(ppath, state)
        barrier()  # rank 0 has prepared the file and progress.json
        if rank != 0:
            try:
                with open(ppath) as f:
                    state = json.load(f)
            except FileNotFoundError:
                raise CacheError(
                    f"rank {rank} cannot see the cache entry rank 0 prepared in {d}: the cache "
                    "folder must be on a file system every rank shares (NFS, Lustre, ...); pass "
                    "such a cache_dir on every rank") from None
            row_shape = tuple(int(x) for x in state["row_shape"])
        shape = (n,) + row_shape
        crcs: Dict[str, int] = self._recorded_crcs(d, key, state)
        mine = [ci for ci in range(n_chunks) if ci % world == rank]
        if world > 1:  # this rank's own record; progress.json stays rank 0's setup
            ppath = os.path.join(d, f"progress.rank{rank}.json")
            state = {"key": key, "chunk_rows": rows, "row_shape": list(row_shape),
                     "crc32": {c: v for c, v in crcs.items() if int(c) in mine}}
            crcs = state["crc32"]
        else:
            state["crc32"] = crcs
        mm = np.memmap(fpath, dtype=np_dtype, mode="r+", shape=shape)
        # Chunks recorded as done are checked before they are trusted.
        for c in list(crcs):
            i = int(c)
            if _crc(mm[i * rows:(i + 1) * rows]) != crcs[c]:
                del crcs[c]
        done = sorted(int(c) for c in crcs)
        bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, smoothing=0.1)
        bar.update(sum(min(rows, n - i * rows) for i in done))
        t0 = time.perf_counter()
        try:
            for ci in mine:
                if ci in done:
                    continue
                lo, hi = ci * rows, min((ci + 1) * rows, n)
                for b in range(lo, hi, batch_size):
                    e = min(b + batch_size, hi)
                    if b == 0 and first is not None:
                        out, first = first, None
                    else:
                        out = np.asarray(compute(b, e))
                    if out.shape != (e - b,) + row_shape:
                        raise ValueError(
                            f"items {b}..{e - 1} gave activations of shape {out.shape[1:]}; "
                            f"earlier items gave {row_shape}: every item must have the same shape")
                    if not np.isfinite(out).all():
                        bad = int(np.argwhere(~np.isfinite(out.reshape(len(out), -1)))[0][0]) + b
                        raise ValueError(f"the frozen layers gave NaN or infinite activations "
                                         f"for item {bad}")
                    mm[b:e] = _to_storage(out, dtype)
                    bar.update(e - b)
                mm.flush()
                crcs[str(ci)] = _crc(mm[lo:hi])
                _atomic_write_json(ppath, state)
        finally:
            bar.close()
            del mm
        seconds = time.perf_counter() - t0
        if world > 1:
            barrier()  # every rank has finished its chunks
            if rank != 0:
                barrier()  # rank 0 writes the manifest
                entry = self.load(key)
                if entry is None:
                    raise CacheError(f"rank 0 did not complete the cache entry in {d}")
                entry.reused = False
                return entry
            with open(os.path.join(d, "progress.json")) as f:
                crcs = self._recorded_crcs(d, key, json.load(f))
            missing = [i for i in range(n_chunks) if str(i) not in crcs]
            if missing:
                barrier()
                raise CacheError(f"chunks {missing[:5]} of {d} were not computed by rank(s) "
                                 f"{sorted({i % world for i in missing})}")
        if labels is not None:
            lab = np.asarray(labels)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=d)
            os.close(fd)
            np.save(tmp, lab)
            os.replace(tmp, os.path.join(d, "labels.npy"))
        man = {
            "key": key, "format": FORMAT_VERSION, "shape": list(shape), "dtype": dtype,
            "chunk_rows": rows, "chunk_crc32": [crcs[str(i)] for i in range(n_chunks)],
            "parts": parts, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "extract_seconds": seconds, "meta": dict(meta or {}),
        }
        if extras is not None:
            man["extras"] = self._write_extras(d, extras(), n, rows)
        os.replace(fpath, os.path.join(d, "features.bin"))
        _atomic_write_json(os.path.join(d, "manifest.json"), man)
        for f in os.listdir(d):
            if f == "progress.json" or (f.startswith("progress.rank") and f.endswith(".json")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, f))
        if world > 1:
            barrier()
        entry = self.load(key)
        if entry is None:  # pragma: no cover - the manifest was just written
            raise CacheError(f"cache entry {d} vanished right after it was written")
        entry.reused = False
        return entry


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    return x.astype(_DTYPES[dtype])


# ---------------------------------------------------------------------------- models
def _frozen_part_hash(model: Any, cut: Optional[int]) -> str:
    """SHA-256 of the weights the activations at ``cut`` depend on (``None``: the whole body)."""
    return model.adapter.frozen_hash(model, cut)


def extract_features(model: Any, data: Any, labels: Any = None, *, cut: Union[str, int] = "head",
                     cache_dir: Optional[Union[str, os.PathLike]] = None, dtype: str = "float16",
                     batch_size: int = 64, channels_last: bool = False, autocast_bf16: bool = False,
                     progress: bool = True, rebuild: bool = False,
                     transform: Any = None, augment_views: Optional[int] = None, seed: int = 0,
                     distributed: Any = None,
                     cache: Optional[FeatureCache] = None) -> CacheEntry:
    """Run the frozen part of ``model`` over ``data`` once and cache the activations.

    Parameters
    ----------
    model : FineTunableModel
    data : array, tensor or list
        What ``model.preprocess`` accepts, indexable by sample (images or texts).
    labels : array of shape (n,), optional
        Stored beside the features.
    cut : "head", int, str or list
        ``"head"``: the head's input (the pooled body output; for ``head_only``). An int ``k`` or a
        block name: the output of the first ``k`` blocks (for ``freeze_first(k)``), unpooled. A
        list of them: the pooled outputs of those depths, side by side in one row, from one pass
        (for probing; ``entry.columns`` says which columns hold which block).
    dtype : {"float16", "bfloat16", "float32"}
        Storage type.
    channels_last, autocast_bf16 : bool
        Numerics options of the forward pass (part of the key).
    rebuild : bool
        Recompute even when a complete entry exists (e.g. after a damaged-entry error).
    transform : callable, optional
        A random augmentation applied to each preprocessed image tensor (C, H, W), e.g. a
        torchvision ``transforms.v2`` pipeline. Caching computes an augmented image once and
        reuses it every epoch, which defeats random augmentation: pass ``augment_views=K`` to
        cache K augmented views per sample (training then draws one view per sample and epoch),
        or train end to end. A transform without ``augment_views`` warns.
    augment_views : int, optional
        Number of augmented views per sample; rows ``v * n + i`` hold view ``v`` of sample ``i``.
    seed : int
        Seeds the augmentation (each batch of each view gets its own seed, so an interrupted
        extraction resumes bit-identically).
    distributed : bool or ProcessGroup, optional
        Split the extraction over the ranks of the initialised ``torch.distributed`` process group,
        or of the ``ProcessGroup`` given (default: when one is initialised, or initialise it from
        ``torchrun``'s environment; see :func:`pyft.distributed.process_group`). Every rank
        passes the same data and cache folder (a shared file system); each computes a disjoint,
        deterministic set of chunks, rank 0 writes the manifest after a barrier, and the entry is
        byte for byte the single-process one. A rerun after a rank died reuses the finished
        chunks.

    Returns
    -------
    CacheEntry
        ``entry.features`` is a read-only memmap; ``entry.reused`` tells whether the backbone ran.
    """
    import torch

    from pyft.models import FineTunableModel

    if not isinstance(model, FineTunableModel):
        raise TypeError(f"model must be a FineTunableModel (pyft.load_model); got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    n = len(data) if not hasattr(data, "shape") else int(data.shape[0])
    if n == 0:
        raise ValueError("data must not be empty")
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or len(lab) != n:
            raise ValueError(f"labels must have shape ({n},) to match data; got {lab.shape}")
    views = 1
    if augment_views is not None:
        if isinstance(augment_views, bool) or not isinstance(augment_views, int) or augment_views < 1:
            raise ValueError(f"augment_views must be an int >= 1; got {augment_views!r}")
        if transform is None:
            raise ValueError("augment_views needs a transform: the random augmentation to cache")
        views = augment_views
    elif transform is not None:
        import warnings

        warnings.warn(
            "a random transform with the feature cache: each sample is augmented once and the same "
            "augmented features are reused every epoch, so the augmentation is lost. Pass "
            "augment_views=K to cache K views per sample, or train end to end without the cache",
            UserWarning, stacklevel=2)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable; got {type(transform).__name__}")
    if transform is not None and model.kind != "image":
        raise ValueError(f"transform applies to image models; {model.spec} is a {model.kind} model")
    probe_blocks: Optional[List[int]] = None
    if isinstance(cut, (list, tuple)):
        if not cut:
            raise ValueError("cut must name at least one block")
        probe_blocks = sorted({model.block_index(c, argument="cut") for c in cut})
        if probe_blocks[0] == 0:
            raise ValueError("cut=0 names no block; blocks count from 1")
        k = probe_blocks[-1]
        cut_name = "pooled:" + ",".join(model.blocks[i - 1].name for i in probe_blocks)
    elif cut == "head":
        k = None
        cut_name = "head"
    else:
        k = model.block_index(cut, argument="cut")
        if k == 0:
            raise ValueError("cut=0 leaves nothing frozen to cache; use cut >= 1 or 'head'")
        cut_name = model.blocks[k - 1].name
    parts = {
        "spec": model.spec,
        "weights": _frozen_part_hash(model, k),
        "cut": cut_name,
        "preprocessing": model.preprocessing.key(),
        "channels_last": bool(channels_last),
        "autocast_bf16": bool(autocast_bf16),
        "data": data_fingerprint(data),
    }
    if transform is not None:
        parts["augment"] = {"transform": repr(transform), "views": views, "seed": int(seed)}
    # Text cut between encoder layers: every row is padded to the longest text of the data (one
    # activation shape per entry), and the suffix needs each row's attention mask.
    text_rows = model.kind == "text" and k is not None and probe_blocks is None
    if text_rows:
        if not hasattr(model.preprocessing, "lengths"):
            raise ValueError(f"cut={cut!r} on a text model needs a TextPreprocessing (it pads "
                             "every text to the longest one); this model's preprocessing is a "
                             f"{type(model.preprocessing).__name__}")
        parts["rows"] = "padded to the longest text, attention_mask stored"
    pad_len: List[int] = []

    def padded(start: int, stop: int) -> Any:
        if not pad_len:  # computed when the backbone runs, not when an entry is reused
            pad_len.append(max(model.preprocessing.lengths(list(data))))
        return model.preprocessing(take(start, stop), pad_to=pad_len[0])

    def masks() -> Dict[str, np.ndarray]:
        out = [np.asarray(padded(i, min(i + 1024, n))["attention_mask"], np.uint8)
               for i in range(0, n, 1024)]
        return {"attention_mask": np.concatenate(out)}

    def take(start: int, stop: int) -> Any:
        if isinstance(data, (list, tuple)):
            return list(data[start:stop])
        return data[start:stop]

    was_training = model.training

    def forward_views(start: int, stop: int) -> np.ndarray:
        # Rows of view v are v * n .. v * n + n - 1; a batch may straddle two views.
        parts_out = []
        row = start
        while row < stop:
            v, i = divmod(row, n)
            j = min(stop - v * n, n)
            parts_out.append(forward(i, j, view=v if transform is not None else None))
            row = v * n + j
        return parts_out[0] if len(parts_out) == 1 else np.concatenate(parts_out)

    def forward(start: int, stop: int, view: Optional[int] = None) -> np.ndarray:
        x = padded(start, stop) if text_rows else model.preprocess(take(start, stop))
        if view is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{int(seed)}/{view}/{start}".encode()))
                x = torch.stack([transform(xi) for xi in x])
        if channels_last and hasattr(x, "to") and getattr(x, "ndim", 0) == 4:
            x = x.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=autocast_bf16):
            if probe_blocks is not None:
                outs = model.block_outputs(x, [i - 1 for i in probe_blocks], pool=True)
                if "columns" not in meta:
                    cols, start = {}, 0
                    for i in probe_blocks:
                        w = int(outs[i - 1].shape[1])
                        cols[model.blocks[i - 1].name] = [start, start + w]
                        start += w
                    meta["columns"] = cols
                out = torch.cat([outs[i - 1].float() for i in probe_blocks], dim=1)
            elif k is None:
                out = model.features(x)
            else:
                out = model.block_outputs(x, [k - 1], pool=False)[k - 1]
        return out.float().contiguous().numpy()

    meta: Dict[str, Any] = {}

    from pyft.distributed import check_same_on_all_ranks, process_group

    dist_spec = None
    ranks = process_group(distributed)
    if ranks.world > 1:
        import torch.distributed as tdist

        dist_spec = (ranks.rank, ranks.world, lambda: tdist.barrier(group=ranks.group))
        # One entry for all ranks: the key parts (weights, data, cut, options) must agree.
        check_same_on_all_ranks(parts, "the cache entry", ranks)

    model.eval()
    try:
        store = cache or FeatureCache(cache_dir)
        if views > 1 and lab is not None:
            lab = np.tile(lab, views)
        return store.get_or_compute(parts, n * views, forward_views, labels=lab, dtype=dtype,
                                    batch_size=batch_size, rebuild=rebuild, progress=progress,
                                    desc=f"{model.spec} -> {cut_name}", meta=meta,
                                    dist=dist_spec, extras=masks if text_rows else None)
    finally:
        model.train(was_training)
