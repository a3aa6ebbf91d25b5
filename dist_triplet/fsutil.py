"""Atomic file writes: the one helper for "write to a temp file, fsync, rename".

A reader (another process, or the next run after a crash) sees either the old file or the
complete new one, never a half-written one: ``os.replace`` within one directory is atomic
on POSIX, and the data are fsynced before the rename so a power cut cannot leave a
complete-looking empty file. Used by config.yaml, metrics.json, checkpoints (directories),
model exports, the embed CLI's outputs, search indexes and the run report (atomic_dir).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator, List, Optional, Sequence


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


def strict_json(doc):
    """``doc`` with every non-finite float (NaN, inf: an undefined metric) as None, so that
    ``json.dumps(..., allow_nan=False)`` passes and strict parsers read ``null``."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: strict_json(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [strict_json(v) for v in doc]
    return doc


def write_json(path: str, doc) -> None:
    """``doc`` as strict JSON (:func:`strict_json`, indent 1) to ``path`` atomically."""
    text = json.dumps(strict_json(doc), indent=1, allow_nan=False)
    with atomic_write(path) as fh:
        fh.write(text)


@contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Build a directory under a temp name and rename it to ``path`` when the block ends.

    Yields the temp directory ``<dir>/.<name>.tmp-<pid>`` (created empty; its parent must
    exist). On a clean exit its files and entries are fsynced, an earlier ``path`` (if
    any) is renamed aside, the temp directory renamed to ``path``, the parent fsynced,
    and the earlier one removed. On an exception the temp directory is removed and any
    earlier ``path`` is left as it was. Used by the search index and the run report.
    """
    import shutil
    if not path.strip():    # abspath('') is the current directory: never replace it
        raise ValueError("atomic_dir: empty path")
    path = os.path.abspath(path)
    tmp = temp_name(path)
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


_made: List[str] = []      # directories check_can_write made, outermost first


@contextmanager
def undo_made_dirs() -> Iterator[None]:
    """When the block raises, remove the directories :func:`check_can_write` made in it
    (those still empty): a failed command leaves nothing behind."""
    start = len(_made)
    try:
        yield
    except BaseException:
        for d in reversed(_made[start:]):
            try:
                os.rmdir(d)
            except OSError:     # not empty (something else wrote there), or gone
                pass
        raise
    finally:
        del _made[start:]


def check_can_write(path: str, what: str) -> None:
    """Prove, before any work, that ``path`` (a file or directory to be written atomically
    beside itself) can be written: its parent directory is made if missing and a temporary
    file is created and removed there.

    The directories it makes are undone by :func:`undo_made_dirs` around a failed command.

    Raises:
        ValueError: ``f"{what} {path}: cannot write there: <reason>"`` (a parent that is a
            file, a read-only file system, no permission, /proc ...).
    """
    parent = os.path.dirname(os.path.abspath(path))
    missing, d = [], parent
    while not os.path.exists(d) and d != os.path.dirname(d):
        missing.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
        _made.extend(reversed(missing))           # outermost first (undo_made_dirs)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {path}: cannot write there: a part of its directory "
                         "is a file, not a directory") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot write there: "
                         f"{exc.strerror or exc}") from None


def check_not_read(path: Optional[str], what: str, *dirs: str, files: Sequence[str] = ()) -> None:
    """The other output rule of every retrieval command, --force or not: ValueError if
    ``path`` (symlinks resolved) lies in one of ``dirs`` (the index or model directory it
    reads), is one of the ``files`` it reads, or lies under one of them that ends in
    ``os.sep`` (a data directory: an image folder, an IDX directory). ``path`` None:
    nothing to check. A ``path`` that does not exist yet is compared with the directories
    only (it replaces no file), so a CSV's 60,000 images cost no realpath each."""
    real = path and os.path.realpath(path)
    exists = bool(path) and os.path.exists(path)
    for d in dirs if path else ():
        if os.path.dirname(real) == os.path.realpath(d):
            raise ValueError(f"{what} {path} is in {d}, which this command reads: write "
                             "elsewhere")
    for f in filter(None, files if path else ()):
        if not (exists or f.endswith(os.sep)):
            continue
        r = os.path.realpath(f)
        if real == r or f.endswith(os.sep) and os.path.commonpath([real, r]) == r:
            raise ValueError(f"{what} {path} is {'' if real == r else 'in '}{f}, which this "
                             "command reads: write elsewhere")


def check_out(out: Optional[str], force: bool, what: str = "--out", file: bool = True) -> None:
    """The output rule of every retrieval command, before any work: refuse a directory as
    a ``file``, an existing ``out`` without ``force``; make missing parent directories and
    prove they can be written. ValueError (one line naming ``what`` and ``out``). ``out``
    None (an option not given): nothing to check."""
    if out is None:
        return
    if not out.strip():     # an unset shell variable: '' would be the current directory
        raise ValueError(f"{what} is empty: name the output")
    if file and os.path.isdir(out):
        raise ValueError(f"{what} {out} is a directory: pass a file name")
    if os.path.exists(out) and not force:
        raise ValueError(f"{what} {out} already exists; pass --force to replace it")
    check_can_write(out, what)
