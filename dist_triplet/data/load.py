"""The configured data as train and test :class:`Split` arrays: open (:mod:`.formats`),
split when the data bring no test split (:mod:`.split`), read once into memory or the
shared cache (:mod:`.cache`), then limit (``data.limit_train`` / ``data.limit_test``: a
seeded sample, :func:`.split.subset`).

:func:`load_data` is training's entry (with the training class rules); :func:`load_rows`
reads one split, or all rows, for embedding (index, search, embed), without them.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from .cache import load_cached
from .formats import open_source
from .source import Source, check_parts, materialize, plan, read_part
from .split import Split, check_pair, check_test, check_training, limit_rows, subset

__all__ = ["load_data", "load_rows", "ROW_SPLITS"]


def _settings(cfg, source: Source) -> dict:
    settings = {}
    if source.image and source.fmt in ("folder", "csv"):
        settings.update(mode=cfg.mode, image_size=list(cfg.image_size or []))
    if "all" in source.parts:
        settings.update(split=cfg.split, test_fraction=cfg.test_fraction)
        if cfg.split == "fraction":
            settings["split_seed"] = cfg.split_seed
    return settings


def _read(cfg) -> Tuple[Source, Split, Split]:
    """Open, split, read (cache) and limit the data ``cfg`` names; no class rules."""
    source = open_source(cfg)
    settings = _settings(cfg, source)
    if cfg.cache_dir:
        train, test = load_cached(source, cfg.cache_dir, cfg.split, cfg.test_fraction,
                                  cfg.split_seed, settings)
    else:
        train, test = materialize(source, cfg.split, cfg.test_fraction, cfg.split_seed)
    return (source, subset(train, cfg.limit_train, cfg.split_seed),
            subset(test, cfg.limit_test, cfg.split_seed))


def load_data(cfg) -> Tuple[Split, Split]:
    """Load, split and check the train and test splits the ``data`` config names.

    Steps: open the source (headers and labels), split it when it has no test split
    (``data.split``, ``data.test_fraction``, ``data.split_seed``), read the pixels once
    into process memory or the shared cache (``data.cache_dir``), apply
    ``data.limit_train`` / ``data.limit_test`` (a sample seeded by ``data.split_seed``,
    in the data's order: :func:`.split.subset`), then check the class rules of
    :mod:`.split` and that both splits have one width.

    Returns:
        (train, test) :class:`Split`: images (N, F) uint8 with ``image_shape`` (H, W, C),
        or features (N, D) float32 with ``image_shape`` None; labels (N,) int64.

    Raises:
        FileNotFoundError / ValueError: one line naming the format and the file, key or
            value; nothing is written (a cache entry is made only from good data).
    """
    _, train, test = _read(cfg)
    check_pair(train, test)
    check_training(train)
    check_test(test, cfg.split)
    return train, test


ROW_SPLITS = ("train", "test", "all")


def _relative(files: List[str], root: str) -> List[str]:
    """Each path relative to ``root`` (a path outside it stays absolute)."""
    out = []
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), root)
        out.append(f if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel)
    return out


def load_rows(cfg, split: str) -> Tuple[Split, Optional[List[str]]]:
    """One split of the data the ``data`` config names, for embedding (index, search).

    ``split`` ``train`` / ``test``: the rows the trainer trains / evaluates on (same
    files, format, mode, image size, split protocol, seed and limits, cache if
    ``data.cache_dir``). ``all``: every row of the data in the source's order (a train
    part, then a test part), without the split and the limits. The training class rules
    are not applied: a gallery or a query set may hold 1-sample classes.

    Returns:
        (split, files): files are the image file of each row, relative to the data root
        (the folder, or the CSV's directory; a path outside it stays absolute) for
        image folders and CSV, else None.

    Raises:
        FileNotFoundError / ValueError: as :func:`load_data`; ``split`` not one of
            ``ROW_SPLITS``.
    """
    if split not in ROW_SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(ROW_SPLITS)}")
    if split == "all":
        source = open_source(cfg)
        check_parts(source)
        image = source.image
        parts = [read_part(p, source.class_names, image) for p in source.parts.values()]
        rows = Split(images=np.concatenate([p.images for p in parts]),
                     labels=np.concatenate([p.labels for p in parts]),
                     class_names=source.class_names, source=f"{source.where} [all rows]",
                     image_shape=parts[0].image_shape)
        files = [p.files for p in source.parts.values()]
        got = None if any(f is None for f in files) else [f for fs in files for f in fs]
    else:
        source, train, test = _read(cfg)
        rows = train if split == "train" else test
        got = None
        parts = source.parts
        if all(p.files is not None for p in parts.values()):
            if "all" in parts:
                layout = dict(plan(source, cfg.split, cfg.test_fraction, cfg.split_seed)["all"])
                got = [parts["all"].files[r] for r in layout[split]]
                labels = parts["all"].labels[layout[split]]
            else:
                got, labels = list(parts[split].files), parts[split].labels
            limit = cfg.limit_train if split == "train" else cfg.limit_test
            keep = limit_rows(labels, limit, cfg.split_seed)  # as _read's subset
            got = got if keep is None else [got[r] for r in keep]
    if got is not None:
        root = source.where if os.path.isdir(source.where) else os.path.dirname(
            os.path.abspath(source.where))
        got = _relative(got, os.path.abspath(root))
    return rows, got
