"""Where retrieval succeeds and fails on the test set: the numbers behind the run report.

Pure NumPy (pictures: :mod:`dist_triplet.report`). Everything here is leave-one-out among
the test items, by squared L2 in embedding units, as the run's Precision@1 with
``eval.gallery: test`` (metrics.py):

* :func:`nearest_classes`, :func:`nearest_others`: the class of each query's nearest
  *other* test item; the k nearest other items of a few queries (ties to the lower index
  throughout). The only calls into the neighbour search.
* :func:`per_class`: Precision@1 of each class and the class its misses go to, worst
  first (Fashion-MNIST: shirts, found among T-shirts, pullovers and coats).
* :func:`confusion`: counts of (query class, class of its nearest neighbour).
* :func:`pair_distances`: a seeded sample of same-class and other-class pair distances,
  the picture that explains a distance threshold (``calibrate``).

Sources: Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020) for
leave-one-out Precision@1; the same-/other-class distance histogram is the usual
picture of a verification threshold (FaceNet, Schroff et al. 2015, Sec. 4.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["nearest_classes", "nearest_others", "query_rows", "per_class", "confusion",
           "pair_distances", "sq_dist", "class_names_of", "ClassRow", "REPORT_QUERIES", "PAIRS"]

# Queries of the per-class table and confusion matrix: every test item up to this many,
# else a seeded sample (each search costs one (queries x N x D) product; 10,000 queries of
# the Fashion-MNIST test set take ~0.3 s).
REPORT_QUERIES = 10_000
# Pairs drawn per histogram (same class, other class): enough for a smooth histogram.
PAIRS = 20_000


def nearest_classes(emb: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The class of each query's nearest *other* test item (ties: the lower index).

    Args:
        emb: (N, D) float32 test embeddings, the gallery; ``rows`` index the queries in it.
        labels: (N,) int64 class ids in [0, C).
        rows: (R,) int64 distinct query rows in [0, N), each with another item of its class.

    Returns:
        (R,) int64 class ids: the same neighbours as the run's Precision@1 (one engine,
        :func:`dist_triplet.retrieval.knn`), so the per-class hits add up to its hits.
    """
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(rows) == 0:
        return labels[rows].copy()
    return labels[nearest_others(emb, rows, 1)[:, 0]]


def nearest_others(emb: np.ndarray, rows: np.ndarray, k: int = 1) -> np.ndarray:
    """The k nearest *other* items of each query row, exact, ties to the lower index.

    Args:
        emb: (N, D) float32 test embeddings, the gallery; ``rows`` index the queries in it.
        rows: (R,) int64 query rows in [0, N).
        k: neighbours per query, 1 <= k <= N - 1.

    Returns:
        (R, k) int64 positions in ``emb``, nearest first, never the query itself.
    """
    from .retrieval.neighbours import knn
    rows = np.asarray(rows, dtype=np.int64)
    return knn(emb[rows], emb, k, exclude=rows, distances=False)[1]


def sq_dist(emb: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M,) float64 squared L2 between rows ``a`` and ``b`` (each (M,) int) of ``emb``."""
    d = emb[a].astype(np.float64) - emb[b].astype(np.float64)
    return np.einsum("ij,ij->i", d, d)


def query_rows(labels: np.ndarray, cap: int = REPORT_QUERIES, seed: int = 0) -> np.ndarray:
    """(R,) int64 sorted query rows: those whose class has another test item (R >= 1, the
    rows metrics.py counts), all of them up to ``cap``, else ``cap`` drawn by
    ``default_rng(seed)`` without replacement."""
    labels = np.asarray(labels)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[codes.reshape(-1)] > 1)
    if len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))
    return rows.astype(np.int64)


@dataclass
class ClassRow:
    """One class's line of the per-class table."""
    label: int              # class id
    queries: int            # its test items searched
    hits: int               # of them, whose nearest other test item has the class
    precision_at_1: float   # hits / queries
    confused_with: Optional[int]   # class most of its misses went to (None: no miss)
    confused_share: float   # share of its queries whose nearest neighbour has that class


def confusion(query_labels: np.ndarray, nn_labels: np.ndarray, classes: int) -> np.ndarray:
    """(C, C) int64: entry [i, j] counts queries of class i whose nearest neighbour has
    class j; the diagonal holds the hits. Labels are ints in [0, classes)."""
    q = np.asarray(query_labels, dtype=np.int64)
    n = np.asarray(nn_labels, dtype=np.int64)
    return np.bincount(q * classes + n, minlength=classes * classes).reshape(classes, classes)


def per_class(matrix: np.ndarray) -> list:
    """:class:`ClassRow` per class with queries, from :func:`confusion`'s matrix; worst
    Precision@1 first (ties: lower class id first). The queries-weighted mean of the
    rows' Precision@1 is the overall leave-one-out Precision@1 of those queries."""
    out = []
    for c in range(matrix.shape[0]):
        n = int(matrix[c].sum())
        if n == 0:
            continue
        miss = matrix[c].copy()
        miss[c] = 0
        j = int(miss.argmax())
        out.append(ClassRow(c, n, int(matrix[c, c]), matrix[c, c] / n,
                            j if miss[j] > 0 else None, miss[j] / n))
    return sorted(out, key=lambda r: (r.precision_at_1, r.label))


def pair_distances(emb: np.ndarray, labels: np.ndarray, pairs: int = PAIRS,
                   seed: int = 0) -> tuple:
    """Squared L2 of a seeded sample of same-class and other-class test pairs, or of every
    pair once when the test set has no more than ``pairs`` of them (a sample with repeats
    would count pairs that are not there).

    Each sampled pair: a uniformly drawn item with another item of its class (same) or an
    item of another class (other), and a partner drawn uniformly among those, never itself.

    Returns:
        (same (M,) float64, other (M',) float64), M = M' = ``pairs`` when sampled; an
        array is empty when no such pair exists (every class a single item; a single class).
    """
    labels = np.asarray(labels)
    if len(labels) * (len(labels) - 1) // 2 <= pairs:
        i, j = np.triu_indices(len(labels), 1)
        d, same = sq_dist(emb, i, j), labels[i] == labels[j]
        return d[same], d[~same]
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")       # rows grouped by class: one block each
    place = np.empty_like(order)
    place[order] = np.arange(len(order))            # row -> its place in ``order``
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = len(labels)
    out = []
    for same in (True, False):
        cand = np.flatnonzero(counts[codes] > 1 if same else counts[codes] < n)
        if len(cand) == 0:
            out.append(np.zeros(0))
            continue
        a = cand[rng.integers(0, len(cand), pairs)]
        s, m = start[codes[a]], counts[codes[a]]
        if same:        # another place in a's block: skip a's own place
            j = rng.integers(0, m - 1)
            b = order[s + j + (j >= place[a] - s)]
        else:           # a place outside a's block: skip over the block
            j = rng.integers(0, n - m)
            b = order[j + (j >= s) * m]
        out.append(sq_dist(emb, a, b))
    return out[0], out[1]


def class_names_of(class_names: Sequence[str], c: Optional[int]) -> str:
    """The name of class id ``c`` ("?" when unknown or out of range)."""
    if c is None or c < 0 or c >= len(class_names):
        return "?"
    return str(class_names[c])
