"""What every format reader returns, and how its rows become :class:`Split` arrays.

A reader (``idx``, ``npz``, ``folder``, ``csv``) checks what it can cheaply (headers,
labels, shapes, class folders) and returns a :class:`Source`: labels in memory, pixels
not yet read. :func:`materialize` then decides the split from the labels alone and
makes **one pass** over the pixels, writing each row straight into its split's array:
in memory, or a memory-mapped ``.npy`` in the cache's temporary directory. Peak memory
is therefore the data once (plus a chunk of ~64 MiB), never the data plus a float32 copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .split import Split, class_split, stratified_split, width_mismatch

__all__ = ["Part", "Source", "materialize", "read_part", "scatter_rows", "CHUNK_BYTES"]

# Rows are read and written in chunks of about this many bytes.
CHUNK_BYTES = 64 * 2**20

# A fill target: (out, rows): write the part's rows ``rows`` (ascending int64) into
# ``out`` (len(rows), F), in order.
Target = Tuple[np.ndarray, np.ndarray]


@dataclass
class Part:
    """One stored split of a source (its train part, test part, or all of it).

    labels: (n,) int64 class ids into the source's class_names.
    row_shape: (H, W, C) for images, (D,) for features.
    dtype: uint8 (images) or float32 (features): the dtype of the filled arrays.
    fill: ``fill(targets)`` reads the rows once and writes each target; raises ValueError
        naming the file on bad or truncated content.
    where: the file or directory, named in messages.
    files: the image file of each row (image folders, CSV), else None.
    """

    labels: np.ndarray
    row_shape: Tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[List[Target]], None]
    where: str
    files: Optional[List[str]] = None

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def width(self) -> int:
        return int(np.prod(self.row_shape))


@dataclass
class Source:
    """A data set opened by a reader; pixels not read yet.

    parts: ``{"train": Part, "test": Part}`` when the data bring a test split, else
        ``{"all": Part}`` (split by ``data.split``).
    class_names: names of the class ids, shared by all parts.
    image: True for images (uint8 rows with ``row_shape`` (H, W, C)).
    files: the source files (their paths, sizes and times key the cache).
    fmt: the format name, for messages and the cache key.
    where: the path the user gave.
    """

    fmt: str
    parts: Dict[str, Part]
    class_names: Tuple[str, ...]
    image: bool
    files: List[str]
    where: str
    settings: dict = field(default_factory=dict)


def scatter_rows(chunk: np.ndarray, start: int, targets: Sequence[Target],
                 cursors: List[int]) -> None:
    """Write the rows of ``chunk`` (source rows ``start .. start + len(chunk)``) that
    belong to each target into it; ``cursors[i]`` counts rows already written to target i
    (targets' rows ascending, so each chunk continues where the last one stopped)."""
    stop = start + len(chunk)
    for i, (out, rows) in enumerate(targets):
        c = cursors[i]
        end = c + int(np.searchsorted(rows[c:], stop))
        if end > c:
            out[c:end] = chunk[rows[c:end] - start]
            cursors[i] = end


def read_part(part: Part, class_names, image: bool) -> Split:
    """All rows of one part, read in one pass into process memory, as a :class:`Split`
    (``image``: uint8 rows with ``image_shape`` = the part's row shape; else features).

    Raises:
        ValueError: bad content found while reading (the reader names the file).
    """
    out = np.empty((part.n, part.width), part.dtype)
    part.fill([(out, np.arange(part.n, dtype=np.int64))])
    return Split(images=out, labels=part.labels, class_names=tuple(class_names),
                 source=part.where,
                 image_shape=tuple(int(v) for v in part.row_shape) if image else None)


def check_parts(source: Source) -> None:
    """Raise ValueError when a source's train and test parts differ in row shape."""
    if "all" in source.parts:
        return
    train, test = source.parts["train"], source.parts["test"]
    if train.row_shape != test.row_shape:
        shape = (lambda p: p.row_shape) if source.image else (lambda p: None)
        raise ValueError(f"{source.fmt}: " + width_mismatch(
            shape(train), train.width, train.where, shape(test), test.width, test.where))


def plan(source: Source, protocol: str, test_fraction: float,
         seed: int) -> Dict[str, List[Tuple[str, np.ndarray]]]:
    """Which rows of which part go to which split: ``{part: [(split, rows), ...]}``."""
    if "all" not in source.parts:
        return {name: [(name, np.arange(p.n, dtype=np.int64))]
                for name, p in source.parts.items()}
    part = source.parts["all"]
    if protocol == "classes":
        train, test = class_split(part.labels, test_fraction, source.class_names, part.where)
    else:
        train, test = stratified_split(part.labels, test_fraction, seed, source.class_names,
                                       part.where)
    return {"all": [("train", train), ("test", test)]}


def materialize(source: Source, protocol: str, test_fraction: float, seed: int,
                alloc: Optional[Callable[[str, tuple, np.dtype], np.ndarray]] = None
                ) -> Tuple[Split, Split]:
    """Read the source's pixels once into the train and test arrays.

    Args:
        source: an opened source.
        protocol, test_fraction, seed: ``data.split``, ``data.test_fraction`` and
            ``data.split_seed``; used only when the source has no test split.
        alloc: ``alloc(name, shape, dtype)`` returns a writable array for split
            ``name`` (``"train"``/``"test"``); default ``np.empty`` (process memory).
            The cache passes one that makes memory-mapped ``.npy`` files.

    Returns:
        (train, test) Splits; images (N, F) uint8 or features (N, D) float32.

    Raises:
        ValueError: parts of different widths (before any pixel is read); split errors
            (:mod:`dist_triplet.data.split`); bad content found while reading (the reader
            names the file).
    """
    check_parts(source)
    alloc = alloc or (lambda name, shape, dtype: np.empty(shape, dtype))
    layout = plan(source, protocol, test_fraction, seed)
    arrays, labels, wheres = {}, {}, {}
    for part_name, assignments in layout.items():
        part = source.parts[part_name]
        targets = []
        for split_name, rows in assignments:
            out = alloc(split_name, (len(rows), part.width), part.dtype)
            arrays[split_name], labels[split_name] = out, part.labels[rows]
            wheres[split_name] = part.where if part_name != "all" else (
                f"{part.where} [{split_name}: {len(rows)} of {part.n} rows, data.split="
                f"{protocol}]")
            targets.append((out, rows))
        part.fill(targets)
    row_shape = next(iter(source.parts.values())).row_shape
    image_shape = tuple(int(v) for v in row_shape) if source.image else None
    return tuple(Split(images=arrays[s], labels=labels[s], class_names=source.class_names,
                       source=wheres[s], image_shape=image_shape)
                 for s in ("train", "test"))
