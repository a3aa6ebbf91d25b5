"""Evaluation metrics for embeddings: retrieval quality, triplet accuracy, collapse check.

Pure NumPy (no MXNet, no Horovod) so that it can be tested and run anywhere, on the
embeddings of the test set gathered on the main rank.

Retrieval metrics follow Musgrave, Belongie, Lim, "A Metric Learning Reality Check",
ECCV 2020, Sec. 3.2 -- the same quantities as pytorch-metric-learning's
``AccuracyCalculator`` with the query excluded from its own neighbours:

* Precision@1: 1 if the nearest other sample has the query's class, else 0.
* R-Precision: with ``R`` the number of *other* samples of the query's class, the share
  of same-class samples among the ``R`` nearest neighbours.
* MAP@R: ``(1/R) * sum_{k=1..R} P(k) * rel(k)``, where ``rel(k)`` is 1 if the k-th
  neighbour has the query's class and ``P(k)`` is the precision of the first k.

The seed article measured "triplet accuracy" as the share of test triplets whose
margin-0 triplet loss is 0. That number is 100% for a network that maps every input to
one point, which is why :func:`is_collapsed` and :func:`evaluate_embeddings` exist.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "retrieval_metrics",
    "triplet_accuracy",
    "embedding_spread",
    "is_collapsed",
    "evaluate_embeddings",
]

# Squared distances below this fraction of ||q||^2 + ||x||^2 are set to exactly 0. The
# expansion ||q||^2 + ||x||^2 - 2 q.x in float64 has a rounding error of about
# D * 1.1e-16 times that sum, so smaller values cannot be told from 0; snapping them makes
# exact duplicates (a collapsed embedding) tie exactly, and the tie rule then decides.
_ZERO_RTOL = 1e-10


def _check_embeddings(embeddings, name: str = "embeddings") -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {emb.dtype}")
    return emb


def _block_sq_dist(q: np.ndarray, q_norm: np.ndarray, x: np.ndarray,
                   x_norm: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, (Bq, N) float32, from float64 inputs.

    float64 for the expansion because ``-2 q.x`` cancels most of ``||q||^2 + ||x||^2``
    for near neighbours; the result is rounded to float32, the precision of the
    embeddings themselves, so that equal distances (duplicate points) compare equal
    instead of differing in float64 rounding noise.
    """
    scale = q_norm[:, None] + x_norm[None, :]
    d = scale - 2.0 * (q @ x.T)
    d[d <= _ZERO_RTOL * scale] = 0.0  # also clips the small negatives of the expansion
    # NaN / inf embeddings: rank those neighbours last rather than let NaN scramble the
    # partition; is_collapsed() reports them.
    d[~np.isfinite(d)] = np.inf
    return d.astype(np.float32)


def _top_k_lowest_index_ties(d: np.ndarray, k: int, self_cols: np.ndarray) -> np.ndarray:
    """The k nearest columns of each row of ``d`` (B, N), ordered, ties by lower index.

    ``self_cols`` (B,) int: the column of each row's query, which is never returned.
    Returns (B, k) int64. Requires 1 <= k <= N - 1.

    ``argpartition`` alone picks an arbitrary subset of the columns tied with the k-th
    value, so the k-th value ``t`` is found first and the set is rebuilt exactly: all
    columns with ``d < t`` plus the lowest-index columns with ``d == t`` until k are taken.
    """
    b, n = d.shape
    rows = np.arange(b)
    d = d.copy()
    d[rows, self_cols] = np.inf  # the query is never its own neighbour
    not_self = np.ones((b, n), dtype=bool)
    not_self[rows, self_cols] = False
    # The query's +inf is the row maximum, and each row has >= k other columns, so the
    # k-th smallest of the row is the k-th smallest among the other columns.
    t = np.partition(d, k - 1, axis=1)[:, k - 1]
    below = (d < t[:, None]) & not_self
    equal = (d == t[:, None]) & not_self
    need = k - below.sum(axis=1)  # >= 1, since t itself is one of the k smallest
    chosen = below | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
    # Exactly k per row; nonzero() walks row-major, so each row's columns come ascending.
    cols = np.nonzero(chosen)[1].reshape(b, k)
    # A stable sort of ascending-index columns keeps lower indices first among ties.
    order = np.argsort(np.take_along_axis(d, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def retrieval_metrics(embeddings, labels, *, block: int = 1024) -> dict:
    """Precision@1, R-Precision and MAP@R of leave-one-out retrieval by squared L2.

    Definitions: Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020,
    Sec. 3.2 (pytorch-metric-learning ``AccuracyCalculator``, query excluded). Every
    sample is a query against all *other* samples. For query i, ``R_i`` is the number of
    other samples with its label; neighbours are ranked by squared Euclidean distance,
    ascending, and **ties are broken by lower dataset index first**, so the result is
    deterministic (it matters for a collapsed embedding, where every distance ties).
    Distances are computed in float64 as ``||q||^2 + ||x||^2 - 2 q.x``, clipped at 0,
    values below ``1e-10 * (||q||^2 + ||x||^2)`` (the expansion's rounding error) set to
    exactly 0, then rounded to float32 so that duplicate points tie exactly.

    The search is exact and blocked: ``block`` queries at a time against all N samples,
    then the top ``max(R_i)`` by ``argpartition`` and a stable sort. Memory is
    O(block * N). Exact NumPy rather than faiss because the test sets here are ~10k
    points, where exact search takes seconds, needs no extra native dependency, and
    applies the tie rule exactly (approximate indexes do not).

    Args:
        embeddings: (N, D) float (float32 expected); units of the embedding.
        labels: (N,) int class labels.
        block: queries per block, >= 1; results do not depend on it.

    Returns:
        dict with ``precision_at_1``, ``r_precision``, ``map_at_r`` (float in [0, 1],
        means over the counted queries; NaN when no query is counted), ``queries`` (int,
        queries counted) and ``excluded_queries`` (int, queries with ``R_i == 0``, i.e.
        the only sample of their class: they have no correct answer and are left out of
        every denominator).

    Non-finite embeddings give +inf distances, ranked last; check :func:`is_collapsed`.

    Raises:
        ValueError: if ``embeddings`` is not 2-D, ``labels`` is not (N,), or ``block < 1``.
    """
    emb = _check_embeddings(embeddings)
    lab = np.asarray(labels)
    n = emb.shape[0]
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    block = int(block)

    x = emb.astype(np.float64)
    x_norm = np.einsum("ij,ij->i", x, x)
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    r_all = counts[inverse] - 1  # (N,) other samples of the same class

    # Per-query scores, averaged once at the end, so the result does not depend on block.
    p1 = np.zeros(n)
    rp = np.zeros(n)
    mapr = np.zeros(n)
    for start in range(0, n, block):
        q_idx = np.arange(start, min(start + block, n))
        q_idx = q_idx[r_all[q_idx] > 0]  # singleton classes have no correct answer
        if q_idx.size == 0:
            continue
        r = r_all[q_idx]
        k = int(r.max())
        d = _block_sq_dist(x[q_idx], x_norm[q_idx], x, x_norm)
        nn = _top_k_lowest_index_ties(d, k, q_idx)  # (Bq, k)
        rel = (lab[nn] == lab[q_idx][:, None])  # (Bq, k) bool
        within_r = np.arange(1, k + 1)[None, :] <= r[:, None]  # (Bq, k), first R_i ranks
        rel_r = rel & within_r
        hits = np.cumsum(rel_r, axis=1)
        precision_at_k = hits / np.arange(1, k + 1)[None, :]
        p1[q_idx] = rel[:, 0]
        rp[q_idx] = hits[:, -1] / r
        mapr[q_idx] = (precision_at_k * rel_r).sum(axis=1) / r

    counted_mask = r_all > 0
    counted = int(counted_mask.sum())

    def mean(scores):
        return float(scores[counted_mask].mean()) if counted else float("nan")

    return {
        "precision_at_1": mean(p1),
        "r_precision": mean(rp),
        "map_at_r": mean(mapr),
        "queries": counted,
        "excluded_queries": int(n - counted),
    }


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


def evaluate_embeddings(embeddings, labels, triplets, *, collapse_eps: float = 1e-6,
                        block: int = 1024) -> dict:
    """All evaluation numbers for one set of embeddings, in one flat dict.

    Args:
        embeddings: (N, D) float32, units of the embedding.
        labels: (N,) int class labels.
        triplets: (M, 3) int row indices (anchor, positive, negative) into ``embeddings``,
            as produced by the triplet sampler.
        collapse_eps: spread threshold of :func:`is_collapsed`.
        block: query block size of :func:`retrieval_metrics`.

    Returns:
        The keys of :func:`retrieval_metrics` and :func:`triplet_accuracy`, plus
        ``spread`` (float, :func:`embedding_spread`) and ``collapsed`` (bool,
        :func:`is_collapsed`). When ``collapsed`` is True the retrieval and accuracy values
        are still computed (with the tie rule they are well defined) but are meaningless;
        callers should mark them as such in logs rather than drop them silently.

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
    out = retrieval_metrics(emb, labels, block=block)
    out.update(triplet_accuracy(emb[trip[:, 0]], emb[trip[:, 1]], emb[trip[:, 2]]))
    out["spread"] = embedding_spread(emb)
    out["collapsed"] = is_collapsed(emb, eps=collapse_eps)
    return out
