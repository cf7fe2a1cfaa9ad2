"""Frozen-layer feature cache: the stored activations of the frozen part of a model over a dataset.

This module stores, checks and resumes; :func:`pyft.features.extract_features` runs the model.

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

from pyft._checks import ArgumentTypeError, check_choice, check_number
from pyft.distributed import Ranks

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
                epoch: int = 0, drop_last: bool = False, n_threads: int = 0,
                trim_padding: bool = True) -> Iterator[Any]:
        """Mini-batches of one epoch as ``(features, labels)`` torch tensors (float32, int64).

        When the entry holds side arrays (``extras``), ``features`` is a dict:
        ``{"features": tensor, "attention_mask": int64 tensor, ...}``, the same rows of each,
        ready for ``suffix(**features)``. Text rows are stored padded to the longest text of the
        whole entry; with ``trim_padding`` (default) each batch is cut to the columns its own
        rows use (right padding: the columns after the last 1 of every row's attention mask), as
        a tokenizer padding per batch would give. A masked suffix computes the same outputs on
        fewer tokens (tweets: 100 stored columns, about 66 used by a batch of 64).

        Rows are gathered by the native multi-threaded gatherer straight from the memmap into
        one reused float32 buffer (float16/bfloat16 converted on the way): the tensors of a batch
        are valid until the next batch is drawn. With augmented views, each sample contributes one
        randomly drawn view per epoch.
        """
        import torch

        from pyft import _core

        check_number("batch_size", batch_size, low=1, integer=True)
        n = len(self)
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(n) if shuffle else np.arange(n)
        if self.views > 1:
            order = order + n * rng.integers(0, self.views, size=n)
        order = order.astype(np.int64)
        row_shape = self.features.shape[1:]
        buf = np.empty((min(batch_size, n),) + tuple(row_shape), np.float32)
        src = self.features
        labels = None if self.labels is None else \
            torch.from_numpy(np.asarray(self.labels, np.int64))
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
                if trim_padding:
                    x = _trim_padding(x)
            yield x, (None if labels is None else labels[torch.from_numpy(idx)])


def _trim_padding(x: Dict[str, Any]) -> Dict[str, Any]:
    """A text batch cut to the token columns its rows use: up to the last column where any row's
    attention mask is 1 (the tokenizers pyft loads pad on the right)."""
    mask = x.get("attention_mask")
    feats = x["features"]
    if mask is None or mask.dim() != 2 or feats.dim() < 2 or feats.shape[1] != mask.shape[1]:
        return x
    used = mask.any(0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    if width == mask.shape[1]:
        return x
    return {name: (v[:, :width] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v)
            for name, v in x.items()}


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
        check_number("chunk_size", chunk_size, low=1, integer=True)
        check_choice("verify", verify, ("full", "size"))
        self.chunk_size = int(chunk_size)
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
                    last = min((i + 1) * rows, shape[0]) - 1
                    raise CacheError(
                        f"cache entry {d} is damaged: rows {i * rows}-{last} "
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
    def get_or_compute(self, key_parts: Dict[str, Any], n: int, compute: Any, *,
                       labels: Optional[np.ndarray] = None,
                       dtype: str = "float16", batch_size: int = 64, rebuild: bool = False,
                       progress: bool = True, desc: str = "extracting",
                       meta: Optional[Dict[str, Any]] = None,
                       ranks: Optional[Ranks] = None,
                       extras: Optional[Callable[[], Dict[str, np.ndarray]]] = None) -> CacheEntry:
        """Return the entry for ``key_parts``, computing it with ``compute(start, stop)`` if needed.

        ``compute(start, stop)`` returns the float32 activations of samples ``start:stop`` as an
        array of shape ``(stop - start, *row_shape)``; it is called batch by batch, and not at all
        when a complete entry exists. ``meta`` (a dict the computation may fill) is stored in the
        manifest when the entry is written. ``extras()``, called once when the entry is
        written (not on reuse), returns per-row side arrays (first dimension ``n``) stored and
        checksummed beside the activations (``entry.extras``).

        ``ranks`` (a :class:`pyft.distributed.Ranks` of the torch.distributed group, e.g. from
        :func:`pyft.distributed.process_group`) splits the work over processes that share the
        cache folder: chunk ``c`` is computed by rank ``c % world`` into the same file, rank 0
        writes the manifest once every chunk is done (the ranks meet at barriers of
        ``ranks.group``), and the entry is byte for byte the one a single process writes. Each
        rank records its finished chunks in its own progress file, so a rerun (with any number of
        ranks) resumes after a rank died.
        """
        check_choice("dtype", dtype, tuple(_DTYPES))
        check_number("n", n, integer=True)
        if n < 1:
            raise ValueError(f"the dataset must hold at least one sample; got {n}")
        check_number("batch_size", batch_size, low=1, integer=True)
        if ranks is None:
            ranks = Ranks(0, 1)
        elif not isinstance(ranks, Ranks):
            raise ArgumentTypeError("ranks must be a pyft.distributed.Ranks (rank, world, group) "
                                    f"or None; got {ranks!r}")
        parts = dict(key_parts, dtype=dtype, format=FORMAT_VERSION, n=int(n))
        key = self.make_key(parts)
        d = self._writable_entry_dir(key)
        job = _Extraction(self, d, key, parts, int(n), compute, dtype, int(batch_size), ranks)
        if ranks.world > 1:
            # The ranks meet at barriers instead of the file lock: they compute one entry together.
            if ranks.rank == 0 and rebuild:
                self._remove_entry_files(d)
            _barrier(ranks)
            entry = self.load(key)
            if entry is not None:
                return entry
            return self._extract(job, labels, progress and ranks.rank == 0, desc, meta, extras)
        with _file_lock(os.path.join(d, ".lock")):
            if rebuild:
                self._remove_entry_files(d)
            entry = self.load(key)
            if entry is not None:
                return entry
            return self._extract(job, labels, progress, desc, meta, extras)

    def _writable_entry_dir(self, key: str) -> str:
        d = self.entry_dir(key)
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {d}: {e.strerror}; pass another "
                             "cache directory (cache_dir=... or $PYFT_CACHE_DIR)") from e
        if not os.access(d, os.W_OK):
            raise CacheError(f"the cache folder {d} is not writable; pass another cache directory "
                             "(cache_dir=... or $PYFT_CACHE_DIR)")
        return d

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

    def _extract(self, job: "_Extraction", labels: Optional[np.ndarray], progress: bool,
                 desc: str, meta: Optional[Dict[str, Any]],
                 extras: Optional[Callable[[], Dict[str, np.ndarray]]]) -> CacheEntry:
        """Compute the entry ``job`` describes (resuming an interrupted run) and write it."""
        record_path, record = job.own_record(job.setup())
        seconds = job.compute_chunks(record_path, record, progress, desc)
        crcs = record["crc32"]
        if job.ranks.world > 1:
            _barrier(job.ranks)  # every rank has finished its chunks
            if job.ranks.rank != 0:
                return job.wait_for_rank0()
            crcs = job.all_chunk_crcs()
        return job.finish(crcs, labels, meta, extras, seconds)


def _barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier(group=ranks.group)


class _Extraction:
    """One computation of an entry in folder ``d``: ``features.partial`` is filled chunk by chunk,
    each finished chunk's CRC-32 recorded in a progress file, and the manifest is written last.
    Chunk ``c`` is computed by rank ``c % ranks.world``."""

    def __init__(self, cache: FeatureCache, d: str, key: str, parts: Dict[str, Any], n: int,
                 compute: Any, dtype: str, batch_size: int, ranks: Ranks) -> None:
        self.cache, self.d, self.key, self.parts, self.n = cache, d, key, parts, n
        self.compute, self.dtype, self.batch_size, self.ranks = compute, dtype, batch_size, ranks
        self.np_dtype = np.dtype(_DTYPES[dtype])
        # A multiple of the batch size, so batches never straddle chunks and a resumed run
        # computes exactly the batches of an uninterrupted one.
        self.rows = max(batch_size, (cache.chunk_size // batch_size) * batch_size)
        self.n_chunks = (n + self.rows - 1) // self.rows
        self.setup_path = os.path.join(d, "progress.json")
        self.fpath = os.path.join(d, "features.partial")
        self.row_shape: Tuple[int, ...] = ()
        self.first: Optional[np.ndarray] = None  # the first batch, computed to learn the shape

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.n,) + self.row_shape

    def mine(self) -> List[int]:
        """This rank's chunks."""
        return [ci for ci in range(self.n_chunks) if ci % self.ranks.world == self.ranks.rank]

    def _nbytes(self, row_shape: Tuple[int, ...]) -> int:
        return int(np.prod((self.n,) + row_shape)) * self.np_dtype.itemsize

    # ------------------------------------------------------------------ setup
    def setup(self) -> Dict[str, Any]:
        """progress.json's state, which every rank starts from: rank 0 resumes an interrupted run
        of this entry or starts a new ``features.partial``; the other ranks read what it wrote."""
        if self.ranks.rank == 0:
            state = self._resumable_state()
            if state is None:
                state = self._start_afresh()
        _barrier(self.ranks)  # rank 0 has prepared the file and progress.json
        if self.ranks.rank != 0:
            state = self._read_setup()
        self.row_shape = tuple(int(s) for s in state["row_shape"])
        return state

    def _resumable_state(self) -> Optional[Dict[str, Any]]:
        """progress.json of an interrupted run, when it and ``features.partial`` fit this entry."""
        if not (os.path.exists(self.setup_path) and os.path.exists(self.fpath)):
            return None
        try:
            with open(self.setup_path) as f:
                state = json.load(f)
            nbytes = self._nbytes(tuple(int(s) for s in state["row_shape"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if state.get("key") != self.key or state.get("chunk_rows") != self.rows \
                or os.path.getsize(self.fpath) != nbytes:
            return None
        return state

    def _start_afresh(self) -> Dict[str, Any]:
        self.first = np.asarray(self.compute(0, min(self.batch_size, self.n)))
        row_shape = tuple(int(s) for s in self.first.shape[1:])
        self._allocate(self._nbytes(row_shape))
        state = {"key": self.key, "chunk_rows": self.rows, "row_shape": list(row_shape),
                 "crc32": {}}
        _atomic_write_json(self.setup_path, state)
        return state

    def _allocate(self, nbytes: int) -> None:
        """A new ``features.partial`` of ``nbytes``, reserved up front so a full disk fails now."""
        d, fpath = self.d, self.fpath
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

    def _read_setup(self) -> Dict[str, Any]:
        try:
            with open(self.setup_path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise CacheError(
                f"rank {self.ranks.rank} cannot see the cache entry rank 0 prepared in {self.d}: "
                "the cache folder must be on a file system every rank shares (NFS, Lustre, ...); "
                "pass such a cache_dir on every rank") from None

    def own_record(self, state: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """This rank's progress file and record, whose ``"crc32"`` holds the CRCs of its chunks
        recorded as finished (by any earlier run, with any number of ranks)."""
        crcs = self.cache._recorded_crcs(self.d, self.key, state)
        if self.ranks.world > 1:  # this rank's own record; progress.json stays rank 0's setup
            mine = self.mine()
            path = os.path.join(self.d, f"progress.rank{self.ranks.rank}.json")
            return path, {"key": self.key, "chunk_rows": self.rows,
                          "row_shape": list(self.row_shape),
                          "crc32": {c: v for c, v in crcs.items() if int(c) in mine}}
        state["crc32"] = crcs
        return self.setup_path, state

    # ------------------------------------------------------------------ computing
    def compute_chunks(self, record_path: str, record: Dict[str, Any], progress: bool,
                       desc: str) -> float:
        """Compute this rank's unfinished chunks into ``features.partial``, recording each in
        ``record``; the seconds it took."""
        from tqdm.auto import tqdm

        n, rows, crcs = self.n, self.rows, record["crc32"]
        mm = np.memmap(self.fpath, dtype=self.np_dtype, mode="r+", shape=self.shape)
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
            for ci in self.mine():
                if ci in done:
                    continue
                lo, hi = ci * rows, min((ci + 1) * rows, n)
                for b in range(lo, hi, self.batch_size):
                    e = min(b + self.batch_size, hi)
                    mm[b:e] = _to_storage(self._batch(b, e), self.dtype)
                    bar.update(e - b)
                mm.flush()
                crcs[str(ci)] = _crc(mm[lo:hi])
                _atomic_write_json(record_path, record)
        finally:
            bar.close()
            del mm
        return time.perf_counter() - t0

    def _batch(self, b: int, e: int) -> np.ndarray:
        """The activations of rows ``b:e``, checked for their shape and for NaN."""
        if b == 0 and self.first is not None:
            out, self.first = self.first, None
        else:
            out = np.asarray(self.compute(b, e))
        if out.shape != (e - b,) + self.row_shape:
            raise ValueError(
                f"items {b}..{e - 1} gave activations of shape {out.shape[1:]}; "
                f"earlier items gave {self.row_shape}: every item must have the same shape")
        if not np.isfinite(out).all():
            bad = int(np.argwhere(~np.isfinite(out.reshape(len(out), -1)))[0][0]) + b
            raise ValueError(f"the frozen layers gave NaN or infinite activations "
                             f"for item {bad}")
        return out

    # ------------------------------------------------------------------ finishing
    def wait_for_rank0(self) -> CacheEntry:
        """Ranks other than 0, once their chunks are done: the entry rank 0 writes."""
        _barrier(self.ranks)  # rank 0 writes the manifest
        entry = self.cache.load(self.key)
        if entry is None:
            raise CacheError(f"rank 0 did not complete the cache entry in {self.d}")
        entry.reused = False
        return entry

    def all_chunk_crcs(self) -> Dict[str, int]:
        """Rank 0, once every rank is done: the CRC of every chunk, from every progress file."""
        with open(self.setup_path) as f:
            crcs = self.cache._recorded_crcs(self.d, self.key, json.load(f))
        missing = [i for i in range(self.n_chunks) if str(i) not in crcs]
        if missing:
            _barrier(self.ranks)  # lets the other ranks find that there is no entry
            world = self.ranks.world
            raise CacheError(f"chunks {missing[:5]} of {self.d} were not computed by rank(s) "
                             f"{sorted({i % world for i in missing})}")
        return crcs

    def finish(self, crcs: Dict[str, int], labels: Optional[np.ndarray],
               meta: Optional[Dict[str, Any]],
               extras: Optional[Callable[[], Dict[str, np.ndarray]]],
               seconds: float) -> CacheEntry:
        """Write labels, side arrays and (last, by rename) the manifest; the complete entry."""
        d = self.d
        if labels is not None:
            lab = np.asarray(labels)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=d)
            os.close(fd)
            np.save(tmp, lab)
            os.replace(tmp, os.path.join(d, "labels.npy"))
        man = {
            "key": self.key, "format": FORMAT_VERSION, "shape": list(self.shape),
            "dtype": self.dtype, "chunk_rows": self.rows,
            "chunk_crc32": [crcs[str(i)] for i in range(self.n_chunks)],
            "parts": self.parts, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "extract_seconds": seconds, "meta": dict(meta or {}),
        }
        if extras is not None:
            man["extras"] = self.cache._write_extras(d, extras(), self.n, self.rows)
        os.replace(self.fpath, os.path.join(d, "features.bin"))
        _atomic_write_json(os.path.join(d, "manifest.json"), man)
        for f in os.listdir(d):
            if f == "progress.json" or (f.startswith("progress.rank") and f.endswith(".json")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, f))
        _barrier(self.ranks)
        entry = self.cache.load(self.key)
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


def __getattr__(name: str) -> Any:
    # extract_features lived here before pyft.features; the README showed this import.
    if name == "extract_features":
        from pyft.features import extract_features

        return extract_features
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
