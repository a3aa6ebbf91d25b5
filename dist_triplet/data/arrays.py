"""Bare array files, the queries and labels of ``embed`` / ``search`` / ``index`` given as a
file: a NumPy ``.npy`` or an IDX file (:mod:`.idx`), told apart by content (the ``.npy``
magic string, NumPy's "format.rst"), not by name.
"""
from __future__ import annotations

import os

import numpy as np

from .idx import read_idx

__all__ = ["read_array", "read_labels"]

_NPY = b"\x93NUMPY"


def read_array(path: str, what: str = "input file") -> tuple:
    """``(array, "npy" | "idx")`` of ``path``; no pickled objects.

    Raises:
        FileNotFoundError: ``path`` does not exist (``what`` names it).
        ValueError: naming ``path``: a directory, a ``.npy`` NumPy cannot load without
            pickle, an invalid IDX file (:func:`.idx.read_idx`).
    """
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a file: pass an IDX file or a "
                         ".npy array")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as fh:
        if fh.read(len(_NPY)) != _NPY:
            return read_idx(path), "idx"
    try:
        return np.load(path, allow_pickle=False), "npy"
    except ValueError as exc:
        raise ValueError(f"{path}: not a numeric .npy array: {exc}") from None


def read_labels(path: str, n: int) -> np.ndarray:
    """(n,) int64 class labels from an IDX labels file or an integer ``.npy``.

    Raises:
        FileNotFoundError / ValueError naming ``path``: missing, unreadable, not (N,)
        non-negative integers, or N != ``n`` (the images they label).
    """
    lab, _ = read_array(path, "labels file")
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 0):
        raise ValueError(f"{path}: expected (N,) non-negative integer labels, found shape "
                         f"{lab.shape} dtype {lab.dtype}")
    if lab.shape[0] != n:
        raise ValueError(f"{path}: holds {lab.shape[0]} labels for {n} images")
    return lab.astype(np.int64)
