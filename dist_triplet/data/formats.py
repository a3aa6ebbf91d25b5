"""Which reader opens the data a ``data`` config section names (``data.format``).

:func:`open_source` dispatches to the one reader of each format: ``idx`` (:mod:`.idx`),
``npz`` (:mod:`.npz`), ``folder`` and ``csv`` (:mod:`.images`); ``auto`` decides from the
path where that is unambiguous (:func:`detect_format`) and asks for ``data.format`` where
it is not. Named data sets (``data.dataset`` without ``data.path``) are IDX directories.
"""
from __future__ import annotations

import os

from .idx import idx_source, named_source
from .images import csv_source, folder_source
from .npz import NPZ_TRAIN, npz_source
from .source import Source

__all__ = ["FORMATS", "detect_format", "is_idx_dir", "open_source"]

FORMATS = ("auto", "idx", "npz", "folder", "csv")

_IDX_IMAGES = "train-images-idx3-ubyte"


def is_idx_dir(path: str) -> bool:
    """True when directory ``path`` holds ``train-images-idx3-ubyte[.gz]``."""
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
    if is_idx_dir(path):
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
        # A ValueError subclass (UnicodeDecodeError) takes other arguments: a ValueError.
        raise (FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError)(
            prefix + msg) from None
