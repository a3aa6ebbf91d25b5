"""Atomic file writes: the one helper for "write to a temp file, fsync, rename".

A reader (another process, or the next run after a crash) sees either the old file or the
complete new one, never a half-written one: ``os.replace`` within one directory is atomic
on POSIX, and the data are fsynced before the rename so a power cut cannot leave a
complete-looking empty file. Used by config.yaml, metrics.json, checkpoints (directories),
model exports and the embed CLI's outputs.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import IO, Iterator


def temp_name(path: str) -> str:
    """``path``'s temporary sibling for this process: ``<dir>/.<name>.tmp-<pid>``."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}")


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush the files directly inside directory ``path``, then the directory itself."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path)


@contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on a clean exit fsync it and
    ``os.replace`` it onto ``path``; on an exception remove it and re-raise, leaving any
    earlier ``path`` untouched.

    Args:
        path: the final file; its directory must exist.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
    """
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, doc) -> None:
    """``json.dump(doc, indent=1)`` to ``path`` atomically."""
    with atomic_write(path) as fh:
        json.dump(doc, fh, indent=1)
