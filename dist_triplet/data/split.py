"""The :class:`Split` record, train/test splitting and the rules a split must obey.

Rules for classes (explicit, tested in tests/test_data_split.py):

* **Training**: every class needs at least 2 samples (an anchor needs a distinct
  positive of its class) and there must be at least 2 classes (a negative comes from
  another class). A class with 1 sample is never an anchor.
* **Test**, ``data.split: fraction`` (or a test split the data brings): every test class
  needs at least 2 samples too, because the test triplets and every retrieval query need a
  positive. A stratified split never makes a 1-sample test class (it puts 0 or >= 2 of a
  class's samples in the test set, and leaves >= 2 in training).
* **Test**, ``data.split: classes`` (test classes never seen in training: the CUB-200,
  Cars196 and Stanford Online Products protocol, Oh Song et al. 2016): a class with 1
  sample goes to the test side, where it is a **query** and a gallery item. It has no
  positive, so retrieval metrics leave it out of their denominators
  (``metrics.retrieval_metrics``' ``excluded_queries``, as pytorch-metric-learning's
  AccuracyCalculator drops "lone" queries) and it anchors no test triplet
  (:func:`anchor_rows`); it stays in the gallery as a distractor.

Pure NumPy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

__all__ = ["Split", "subset", "as_float", "stratified_split", "class_split", "anchor_rows",
           "check_training", "check_test", "check_pair", "check_sampler_classes",
           "SPLIT_PROTOCOLS"]

SPLIT_PROTOCOLS = ("fraction", "classes")

# Stream tag of the split's random stream, so data.split_seed never collides with a
# sampler stream of the same integer seed (triplets.py uses other tags).
_SPLIT_STREAM = 0x53504C54  # "SPLT"


@dataclass(frozen=True)
class Split:
    """One split (train or test) of a labelled data set.

    Attributes:
        images: (N, F) rows. For image data, **uint8** pixels, each row an image stored
            row-major as (H, W, C) (``image_shape``), F = H*W*C; scaled to [0, 1]
            (bytes / 255, the seed article's ``transform``) only where they are used: in
            the training step on the device, in :func:`as_float` elsewhere. For feature
            data, float32 features used as they are. May be a read-only ``np.memmap``
            (the shared cache, :mod:`dist_triplet.data.cache`).
        labels: (N,) int64 class ids in ``[0, len(class_names))``.
        class_names: name of each class id, in id order (shared by train and test).
        source: the file or directory the rows came from, for messages.
        image_shape: (H, W, C) of every row when the rows are images, None for
            features. The projector makes sprite thumbnails from it.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...]
    source: str
    image_shape: Optional[Tuple[int, int, int]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_image(self) -> bool:
        """True when the rows are images (uint8, ``image_shape`` set)."""
        return self.image_shape is not None

    @property
    def width(self) -> int:
        """F, the network's input width."""
        return int(self.images.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.labels.nbytes)


def as_float(rows: np.ndarray) -> np.ndarray:
    """Rows as the network sees them: (n, F) uint8 -> float32 ``v / 255`` (IEEE float32
    division, bit-identical to the device's cast-and-divide); float rows -> float32
    unchanged. Allocates n x F x 4 bytes: use it on batches, not on a large training set.
    """
    rows = np.asarray(rows)
    if rows.dtype == np.uint8:
        return rows.astype(np.float32) / np.float32(255.0)
    return rows.astype(np.float32, copy=False)


def limit_rows(labels: np.ndarray, n: int, seed: int) -> Optional[np.ndarray]:
    """The rows ``data.limit_*`` keeps of a split with (N,) ``labels``: (n,) int64,
    ascending; None (all rows) when n is 0 or >= N.

    A seeded sample (``seed`` = ``data.split_seed``), balanced over the classes: rows are
    shuffled, then taken round-robin over the classes (each class's first row in the
    shuffled order, then each one's second, ...), so n rows hold about n / classes of each
    class while the classes last. Not the first n rows: image folders are class-major,
    and a prefix would keep one class.

    Raises:
        ValueError: when ``n`` is negative.
    """
    total = len(labels)
    if n < 0:
        raise ValueError(f"subset size must be >= 0 (0 means all), found {n}")
    if n == 0 or n >= total:
        return None
    perm = np.random.default_rng(seed).permutation(total)
    shuffled = np.asarray(labels)[perm]
    by_class = np.argsort(shuffled, kind="stable")          # each class's rows, shuffled
    sorted_labels = shuffled[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    turn = np.empty(total, np.int64)                         # position within its class
    turn[by_class] = np.arange(total) - np.repeat(starts, np.diff(np.r_[starts, total]))
    return np.sort(perm[np.argsort(turn, kind="stable")[:n]]).astype(np.int64)


def subset(split: Split, n: int, seed: int) -> Split:
    """The rows of ``split`` that :func:`limit_rows` keeps (all of it, the same object,
    when n is 0 or >= N), in their order, copied: what ``data.limit_train`` /
    ``data.limit_test`` keep, with ``seed`` = ``data.split_seed``.

    Raises:
        ValueError: when ``n`` is negative.
    """
    rows = limit_rows(split.labels, n, seed)
    if rows is None:
        return split
    return replace(split, images=split.images[rows], labels=split.labels[rows],
                   source=f"{split.source} ({n} of {len(split)} rows, data.split_seed={seed})")


def _class_table(labels: np.ndarray):
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return classes, inverse.reshape(-1), counts


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction={test_fraction!r} must lie strictly between 0 "
                         "and 1")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int,
                     class_names=None, source: str = "data") -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split (``data.split: fraction``).

    Class c of n samples puts ``t = round(n * test_fraction)`` of them in the test set,
    clipped to ``[0, n - 2]`` (training keeps >= 2 per class), and a ``t`` of 1 becomes 2
    when n >= 4, else 0 (no 1-sample test class). Which samples: the first t of the
    class under a random key drawn from ``SeedSequence([seed, "SPLT"])``: the same
    labels and seed give the same split on every machine and rank. Vectorised
    (one lexsort), well under a second at 1,000,000 labels.

    Args:
        labels: (N,) integer class ids.
        test_fraction: in (0, 1).
        seed: ``data.split_seed`` >= 0.
        class_names, source: for messages.

    Returns:
        (train_rows, test_rows): int64 row indices, each ascending, disjoint, covering
        all rows.

    Raises:
        ValueError: a class has 1 sample (it could never be an anchor; the message names
            it and suggests ``data.split=classes``); the test set would get fewer than 2
            classes (message gives the fraction).
    """
    _check_fraction(test_fraction)
    labels = np.asarray(labels)
    classes, inv, counts = _class_table(labels)
    if classes.size < 2:        # no test fraction helps (the message below would say so)
        raise ValueError(f"{source}: triplets need at least 2 classes (a negative must come "
                         f"from another class); found 1: {_name(int(classes[0]), class_names)}"
                         if classes.size else f"{source}: no samples")
    lone = _lone_class(classes, counts, class_names)
    if lone:
        raise ValueError(
            f"{source}: {lone}: with data.split=fraction every class must train "
            "and an anchor needs a positive; remove it or use data.split=classes (1-sample "
            "classes then become test queries)")
    t = np.clip(np.floor(counts * test_fraction + 0.5).astype(np.int64), 0, counts - 2)
    t[t == 1] = np.where(counts[t == 1] >= 4, 2, 0)
    if np.count_nonzero(t) < 2:
        raise ValueError(
            f"{source}: data.test_fraction={test_fraction} puts >= 2 samples of fewer than 2 "
            f"classes into the test set (class sizes {int(counts.min())}..{int(counts.max())});"
            " raise data.test_fraction or give a test split")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_STREAM]))
    key = rng.random(labels.shape[0])
    order = np.lexsort((key, inv))                   # class-major, random within a class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.empty(labels.shape[0], np.int64)
    pos[order] = np.arange(labels.shape[0]) - starts[inv[order]]
    is_test = pos < t[inv]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def class_split(labels: np.ndarray, test_fraction: float, class_names=None,
                source: str = "data") -> Tuple[np.ndarray, np.ndarray]:
    """Split by class (``data.split: classes``): test classes are never seen in training.

    Of the classes with >= 2 samples, the **last** ``k = round(C * test_fraction)`` in
    class-id order (class folders sorted by name) are test classes, clipped so that both
    sides keep >= 2 of them: with ``test_fraction: 0.5`` on CUB-200 this is the standard
    protocol (classes 1-100 train, 101-200 test; Oh Song et al. 2016, "Deep Metric
    Learning via Lifted Structured Feature Embedding"). Classes with 1 sample always go to
    the test side (queries with no positive, see the module docstring).

    Returns:
        (train_rows, test_rows): int64, ascending, disjoint, covering all rows.

    Raises:
        ValueError: fewer than 4 classes with >= 2 samples (2 to train, 2 to test).
    """
    _check_fraction(test_fraction)
    labels = np.asarray(labels)
    classes, inv, counts = _class_table(labels)
    multi = np.flatnonzero(counts >= 2)              # class slots, in class-id order
    if multi.size < 4:
        raise ValueError(
            f"{source}: data.split=classes needs at least 4 classes with >= 2 samples (2 to "
            f"train on, 2 to test on), found {multi.size} of {classes.size} classes")
    k = int(np.clip(np.floor(multi.size * test_fraction + 0.5), 2, multi.size - 2))
    test_class = counts < 2
    test_class[multi[multi.size - k:]] = True
    is_test = test_class[inv]
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def anchor_rows(labels: np.ndarray) -> np.ndarray:
    """(M,) int64 ascending rows whose class has >= 2 samples: the rows that may anchor a
    triplet. All rows unless the split holds 1-sample classes (by-class protocol)."""
    labels = np.asarray(labels)
    _, inv, counts = _class_table(labels)
    return np.flatnonzero(counts[inv] >= 2)


def _lone_class(classes: np.ndarray, counts: np.ndarray, class_names) -> str:
    """'class C has N sample(s) (M such class(es))' for the first class with fewer than 2
    samples (an anchor without a positive), or '' when there is none."""
    lone = np.flatnonzero(counts < 2)
    if not lone.size:
        return ""
    return (f"class {_name(int(classes[lone[0]]), class_names)} has {counts[lone[0]]} "
            f"sample(s) ({lone.size} such class(es))")


def _name(class_id: int, class_names) -> str:
    """``3``, or ``3 ('Shirt')`` when the class has a name other than its id."""
    if class_names is not None and 0 <= class_id < len(class_names):
        name = class_names[class_id]
        return f"{class_id} ({name!r})" if name != str(class_id) else str(class_id)
    return str(class_id)


def _check_two_classes(split: Split, what: str, classes: np.ndarray) -> None:
    if classes.size < 2:
        names = [_name(int(c), split.class_names) for c in classes]
        raise ValueError(f"{what} split ({split.source}): triplets need at least 2 classes (a "
                         f"negative must come from another class); found {classes.size} "
                         f"class(es): {classes.tolist()}"
                         + (f" = {', '.join(names)}" if names != [str(c) for c in classes] else ""))


def check_training(split: Split) -> None:
    """Raise ValueError (naming the split's source and the class) unless every class has
    >= 2 samples and there are >= 2 classes: the training rules of the module docstring."""
    classes, _, counts = _class_table(split.labels)
    _check_two_classes(split, "training", classes)
    lone = _lone_class(classes, counts, split.class_names)
    if lone:
        raise ValueError(
            f"training split ({split.source}): {lone}; an anchor needs a positive of its "
            "class, so every training class needs >= 2 samples")


def check_test(split: Split, protocol: str) -> None:
    """Raise ValueError (naming the source and class) unless the test split obeys the
    rules of the module docstring for ``protocol`` (``data.split``): 1-sample classes only
    under ``classes``; always >= 2 classes with >= 2 samples (for the test triplets)."""
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"data.split={protocol!r} is not one of {', '.join(SPLIT_PROTOCOLS)}")
    classes, _, counts = _class_table(split.labels)
    _check_two_classes(split, "test", classes)
    lone = np.flatnonzero(counts < 2)
    if lone.size and protocol != "classes":
        c = int(classes[lone[0]])
        raise ValueError(
            f"test split ({split.source}): class {_name(c, split.class_names)} has 1 sample(s) "
            f"({lone.size} such class(es)); a 1-sample class can be a query only in the "
            "by-class protocol (data.split=classes), where it is left out of the metrics")
    if np.count_nonzero(counts >= 2) < 2:
        raise ValueError(
            f"test split ({split.source}): needs at least 2 classes with >= 2 samples (test "
            f"triplets need a positive and a negative), found {np.count_nonzero(counts >= 2)}")


def check_pair(train: Split, test: Split) -> None:
    """Raise ValueError naming both sources when train and test rows differ in width,
    kind (images vs features) or image shape: one network must take both."""
    if train.width != test.width or train.image_shape != test.image_shape:
        raise ValueError(width_mismatch(train.image_shape, train.width, train.source,
                                        test.image_shape, test.width, test.source))


def width_mismatch(train_shape, train_width, train_where, test_shape, test_width,
                   test_where) -> str:
    """The one-line message for train and test rows of different widths or kinds."""
    def what(shape, width):
        if shape is None:
            return f"features of width {width}"
        return f"images of {shape[0]}x{shape[1]}x{shape[2]} = {width} pixels"
    return (f"test {'images' if test_shape else 'features'} ({test_where}) are "
            f"{what(test_shape, test_width)}, training {'images' if train_shape else 'features'}"
            f" ({train_where}) {what(train_shape, train_width)}: both splits must have one "
            "width")


def check_sampler_classes(split: Split, kind: str, p: int) -> None:
    """Raise ValueError naming ``sampler.p`` and the data when a P x K sampler
    (``kind == 'pk'``) asks for more classes per batch than the training split holds.
    The trainer calls it before anything is written."""
    if kind != "pk":
        return
    n_classes = int(np.unique(split.labels).size)
    if p > n_classes:
        raise ValueError(f"sampler.p={p} but the training set has only {n_classes} classes "
                         f"({split.source}): a P x K batch takes sampler.p distinct classes; "
                         "lower sampler.p")


def describe(split: Split) -> str:
    """One log line: rows, classes, kind, bytes."""
    kind = (f"{split.image_shape[0]}x{split.image_shape[1]}x{split.image_shape[2]} uint8 images"
            if split.is_image else f"{split.width}-D {split.images.dtype} features")
    mapped = ", memory-mapped" if isinstance(split.images, np.memmap) else ""
    return (f"{len(split)} rows of {kind}, {np.unique(split.labels).size} classes, "
            f"{split.images.nbytes / 2**20:.1f} MiB{mapped} ({os.fspath(split.source)})")
