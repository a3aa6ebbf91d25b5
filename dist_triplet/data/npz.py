"""NumPy ``.npz`` data: ``x`` features or images, ``y`` integer labels, optional ``classes``.

* ``x`` (N, D) float (any float dtype; used as they are, as float32), or
  ``x`` (N, H, W) / (N, H, W, C) uint8 images (C = 1 or 3; scaled to [0, 1] in the step).
* ``y`` (N,) integer labels (any integers; without ``classes`` they are renumbered
  0..C-1 in sorted order and named ``str(value)``).
* ``classes`` (optional) (C,) strings: the name of each label; every ``y`` must then lie
  in [0, C).

A path is one ``.npz`` (split by ``data.split``) or a directory holding ``train.npz`` and
optionally ``test.npz``. ``x`` is streamed from the archive in chunks (``np.savez`` and
``np.savez_compressed`` both work), so reading never holds more than the data once.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Optional

import numpy as np

from .source import CHUNK_BYTES, Part, Source, scatter_rows

__all__ = ["npz_source", "NPZ_TRAIN", "NPZ_TEST"]

NPZ_TRAIN, NPZ_TEST = "train.npz", "test.npz"


def _keys(zf: zipfile.ZipFile) -> list:
    return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))


def _header(zf: zipfile.ZipFile, key: str, path: str):
    """(shape, fortran_order, dtype) of member ``key`` without reading its data."""
    try:
        with zf.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(fh)
            return np.lib.format.read_array_header_2_0(fh)
    except (ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # BadZipFile: CRC
        raise ValueError(f"{path}: key {key!r} is not a valid .npy array: {exc}") from None


def _load_member(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except ValueError as exc:  # object arrays need pickle: refuse them, say which key
        raise ValueError(f"{path}: key {key!r} could not be read without pickle "
                         f"(object array?): {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: key {key!r} is corrupt: {exc}") from None


def _fill(path: str, shape: tuple, fortran: bool, dtype: np.dtype, features: bool):
    n = shape[0]
    width = int(np.prod(shape[1:]))

    def convert(chunk: np.ndarray, start: int) -> np.ndarray:
        if not features:
            return chunk
        out = chunk.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            r = int(np.flatnonzero(bad.any(axis=1))[0]) + start
            raise ValueError(f"{path}: key 'x' row {r} holds a non-finite value (NaN, inf, "
                             "or beyond float32's range); features must be finite")
        return out

    def fill(targets) -> None:
        cursors = [0] * len(targets)
        if fortran or width == 0:
            x = _load_member(path, "x").reshape(n, -1)
            scatter_rows(convert(x, 0), 0, targets, cursors)
            return
        row_bytes = width * dtype.itemsize
        per_chunk = max(1, CHUNK_BYTES // row_bytes)
        with zipfile.ZipFile(path) as zf, zf.open("x.npy") as fh:
            version = np.lib.format.read_magic(fh)
            (np.lib.format.read_array_header_1_0 if version == (1, 0)
             else np.lib.format.read_array_header_2_0)(fh)
            for start in range(0, n, per_chunk):
                want = min(per_chunk, n - start) * row_bytes
                try:
                    buf = fh.read(want)
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                    raise ValueError(f"{path}: key 'x' is corrupt: {exc}") from None
                if len(buf) != want:
                    raise ValueError(f"{path}: key 'x' is truncated: expected "
                                     f"{n * row_bytes} bytes for shape {shape}, found "
                                     f"{start * row_bytes + len(buf)}")
                chunk = np.frombuffer(buf, dtype).reshape(-1, width)
                scatter_rows(convert(chunk, start), start, targets, cursors)
    return fill


def _open_part(path: str):
    """Check one .npz; returns (x shape, fortran, dtype, features?, raw y, classes|None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path}: not a NumPy .npz archive (a zip of .npy files): {exc}") \
            from None
    with zf:
        keys = _keys(zf)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(map(repr, missing))}; it has "
                             f"keys: {', '.join(map(repr, keys)) or 'none'}; expected 'x' "
                             "(data), 'y' (labels) and optionally 'classes'")
        shape, fortran, dtype = _header(zf, "x", path)
        y_shape, _, y_dtype = _header(zf, "y", path)
    if dtype.kind == "f" and len(shape) == 2:
        features = True
    elif dtype == np.uint8 and (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        features = False
    else:
        raise ValueError(
            f"{path}: key 'x' has shape {shape} dtype {dtype}; expected (N, D) float "
            "features, or (N, H, W) / (N, H, W, C) uint8 images with C = 1 or 3")
    if any(d == 0 for d in shape[1:]):
        raise ValueError(f"{path}: key 'x' has shape {shape}: rows of 0 values")
    if shape[0] == 0:
        raise ValueError(f"{path}: key 'x' holds 0 rows; expected at least 1")
    if y_dtype.kind not in "iu":
        raise ValueError(f"{path}: key 'y' must hold integer labels, found dtype {y_dtype}"
                         + (" (cast class ids to int)" if y_dtype.kind == "f" else ""))
    if len(y_shape) != 1 or y_shape[0] != shape[0]:
        raise ValueError(f"{path}: key 'y' has shape {y_shape} but key 'x' has {shape[0]} "
                         f"rows; expected y of shape ({shape[0]},)")
    y = _load_member(path, "y")
    if y.dtype == np.uint64 and y.size and y.max() > np.uint64(np.iinfo(np.int64).max):
        raise ValueError(f"{path}: key 'y' holds labels up to {y.max()}, beyond int64")
    y = y.astype(np.int64)
    classes = None
    with zipfile.ZipFile(path) as zf:
        has_classes = "classes" in _keys(zf)
    if has_classes:
        raw = _load_member(path, "classes")
        if raw.ndim != 1 or raw.dtype.kind not in "USiu":
            raise ValueError(f"{path}: key 'classes' must be a 1-D array of names, found "
                             f"shape {raw.shape} dtype {raw.dtype}")
        try:                                        # bytes names: UTF-8, not "b'cat'"
            classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in raw.tolist())
        except UnicodeDecodeError:
            raise ValueError(f"{path}: key 'classes' holds names that are not UTF-8") from None
        if len(set(classes)) < len(classes):
            twice = next(c for i, c in enumerate(classes) if c in classes[:i])
            raise ValueError(f"{path}: key 'classes' names {twice!r} twice; each class id "
                             "needs its own name")
    return shape, fortran, dtype, features, y, classes


def npz_source(path: str) -> Source:
    """Open an ``.npz`` file, or a directory with ``train.npz`` (and optionally
    ``test.npz``); see the module docstring for the keys.

    Raises:
        FileNotFoundError: ``path`` or ``train.npz`` is missing.
        ValueError: not an .npz; ``x`` or ``y`` missing (the message lists the keys it
            has); ``x`` neither float features nor uint8 images; labels not integers or
            not as many as ``x``'s rows; a label outside ``classes``; train and test
            ``classes`` differ (each message names the file and key).
    """
    if os.path.isdir(path):
        files = [os.path.join(path, NPZ_TRAIN)]
        if not os.path.isfile(files[0]):
            raise FileNotFoundError(f"{path}: a .npz data directory must hold {NPZ_TRAIN} "
                                    f"(and optionally {NPZ_TEST}); found "
                                    f"{', '.join(sorted(os.listdir(path))) or 'nothing'}")
        if os.path.isfile(os.path.join(path, NPZ_TEST)):
            files.append(os.path.join(path, NPZ_TEST))
    else:
        files = [path]
    opened = [_open_part(f) for f in files]
    given = [o[5] for o in opened]
    if len(files) == 2 and (given[0] is None) != (given[1] is None) or (
            len(files) == 2 and given[0] != given[1]):
        raise ValueError(f"key 'classes' differs between {files[0]} and {files[1]}: give the "
                         "same names in both, or in neither")
    classes: Optional[tuple] = given[0]
    labels = [o[4] for o in opened]
    if classes is not None:
        for f, y in zip(files, labels):
            bad = (y < 0) | (y >= len(classes))
            if bad.any():
                raise ValueError(f"{f}: key 'y' holds label {int(y[bad][0])}, outside [0, "
                                 f"{len(classes)}) for the {len(classes)} names in 'classes'")
    else:  # renumber 0..C-1 over both files, so train and test share ids
        values = np.unique(np.concatenate(labels))
        labels = [np.searchsorted(values, y).astype(np.int64) for y in labels]
        classes = tuple(str(int(v)) for v in values)
    parts = {}
    names = ["train", "test"] if len(files) == 2 else ["all"]
    for name, f, (shape, fortran, dtype, features, _, _), y in zip(names, files, opened, labels):
        row_shape = (shape[1],) if features else (
            (shape[1], shape[2], 1) if len(shape) == 3 else tuple(shape[1:]))
        parts[name] = Part(labels=y, row_shape=tuple(int(v) for v in row_shape),
                           dtype=np.dtype(np.float32 if features else np.uint8),
                           fill=_fill(f, shape, fortran, dtype, features), where=f)
    features = [o[3] for o in opened]
    if len(set(features)) > 1:
        raise ValueError(f"{files[0]} holds {'features' if features[0] else 'images'} but "
                         f"{files[1]} holds {'features' if features[1] else 'images'}")
    return Source(fmt="npz", parts=parts, class_names=classes, image=not features[0],
                  files=files, where=path)
