"""Precision@1, R-Precision and MAP@R from the neighbours :func:`.neighbours.knn` returns.

Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020, Sec. 3.2, as
pytorch-metric-learning's ``AccuracyCalculator``: for a query with R gallery items of its
class (leaving one out: the *other* ones) and rel(k) = 1 if its k-th nearest has its class:

* Precision@1 = rel(1);
* R-Precision = (1/R) sum_{k<=R} rel(k);
* MAP@R = (1/R) sum_{k<=R} P(k) rel(k), P(k) = (1/k) sum_{j<=k} rel(j).

Each is averaged over the queries with R >= 1 (a query whose class the gallery lacks has
no right answer: ``excluded_queries``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .neighbours import build_faiss, knn

__all__ = ["RETRIEVAL_METRICS", "EXACT_MAX_GALLERY", "precision_at_1", "r_precision",
           "map_at_r", "retrieval_metrics"]

RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "map_at_r")
# Largest gallery searched exactly (eval.exact_max_gallery's default); beyond it faiss IVF.
EXACT_MAX_GALLERY = 250_000


# rel: (B, K) bool in rank order; r: (B,) int >= 1, K >= max(r). Cumulative sums, so a
# query's value does not depend on K.

def precision_at_1(rel: np.ndarray) -> np.ndarray:
    """(B,) float64 Precision@1 per query: rel(1)."""
    return rel[:, 0].astype(np.float64)


def r_precision(rel: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(B,) float64 R-Precision per query: (1/R) sum_{k<=R} rel(k)."""
    hits = np.cumsum(rel[:, :int(r.max())], axis=1)
    return hits[np.arange(len(r)), r - 1] / r


def map_at_r(rel: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(B,) float64 MAP@R per query: (1/R) sum_{k<=R} P(k) rel(k)."""
    rel = rel[:, :int(r.max())]
    ranks = np.arange(1, rel.shape[1] + 1)
    precision_at_k = np.cumsum(rel, axis=1) / ranks * rel      # P(k) rel(k)
    return np.cumsum(precision_at_k, axis=1)[np.arange(len(r)), r - 1] / r


def retrieval_metrics(query_emb, query_labels, gallery_emb=None, gallery_labels=None, *,
                      metrics: Sequence[str] = RETRIEVAL_METRICS, max_queries: int = 0,
                      seed: int = 0, exact_max_gallery: int = EXACT_MAX_GALLERY,
                      nprobe: int = 32) -> dict:
    """Precision@1, R-Precision and MAP@R of retrieval by squared L2 (module docstring);
    without a gallery, leave-one-out over the queries. :func:`knn` is exact up to
    ``exact_max_gallery`` items, else through a faiss IVF index (``nprobe`` lists, seeded
    by ``seed``; the result then has ``approximate: True``).

    Args:
        query_emb: (Q, D) float, finite; query_labels: (Q,) comparable class labels.
        gallery_emb, gallery_labels: (N, D) and (N,), both or neither.
        metrics: a non-empty subset of ``RETRIEVAL_METRICS``.
        max_queries: 0 = every query; else ``numpy.random.RandomState(seed).choice`` of
            that many of the queries with R >= 1, against the full gallery.

    Returns:
        dict: the metrics (float in [0, 1]; NaN when no query counts, null in JSON by
        :func:`dist_triplet.fsutil.write_json`), ``queries`` (counted) and
        ``excluded_queries`` (R == 0).

    Raises:
        ValueError: shapes that do not fit, one gallery argument alone, a bad
            ``max_queries`` or metric name, non-finite embeddings.
    """
    q_lab = np.asarray(query_labels)
    if np.ndim(query_emb) != 2 or q_lab.shape != (len(query_emb),):
        raise ValueError(f"query embeddings must be 2-D (Q, D) and labels (Q,), got "
                         f"{np.shape(query_emb)} and {q_lab.shape}")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("give both gallery_emb and gallery_labels, or neither")
    loo = gallery_emb is None
    g_emb, g_lab = (query_emb, q_lab) if loo else (gallery_emb, np.asarray(gallery_labels))
    if np.ndim(g_emb) != 2 or g_lab.shape != (len(g_emb),):
        raise ValueError(f"gallery embeddings must be (N, D) and gallery_labels (N,), got "
                         f"{np.shape(g_emb)} and {g_lab.shape}")
    if int(max_queries) < 0:
        raise ValueError(f"max_queries must be >= 0 (0 = all), got {max_queries}")
    if not metrics or any(m not in RETRIEVAL_METRICS for m in metrics):
        raise ValueError(f"metrics must be a non-empty subset of {RETRIEVAL_METRICS}, "
                         f"got {tuple(metrics)!r}")
    # Class codes shared by queries and gallery; R = gallery items of the query's class.
    _, codes = np.unique(np.concatenate([q_lab, g_lab]), return_inverse=True)
    q_codes, g_codes = codes[:len(q_lab)], codes[len(q_lab):]
    r_all = np.bincount(g_codes, minlength=codes.max(initial=0) + 1)[q_codes] - int(loo)
    eligible = np.flatnonzero(r_all > 0)
    queries = eligible
    if max_queries and eligible.size > max_queries:
        queries = np.sort(np.random.RandomState(seed).choice(eligible, int(max_queries),
                                                             replace=False))
    out = {m: float("nan") for m in metrics}
    approximate = len(g_emb) > exact_max_gallery
    if queries.size:
        index = build_faiss(g_emb, "ivf", nprobe=nprobe, seed=seed)[0] if approximate else None
        r = r_all[queries] if tuple(metrics) != ("precision_at_1",) else np.ones_like(queries)
        _, idx = knn(np.asarray(query_emb)[queries], g_emb, int(r.max()),
                     exclude=queries if loo else None, index=index, distances=False)
        rel = (idx >= 0) & (g_codes[idx] == q_codes[queries][:, None])   # knn_labels == label
        funcs = {"precision_at_1": lambda: precision_at_1(rel),
                 "r_precision": lambda: r_precision(rel, r), "map_at_r": lambda: map_at_r(rel, r)}
        out = {m: float(funcs[m]().mean()) for m in metrics}
    out.update(queries=int(queries.size), excluded_queries=int(len(q_lab) - eligible.size))
    if approximate:
        out["approximate"] = True
    return out
