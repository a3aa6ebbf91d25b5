"""Evaluation numbers for embeddings: triplet accuracy, the collapse check, and all in one.

The retrieval metrics (Precision@1, R-Precision, MAP@R) and the neighbour search behind
them are :mod:`dist_triplet.retrieval.metrics`; this module adds what the seed article
measured and what guards it. NumPy only (no MXNet, no Horovod).

The seed article measured "triplet accuracy" as the share of test triplets whose
margin-0 triplet loss is 0. That number is 100% for a network that maps every input to
one point, which is why :func:`is_collapsed` and :func:`evaluate_embeddings` exist.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .retrieval.metrics import EXACT_MAX_GALLERY, RETRIEVAL_METRICS, retrieval_metrics

__all__ = ["triplet_accuracy", "embedding_spread", "is_collapsed", "evaluate_embeddings",
           "TIE_COLLAPSE_SHARE"]


def _check_embeddings(values, name: str = "embeddings") -> np.ndarray:
    """``values`` as a 2-D numeric array; ValueError naming ``name`` otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be 2-D (N, D) numeric, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    return arr


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
    a = _check_embeddings(anchor, "anchor")
    p = _check_embeddings(positive, "positive")
    n = _check_embeddings(negative, "negative")
    if not a.shape == p.shape == n.shape:
        raise ValueError(f"anchor, positive, negative shapes differ: {a.shape}, {p.shape}, {n.shape}")
    d_ap = np.square(np.subtract(a, p, dtype=np.float64)).sum(axis=1)   # no float64 copies
    d_an = np.square(np.subtract(a, n, dtype=np.float64)).sum(axis=1)
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
                        metrics: Sequence[str] = RETRIEVAL_METRICS,
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
        metrics, max_queries, seed, gallery_emb, gallery_labels, exact_max_gallery,
        nprobe: as :func:`dist_triplet.retrieval.metrics.retrieval_metrics`.

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
    finite = bool(np.all(np.isfinite(emb))) and (gallery_emb is None or
                                                 bool(np.all(np.isfinite(gallery_emb))))
    if finite:
        out = retrieval_metrics(emb, labels, gallery_emb, gallery_labels, metrics=metrics,
                                max_queries=max_queries, seed=seed,
                                exact_max_gallery=exact_max_gallery, nprobe=nprobe)
    else:  # a diverged network: no distances to rank (flagged collapsed below)
        out = dict({m: float("nan") for m in metrics}, queries=0, excluded_queries=len(emb))
    with np.errstate(invalid="ignore", over="ignore"):     # non-finite: NaN, flagged below
        out.update(triplet_accuracy(emb[trip[:, 0]], emb[trip[:, 1]], emb[trip[:, 2]]))
        out["spread"] = embedding_spread(emb)
    total = max(out["total"], 1)
    out["tie_share"] = (out["correct"] - out["strict_correct"]) / total
    # is_collapsed(emb, collapse_eps), without computing the spread twice
    out["collapsed"] = bool(not np.all(np.isfinite(emb)) or out["spread"] <= collapse_eps
                            or out["tie_share"] >= TIE_COLLAPSE_SHARE)
    out["valid"] = not out["collapsed"] and out["queries"] > 0
    return out
