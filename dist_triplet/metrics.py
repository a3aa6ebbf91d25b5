"""Evaluation metrics for embeddings: retrieval quality, triplet accuracy, collapse check.

The definitions live here; the neighbour search that feeds them is
:mod:`dist_triplet.knn`. NumPy only (no MXNet, no Horovod), so that they can be tested
and run anywhere, on the embeddings of the test set gathered on rank 0.

Retrieval metrics follow Musgrave, Belongie, Lim, "A Metric Learning Reality Check",
ECCV 2020, Sec. 3.2 -- the same quantities as pytorch-metric-learning's
``AccuracyCalculator``. For a query with ``R`` the number of gallery items of its class
(leaving one out: the *other* items of its class), and ``rel(k)`` = 1 if its k-th
nearest gallery item has its class:

* Precision@1 = rel(1).
* R-Precision = (1/R) sum_{k=1..R} rel(k): the share of its class among the R nearest.
* MAP@R = (1/R) sum_{k=1..R} P(k) rel(k), with P(k) = (1/k) sum_{j<=k} rel(j) the
  precision of the first k.

Each is averaged over the queries with R >= 1.

The seed article measured "triplet accuracy" as the share of test triplets whose
margin-0 triplet loss is 0. That number is 100% for a network that maps every input to
one point, which is why :func:`is_collapsed` and :func:`evaluate_embeddings` exist.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import knn
from .knn import check_matrix as _check_embeddings

__all__ = [
    "RETRIEVAL_METRICS",
    "EXACT_MAX_GALLERY",
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "retrieval_metrics",
    "triplet_accuracy",
    "embedding_spread",
    "is_collapsed",
    "evaluate_embeddings",
]

METHODS = knn.METHODS
RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "map_at_r")

# Largest gallery searched exactly; beyond it retrieval_metrics uses faiss (approximate).
# Exact search costs a float32 GEMM of (queries x gallery x D), a pass over the distances
# and a sort of the R nearest per query. Measured here (1,000 queries, 128-D, 10 classes,
# 2 shared cores, CPU seconds): Precision@1 alone 0.12 / 0.38 / 0.85 s against 10k / 50k /
# 100k gallery items (8.5 ns per pair); the full set 0.29 / 5.8 / 9.9 s (~100 ns per pair
# at R = gallery / 10). So 10,000 queries (eval.max_queries) against 250,000 items take
# ~21 CPU s (~11 s on 2 cores) for P@1: the most an evaluation should cost. faiss IVF
# (nlist sqrt(N), nprobe 32) builds in 2-6 s for 60,000 items and reaches recall@100 = 1.0
# on Fashion-MNIST embeddings (test queries, training gallery); its cost grows with the
# cells visited, not with N.
EXACT_MAX_GALLERY = 250_000


# ----------------------------------------------------------------------------- definitions
# rel: (B, K) bool, rel[i, k-1] = rel(k) of query i, in exact rank order; r: (B,) int >= 1,
# K >= max(r). Cumulative sums (sequential), never ``sum`` (pairwise), so a query's value
# does not depend on K, hence not on how queries were grouped.

def precision_at_1(rel: np.ndarray) -> np.ndarray:
    """(B,) float64 Precision@1 per query: rel(1)."""
    return rel[:, 0].astype(np.float64)


def _first_r(rel: np.ndarray, r: np.ndarray):
    """rel(k) for k = 1..max R, 0 past each query's own R; and the ranks 1..max R."""
    k = int(r.max())
    ranks = np.arange(1, k + 1)
    return rel[:, :k] & (ranks[None, :] <= r[:, None]), ranks


def r_precision(rel: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(B,) float64 R-Precision per query: (1/R) sum_{k<=R} rel(k)."""
    rel_r, _ = _first_r(rel, r)
    hits = np.cumsum(rel_r, axis=1, dtype=np.int32)
    return hits[np.arange(len(r)), r - 1] / r


def map_at_r(rel: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(B,) float64 MAP@R per query: (1/R) sum_{k<=R} P(k) rel(k)."""
    rel_r, ranks = _first_r(rel, r)
    precision_at_k = np.cumsum(rel_r, axis=1, dtype=np.int32) / ranks     # P(k)
    precision_at_k *= rel_r                                               # P(k) rel(k)
    return np.cumsum(precision_at_k, axis=1)[np.arange(len(r)), r - 1] / r


_DEFINITIONS = {"precision_at_1": lambda rel, r: precision_at_1(rel),
                "r_precision": r_precision, "map_at_r": map_at_r}


# ----------------------------------------------------------------------------- retrieval

def retrieval_metrics(query_emb, query_labels, gallery_emb=None, gallery_labels=None, *,
                      metrics: Sequence[str] = RETRIEVAL_METRICS, max_queries: int = 0,
                      seed: int = 0, exact_max_gallery: int = EXACT_MAX_GALLERY,
                      block: int = 1024, method: str = "auto", nprobe: int = 32) -> dict:
    """Precision@1, R-Precision and MAP@R of retrieval by squared L2 (module docstring).

    Without a gallery: leave-one-out, every query searched against all *other* query
    items (pytorch-metric-learning's ``AccuracyCalculator`` with the query set as the
    reference). With a gallery (e.g. the training set): every query against every
    gallery item, and Precision@1 is the familiar 1-nearest-neighbour accuracy.

    **Exact** when the gallery has at most ``exact_max_gallery`` items: neighbours ranked
    by squared Euclidean distance, **ties broken by lower gallery index first**, keys as
    :func:`dist_triplet.knn.exact_keys` (so a collapsed embedding, where every distance
    ties, gives a defined result); ``method`` picks the engine (:mod:`dist_triplet.knn`),
    never the result. Asked for Precision@1 alone, it takes the first-rank search (one
    GEMM and a pass of minima), several times cheaper than the R nearest, equally exact.
    **Approximate** beyond: faiss ``IndexIVFFlat`` (``nprobe`` cells visited), float32
    distances, no tie rule; the result then carries ``approximate: True``; measure its
    recall with :func:`dist_triplet.knn.approximate_recall`.

    Args:
        query_emb: (Q, D) float (float32 expected) or uint8; units of the embedding.
        query_labels: (Q,) int class labels.
        gallery_emb: (N, D) like ``query_emb``, or None for leave-one-out.
        gallery_labels: (N,) int, given exactly when ``gallery_emb`` is.
        metrics: which of ``RETRIEVAL_METRICS`` to compute.
        max_queries: 0 = every query; else a uniform sample of this many of the queries
            that have a correct answer (R >= 1), drawn with ``seed``
            (``numpy.random.RandomState``), always against the full gallery. The same
            arguments give the same sample.
        exact_max_gallery: largest gallery searched exactly (see ``EXACT_MAX_GALLERY``).
        block: queries per block of the exact path, >= 1; results do not depend on it.
        method: ``"auto"``, ``"fast"`` or ``"exact"``; results do not depend on it.
        nprobe: faiss cells visited per query, approximate search only.

    Returns:
        dict with the requested metrics (float in [0, 1], means over the counted queries;
        NaN when none is counted), ``queries`` (int, queries counted) and
        ``excluded_queries`` (int, queries with ``R == 0``: no item of their class to
        find, left out of every denominator); plus ``approximate: True`` when faiss ran.

    Non-finite embeddings give +inf distances, ranked last (exact path); check
    :func:`is_collapsed`.

    Raises:
        ValueError: if an embedding is not 2-D, labels do not match their rows, only one
            of ``gallery_emb`` / ``gallery_labels`` is given, widths differ,
            ``block < 1``, ``max_queries < 0``, or ``method`` or a metric is unknown.
    """
    q_emb = _check_embeddings(query_emb, "query embeddings")
    q_lab = np.asarray(query_labels)
    if q_lab.shape != (q_emb.shape[0],):
        raise ValueError(f"labels must have shape ({q_emb.shape[0]},), got {q_lab.shape}")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("give both gallery_emb and gallery_labels, or neither")
    if gallery_emb is not None:
        g_emb = _check_embeddings(gallery_emb, "gallery embeddings")
        g_lab = np.asarray(gallery_labels)
        if g_lab.shape != (g_emb.shape[0],):
            raise ValueError(f"gallery_labels must have shape ({g_emb.shape[0]},), "
                             f"got {g_lab.shape}")
        if g_emb.shape[1] != q_emb.shape[1]:
            raise ValueError(f"query embeddings have {q_emb.shape[1]} columns, gallery "
                             f"embeddings {g_emb.shape[1]}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if int(max_queries) < 0:
        raise ValueError(f"max_queries must be >= 0 (0 = all), got {max_queries}")
    unknown = [m for m in metrics if m not in RETRIEVAL_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {RETRIEVAL_METRICS}, "
                         f"got {tuple(metrics)!r}")

    # Class codes shared by queries and gallery; R = gallery items of the query's class.
    loo = gallery_emb is None
    if loo:
        _, q_codes, counts = np.unique(q_lab, return_inverse=True, return_counts=True)
        q_codes = q_codes.reshape(-1)
        g_emb, g_codes = q_emb, q_codes
        r_all = counts[q_codes] - 1 if q_codes.size else np.zeros(0, np.int64)
    else:
        _, codes = np.unique(np.concatenate([q_lab, g_lab]), return_inverse=True)
        codes = codes.reshape(-1)
        q_codes, g_codes = codes[:q_lab.size], codes[q_lab.size:]
        r_all = np.bincount(g_codes, minlength=int(codes.max(initial=-1)) + 1)[q_codes] \
            if q_codes.size else np.zeros(0, np.int64)
    eligible = np.flatnonzero(r_all > 0)  # a query of a class absent from the gallery has no answer
    queries = eligible
    if max_queries and eligible.size > max_queries:
        rng = np.random.RandomState(seed)
        queries = np.sort(rng.choice(eligible, int(max_queries), replace=False))

    scores = {m: np.zeros(queries.size) for m in metrics}
    approximate = g_emb.shape[0] > exact_max_gallery
    if queries.size and approximate:
        _approximate_scores(q_emb, q_codes, g_emb, g_codes, queries, r_all[queries], loo,
                            scores, nprobe, seed)
    elif queries.size and tuple(metrics) == ("precision_at_1",):
        search = knn.NeighbourSearch(g_emb, g_codes, None if loo else q_emb,
                                     None if loo else q_codes, method=method, block=block)
        scores["precision_at_1"][:] = search.nearest_relevance(queries)
    elif queries.size:
        search = knn.NeighbourSearch(g_emb, g_codes, None if loo else q_emb,
                                     None if loo else q_codes, method=method, block=block)

        def on_tile(rows, r, rel):
            for name, values in scores.items():
                values[rows] = _DEFINITIONS[name](rel, r)

        search.ranked_relevance(queries, r_all[queries], on_tile)

    counted = int(queries.size)
    out = {m: float(scores[m].mean()) if counted else float("nan") for m in metrics}
    out.update(queries=counted, excluded_queries=int(q_emb.shape[0] - eligible.size))
    if approximate:
        out["approximate"] = True
    return out


def _approximate_scores(q_emb, q_codes, g_emb, g_codes, queries, r, loo, scores, nprobe,
                        seed, batch: int = 256) -> None:
    """Fill ``scores`` from faiss's neighbour lists (see :class:`knn.ApproximateSearch`)."""
    index = knn.ApproximateSearch(g_emb, nprobe=nprobe, seed=seed)
    need_r = set(scores) != {"precision_at_1"}
    for s in range(0, queries.size, batch):
        qi, rr = queries[s:s + batch], r[s:s + batch]
        k = int(rr.max()) if need_r else 1
        nn = index.search(q_emb[qi], k, exclude=qi if loo else None)   # (B, k), -1 = none
        rel = (nn >= 0) & (g_codes[np.maximum(nn, 0)] == q_codes[qi][:, None])
        for name, values in scores.items():
            values[s:s + batch] = _DEFINITIONS[name](rel, rr if need_r else np.ones_like(rr))


# ----------------------------------------------------------------------------- triplets, collapse

def triplet_accuracy(anchor, positive, negative) -> dict:
    """Share of triplets whose anchor is nearer to its positive than to its negative.

    With squared Euclidean distances summed over features, as ``gluon.loss.TripletLoss``
    (MXNet 1.9 docs: ``loss = max(0, ||a - p||^2 - ||a - n||^2 + margin)``):

    * ``seed_accuracy``: share with ``||a-p||^2 - ||a-n||^2 <= 0``, i.e. whose margin-0
      TripletLoss is exactly 0 -- the seed article's "triplet accuracy". Ties count as
      correct, so a collapsed embedding (all distances 0) scores 1.0.
    * ``strict_accuracy``: share with ``||a-p|| < ||a-n||``; ties count as wrong.

    Distances are computed in float64.

    Args:
        anchor, positive, negative: (M, D) float embeddings of the same shape.

    Returns:
        dict with ``seed_accuracy``, ``strict_accuracy`` (float in [0, 1]; NaN if M == 0),
        ``correct``, ``strict_correct`` and ``total`` (int counts).

    Raises:
        ValueError: if the arrays are not 2-D or their shapes differ.
    """
    a = _check_embeddings(anchor, "anchor").astype(np.float64)
    p = _check_embeddings(positive, "positive").astype(np.float64)
    n = _check_embeddings(negative, "negative").astype(np.float64)
    if not a.shape == p.shape == n.shape:
        raise ValueError(f"anchor, positive, negative shapes differ: {a.shape}, {p.shape}, {n.shape}")
    d_ap = np.square(a - p).sum(axis=1)
    d_an = np.square(a - n).sum(axis=1)
    total = int(a.shape[0])
    correct = int((d_ap - d_an <= 0).sum())
    strict = int((d_ap < d_an).sum())
    return {
        "seed_accuracy": correct / total if total else float("nan"),
        "strict_accuracy": strict / total if total else float("nan"),
        "correct": correct,
        "strict_correct": strict,
        "total": total,
    }


def embedding_spread(embeddings) -> float:
    """Root-mean-square distance of the embeddings from their mean.

    ``sqrt(mean_i ||e_i - mean(e)||^2)``, in units of the embedding; computed in float64.
    0 for a collapsed network (every input mapped to one point); NaN or inf if any value
    is non-finite.

    Args:
        embeddings: (N, D) float, N >= 1.

    Raises:
        ValueError: if ``embeddings`` is not 2-D or N == 0.
    """
    e = _check_embeddings(embeddings).astype(np.float64)
    if e.shape[0] == 0:
        raise ValueError("embeddings is empty (N == 0)")
    centred = e - e.mean(axis=0, keepdims=True)
    return float(np.sqrt(np.square(centred).sum(axis=1).mean()))


def is_collapsed(embeddings, eps: float = 1e-6) -> bool:
    """True if the embeddings have collapsed to (about) one point or are not finite.

    A collapsed network maps every input to the same point: every squared distance is 0,
    every margin-0 triplet loss is 0 and the seed metric reports 100% accuracy for a
    useless model. This check lets callers flag such numbers instead of celebrating them.

    Args:
        embeddings: (N, D) float, N >= 1.
        eps: spread threshold, units of the embedding (see :func:`embedding_spread`);
            1e-6 is far below the spread of any trained embedding and far above float32
            rounding noise for unit-scale embeddings.

    Returns:
        ``embedding_spread(embeddings) <= eps`` or any value non-finite.

    Raises:
        ValueError: as :func:`embedding_spread`.
    """
    e = _check_embeddings(embeddings)
    if not np.all(np.isfinite(e)):
        return True
    return embedding_spread(e) <= eps


# Share of test triplets with d(a,p) == d(a,n) exactly above which the embedding counts as
# collapsed even though its spread is not ~0. Measured here: a batch-hard run whose ReLU
# units died mapped most images to the same few points; spread 0.0054, yet 98% of test
# triplets tied (seed accuracy 0.989, strict 0.011, P@1 0.106 = chance). A trained
# embedding ties almost never (seed recipe: 0 of 9,990).
TIE_COLLAPSE_SHARE = 0.5


def evaluate_embeddings(embeddings, labels, triplets, *, collapse_eps: float = 1e-6,
                        block: int = 1024, metrics: Sequence[str] = RETRIEVAL_METRICS,
                        max_queries: int = 0, seed: int = 0, gallery_emb=None,
                        gallery_labels=None, exact_max_gallery: int = EXACT_MAX_GALLERY,
                        nprobe: int = 32) -> dict:
    """All evaluation numbers for one set of embeddings, in one flat dict.

    Args:
        embeddings: (N, D) float32, units of the embedding: the queries (and, without a
            gallery, the items searched).
        labels: (N,) int class labels.
        triplets: (M, 3) int row indices (anchor, positive, negative) into ``embeddings``,
            as produced by the triplet sampler.
        collapse_eps: spread threshold of :func:`is_collapsed`.
        block, metrics, max_queries, seed, gallery_emb, gallery_labels, exact_max_gallery,
        nprobe: as :func:`retrieval_metrics`.

    Returns:
        The keys of :func:`retrieval_metrics` and :func:`triplet_accuracy`, plus
        ``spread`` (float, :func:`embedding_spread`), ``tie_share`` (float, share of
        triplets with d(a,p) == d(a,n), i.e. seed minus strict accuracy), ``collapsed``
        (bool: :func:`is_collapsed`, or ``tie_share >= TIE_COLLAPSE_SHARE`` -- a partial
        collapse where many inputs share one point) and ``valid`` (bool: not
        ``collapsed`` and at least one query counted; with no query that has an item of
        its class to find, the retrieval metrics are NaN and the run has nothing to
        report). When ``collapsed`` is True the retrieval and accuracy values are still
        computed (with the tie rule they are well defined) but describe ties, not
        retrieval: the seed accuracy of a network that maps everything to one point is
        1.0. Callers must not report them as a success; ``train`` marks the log line and
        metrics.json (``valid: false``).

    Raises:
        ValueError: on bad shapes, or triplet indices outside ``[0, N)``.
    """
    emb = _check_embeddings(embeddings)
    trip = np.asarray(triplets)
    if trip.ndim != 2 or trip.shape[1] != 3:
        raise ValueError(f"triplets must have shape (M, 3), got {trip.shape}")
    if not np.issubdtype(trip.dtype, np.integer):
        raise ValueError(f"triplets must be integer indices, got dtype {trip.dtype}")
    if trip.size and (trip.min() < 0 or trip.max() >= emb.shape[0]):
        raise ValueError(f"triplet indices must lie in [0, {emb.shape[0]})")
    out = retrieval_metrics(emb, labels, gallery_emb, gallery_labels, metrics=metrics,
                            max_queries=max_queries, seed=seed, block=block,
                            exact_max_gallery=exact_max_gallery, nprobe=nprobe)
    out.update(triplet_accuracy(emb[trip[:, 0]], emb[trip[:, 1]], emb[trip[:, 2]]))
    out["spread"] = embedding_spread(emb)
    total = max(out["total"], 1)
    out["tie_share"] = (out["correct"] - out["strict_correct"]) / total
    # is_collapsed(emb, collapse_eps), without computing the spread twice
    out["collapsed"] = bool(not np.all(np.isfinite(emb)) or out["spread"] <= collapse_eps
                            or out["tie_share"] >= TIE_COLLAPSE_SHARE)
    out["valid"] = not out["collapsed"] and out["queries"] > 0
    return out
