"""One copy of the data per host: a memory-mapped ``.npy`` cache, written once, atomically.

With ``data.cache_dir`` set, the first process of a host to get there decodes the source
(gzip, PNG/JPEG, a compressed .npz, a train/test split) into uncompressed ``.npy`` files
and every process of the host then maps them read-only (``np.load(mmap_mode='r')``). The
pages live once in the kernel's page cache, shared by all local ranks, however many
there are; the training step reads rows from them without a copy (``mx.nd.from_numpy``
zero-copy on cpu(0)). Without a cache each process holds its own copy, uint8.

Writing: under an exclusive ``flock`` on the cache directory (released by the kernel if
the writer dies, so nobody waits forever on a crashed writer), into
``.<entry>.tmp-<pid>`` (``fsutil.temp_name``), files fsynced, then ``os.rename`` to
``<entry>``: a reader sees a
complete entry or none. Others block on the lock meanwhile, then find the entry. A bad
source fails in the writer with the reader's message and leaves no entry; every other
process then tries and fails with the same message.

The entry's name is keyed by the source's identity: format, the path, every source
file's size and modification time (ns), and the settings that change the arrays
(mode, image size, split protocol, fraction and seed). Change a file and a new entry is
made; old entries are not deleted (remove the directory to reclaim space).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from typing import Tuple

import numpy as np

from ..fsutil import fsync_dir, fsync_tree, temp_name
from .source import Source, materialize
from .split import Split

__all__ = ["cache_key", "entry_path", "load_cached"]

_VERSION = 2        # 2: images turned upright by their EXIF Orientation
_META = "meta.json"


def cache_key(source: Source, settings: dict) -> str:
    """sha256 hex of the source's identity and the array-changing settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _VERSION, "format": source.fmt,
                         "where": os.path.abspath(source.where), "settings": settings},
                        sort_keys=True).encode())
    for f in source.files:
        st = os.stat(f)
        h.update(f"\0{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entry_path(cache_dir: str, source: Source, settings: dict) -> str:
    stem = os.path.basename(os.path.normpath(source.where)) or "data"
    return os.path.join(cache_dir, f"{source.fmt.split()[0]}-{stem}-"
                                   f"{cache_key(source, settings)[:16]}")


def _open_entry(entry: str) -> Tuple[Split, Split]:
    """The entry's splits; ValueError naming the entry to delete when a file of it is
    damaged (truncated, edited)."""
    try:
        with open(os.path.join(entry, _META)) as fh:
            meta = json.load(fh)
        shape = tuple(meta["image_shape"]) if meta["image_shape"] is not None else None
        return tuple(Split(images=np.load(os.path.join(entry, f"{s}_x.npy"), mmap_mode="r"),
                           labels=np.load(os.path.join(entry, f"{s}_y.npy")),
                           class_names=tuple(meta["class_names"]),
                           source=f"{meta['source'][s]} (cached in {entry})",
                           image_shape=shape)
                     for s in ("train", "test"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"data.cache_dir entry {entry} is damaged ({exc}); delete that "
                         "directory and it is written again") from None


def load_cached(source: Source, cache_dir: str, protocol: str, test_fraction: float,
                seed: int, settings: dict) -> Tuple[Split, Split]:
    """(train, test) Splits whose images are read-only memory maps of the cache entry
    for ``source``, written first if missing (see the module docstring). Every process
    of a host may call it at once; one writes, the others wait and map.

    Raises:
        ValueError / FileNotFoundError: the source is bad (the reader's message); nothing
            is left in the cache.
        OSError: ``cache_dir`` cannot be created or written (message names it).
    """
    created = not os.path.isdir(cache_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"data.cache_dir={cache_dir!r} cannot be created: {exc}") from None
    try:
        return _load_or_write(source, cache_dir, protocol, test_fraction, seed, settings)
    except BaseException:
        if created:  # a failed read leaves no trace: not even the directory it made
            try:
                os.rmdir(cache_dir)
            except OSError:     # another process wrote an entry there meanwhile
                pass
        raise


def _load_or_write(source, cache_dir, protocol, test_fraction, seed, settings):
    entry = entry_path(cache_dir, source, settings)
    if os.path.isfile(os.path.join(entry, _META)):
        return _open_entry(entry)
    lock = os.open(cache_dir, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or by the kernel if we die
        if os.path.isfile(os.path.join(entry, _META)):
            return _open_entry(entry)
        tmp = temp_name(entry)  # <cache_dir>/.<entry>.tmp-<pid>
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        try:
            def alloc(name, shape, dtype):
                return np.lib.format.open_memmap(os.path.join(tmp, f"{name}_x.npy"),
                                                 mode="w+", dtype=dtype, shape=shape)
            train, test = materialize(source, protocol, test_fraction, seed, alloc)
            meta = {"image_shape": train.image_shape, "class_names": list(train.class_names),
                    "source": {"train": train.source, "test": test.source},
                    "format": source.fmt, "settings": settings}
            for name, split in (("train", train), ("test", test)):
                split.images.flush()
                np.save(os.path.join(tmp, f"{name}_y.npy"), split.labels)
            del train, test
            with open(os.path.join(tmp, _META), "w") as fh:
                json.dump(meta, fh, indent=1)
            fsync_tree(tmp)
            os.rename(tmp, entry)
            fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _open_entry(entry)
    finally:
        os.close(lock)
