"""Data reading: named MNIST-format sets and your own data, as uint8 or float32 rows.

One entry point for training, :func:`load_data` (``data`` section of the config):

* ``data.dataset`` (``fashion_mnist``, ``mnist``, ``idx``) with ``data.root``: the named
  MNIST-format data sets, as before (:mod:`.idx`).
* ``data.path`` with ``data.format`` (``auto``, ``idx``, ``npz``, ``folder``, ``csv``):
  your own data (:mod:`.idx`, :mod:`.npz`, :mod:`.images`). ``auto`` decides from the
  path where that is unambiguous and asks for ``data.format`` where it is not.

Images stay uint8 (H, W, C) rows (scaled to [0, 1] in the training step on the device);
features stay float32. Without a test split the data are split by ``data.split``
(:mod:`.split`, whose docstring states the rules for 1-sample classes). With
``data.cache_dir`` the arrays are one memory-mapped copy per host (:mod:`.cache`).
docs/data.md is the user's guide.

Needs NumPy (and Pillow for image files); no MXNet.
"""
from __future__ import annotations

import os
from typing import Tuple

from .cache import load_cached
from .idx import (DATASET_NAMES, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, MNIST_CLASSES,
                  idx_source, load_dataset, load_split, named_source, read_idx, write_idx)
from .images import MODES, csv_source, folder_source
from .npz import NPZ_TRAIN, npz_source
from .source import Source, materialize
from .split import (SPLIT_PROTOCOLS, Split, anchor_rows, as_float, check_pair,
                    check_sampler_classes, check_test, check_training, class_split, describe,
                    stratified_split, subset)

__all__ = [
    "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "DATASET_NAMES", "FASHION_MNIST_ROOT", "FORMATS",
    "SPLIT_PROTOCOLS", "MODES", "Split", "read_idx", "write_idx", "load_split", "load_dataset",
    "subset", "as_float", "anchor_rows", "detect_format", "open_source", "load_data",
    "check_training", "check_test", "check_pair", "check_sampler_classes",
    "stratified_split", "class_split", "describe",
]

FORMATS = ("auto", "idx", "npz", "folder", "csv")

_IDX_IMAGES = "train-images-idx3-ubyte"


def _idx_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, _IDX_IMAGES + s)) for s in ("", ".gz"))


def detect_format(path: str) -> str:
    """The format of ``path`` (``data.format: auto``).

    A file: ``.npz`` (or a zip archive) -> npz, ``.csv`` -> csv. A directory: with
    ``train.npz`` -> npz; with ``train-images-idx3-ubyte[.gz]`` -> idx; with sub-folders
    -> folder. A directory matching more than one of these is ambiguous.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the format cannot be told, or is ambiguous (the message lists what
            matched and asks for ``data.format``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith(".npz"):
            return "npz"
        if lower.endswith(".csv"):
            return "csv"
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                return "npz"
        raise ValueError(f"data.path={path!r}: cannot tell its format from the name or content "
                         "(expected a .npz or .csv file, or a directory); set data.format to "
                         f"one of {', '.join(FORMATS[1:])}")
    found = []
    if os.path.isfile(os.path.join(path, NPZ_TRAIN)):
        found.append(f"npz ({NPZ_TRAIN})")
    if _idx_dir(path):
        found.append(f"idx ({_IDX_IMAGES})")
    if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path)):
        found.append("folder (sub-folders)")
    if len(found) == 1:
        return found[0].split()[0]
    if not found:
        raise ValueError(f"data.path={path!r}: directory holds neither {NPZ_TRAIN}, IDX files "
                         "nor class folders; set data.format or point data.path at the data")
    raise ValueError(f"data.path={path!r}: format is ambiguous, the directory matches "
                     f"{' and '.join(found)}; set data.format to one of them")


def open_source(cfg) -> Source:
    """Open the data the ``data`` config section names (``cfg``: a DataConfig or any
    object with its attributes); labels read, pixels not yet.

    Raises:
        FileNotFoundError / ValueError: from the format's reader, naming the format and
            the file, key or value.
    """
    if not cfg.path:
        return named_source(cfg.dataset, cfg.root)
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    if fmt not in FORMATS[1:]:
        raise ValueError(f"data.format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    if not os.path.exists(cfg.path):
        raise FileNotFoundError(f"data.path={cfg.path!r} does not exist")
    try:
        if fmt == "idx":
            if not os.path.isdir(cfg.path):
                raise ValueError("expected a directory of the four MNIST-format files")
            return idx_source(cfg.path)
        if fmt == "npz":
            return npz_source(cfg.path)
        if fmt == "folder":
            return folder_source(cfg.path, cfg.mode, cfg.image_size)
        return csv_source(cfg.path, cfg.mode, cfg.image_size)
    except (ValueError, FileNotFoundError) as exc:
        msg = str(exc)
        prefix = f"data.format={fmt}: " if not msg.startswith("data.") else ""
        if cfg.path not in msg:
            msg = f"{cfg.path}: {msg}"
        raise type(exc)(prefix + msg) from None


def _settings(cfg, source: Source) -> dict:
    settings = {}
    if source.image and source.fmt in ("folder", "csv"):
        settings.update(mode=cfg.mode, image_size=list(cfg.image_size or []))
    if "all" in source.parts:
        settings.update(split=cfg.split, test_fraction=cfg.test_fraction)
        if cfg.split == "fraction":
            settings["split_seed"] = cfg.split_seed
    return settings


def load_data(cfg) -> Tuple[Split, Split]:
    """Load, split and check the train and test splits the ``data`` config names.

    Steps: open the source (headers and labels), split it when it has no test split
    (``data.split``, ``data.test_fraction``, ``data.split_seed``), read the pixels once
    into process memory or the shared cache (``data.cache_dir``), apply
    ``data.limit_train`` / ``data.limit_test`` (views), then check the class rules of
    :mod:`.split` and that both splits have one width.

    Returns:
        (train, test) :class:`Split`: images (N, F) uint8 with ``image_shape`` (H, W, C),
        or features (N, D) float32 with ``image_shape`` None; labels (N,) int64.

    Raises:
        FileNotFoundError / ValueError: one line naming the format and the file, key or
            value; nothing is written (a cache entry is made only from good data).
    """
    source = open_source(cfg)
    settings = _settings(cfg, source)
    if cfg.cache_dir:
        train, test = load_cached(source, cfg.cache_dir, cfg.split, cfg.test_fraction,
                                  cfg.split_seed, settings)
    else:
        train, test = materialize(source, cfg.split, cfg.test_fraction, cfg.split_seed)
    train, test = subset(train, cfg.limit_train), subset(test, cfg.limit_test)
    check_pair(train, test)
    check_training(train)
    check_test(test, cfg.split)
    return train, test
