"""Open-set matching: a squared-L2 threshold t for an index, chosen on labelled queries
(docs/search.md, "Open set: calibrate"): precision(t) = accepted and right / accepted, recall(t) =
accepted and right / right, *right* = the nearest item has the query's class
(:func:`.search.query_classes`). ``best_f1`` takes the smallest t on ties.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .search import search_items

__all__ = ["curve", "choose_threshold", "rates", "nearest_outcomes", "calibrate",
           "MIN_ACCEPTED"]

MIN_ACCEPTED = 30    # fewer accepted calibration queries: the precision is a guess


def curve(dist: np.ndarray, right: np.ndarray) -> tuple:
    """(thresholds (T,) ascending distinct distances, precision, recall, f1), each (T,)
    float64, at every distinct distance ``dist`` (M,) as threshold; ``right`` (M,) bool."""
    dist, right = np.asarray(dist, np.float64), np.asarray(right, bool)
    order = np.argsort(dist, kind="stable")
    d, tp = dist[order], np.cumsum(right[order])
    last = np.r_[d[1:] != d[:-1], True]        # the end of each run of equal distances
    t, tp, acc = d[last], tp[last].astype(np.float64), np.arange(1, len(d) + 1)[last]
    precision, recall = tp / acc, tp / max(int(right.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    return t, precision, recall, f1


def choose_threshold(dist, right, target_precision: Optional[float] = None,
                     best_f1: bool = False) -> float:
    """The threshold by the rule of the module docstring. ValueError: no calibration
    query, or no threshold reaches ``target_precision`` (the highest one is named)."""
    if len(dist) == 0:
        raise ValueError("no calibration queries")
    t, precision, _, f1 = curve(dist, right)
    t, precision, f1 = t[np.isfinite(t)], precision[np.isfinite(t)], f1[np.isfinite(t)]
    if not t.size:
        raise ValueError("no calibration query has a neighbour at a finite distance")
    if best_f1:
        return float(t[int(np.argmax(f1))])
    ok = np.flatnonzero(precision >= target_precision)
    if not ok.size:
        raise ValueError(f"no threshold reaches precision {target_precision}: the highest is "
                         f"{precision.max():.4f}, at squared distance {t[precision.argmax()]:.6g}")
    return float(t[ok[-1]])


def rates(dist, right, threshold: float) -> dict:
    """Counts, precision, recall and F1 of accepting ``dist <= threshold`` (NaN: undefined)."""
    acc, right = np.asarray(dist) <= threshold, np.asarray(right, bool)
    tp, n_acc, n_right = int(np.count_nonzero(acc & right)), int(acc.sum()), int(right.sum())
    p, r = (tp / n if n else float("nan") for n in (n_acc, n_right))
    return {"queries": int(len(acc)), "accepted": n_acc, "right": n_right, "true_positives": tp,
            "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if tp else 0.0}


def nearest_outcomes(index, model, items, batch_size: int = 2048,
                     labels_flag: str = "--labels") -> tuple:
    """(dist (M,) nearest squared distance, right (M,) bool, notes) of labelled ``items``;
    queries that are gallery items (by id) are searched with themselves left out."""
    if items.labels is None:
        raise ValueError(f"calibration data {items.source} carry no labels (pass {labels_flag})")
    dist, pos, _, notes, _, codes = search_items(index, model, items, 1, None, batch_size)
    right = (pos[:, 0] >= 0) & (index.labels[pos[:, 0]] == codes)    # -1: no neighbour
    return dist[:, 0], right, notes


def calibrate(index, model, items, *, target_precision: Optional[float] = 0.9,
              best_f1: bool = False, holdout=None, holdout_fraction: float = 0.5, seed: int = 0,
              batch_size: int = 2048) -> dict:
    """The threshold.json document (``threshold`` in squared L2) of ``index`` calibrated on
    labelled ``items`` (:class:`.specs.Items`). ValueError: no labels, a split that
    leaves a part empty, no threshold reaching the target precision."""
    dist, right, notes = nearest_outcomes(index, model, items, batch_size)
    if holdout is not None:
        h_dist, h_right, h_notes = nearest_outcomes(index, model, holdout, batch_size,
                                                    "--holdout-labels")
        c_dist, c_right, notes = dist, right, notes + h_notes
        split = {"holdout": holdout.source}
    else:
        perm = np.random.default_rng(seed).permutation(len(dist))
        n_hold = int(round(len(dist) * holdout_fraction))
        if n_hold < 1 or n_hold >= len(dist):
            raise ValueError(f"{items.source}: {len(dist)} queries cannot be split "
                             f"{holdout_fraction} held out; pass --holdout")
        hold, cal = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
        c_dist, c_right, h_dist, h_right = dist[cal], right[cal], dist[hold], right[hold]
        split = {"holdout_fraction": holdout_fraction, "seed": seed}
    thr = choose_threshold(c_dist, c_right, target_precision, best_f1)
    cal_r, hold_r = rates(c_dist, c_right, thr), rates(h_dist, h_right, thr)
    warnings: List[str] = []
    if (copies := int(np.count_nonzero(dist == 0))) > 0.01 * len(dist) or thr == 0.0:
        warnings.append(f"warning: {copies} of {len(dist)} calibration queries copy gallery "
                        f"items (distance 0, other ids): threshold {thr:.6g} says little about "
                        "new data; calibrate on data the gallery does not hold")
    if cal_r["accepted"] < MIN_ACCEPTED:
        warnings.append(f"warning: the threshold rests on {cal_r['accepted']} accepted "
                        f"calibration queries (< {MIN_ACCEPTED}): its precision is a guess; "
                        "calibrate on more labelled data")
    if target_precision is not None and not best_f1 and not hold_r["precision"] >= target_precision:
        warnings.append(f"warning: held-out precision {hold_r['precision']:.4f} is below the "
                        f"target {target_precision} ({hold_r['accepted']} accepted)")
    return {"index_id": index.meta.index_id, "threshold": thr,
            "units": "squared L2 distance in embedding units",
            "rule": "best_f1" if best_f1 else "target_precision",
            "target_precision": None if best_f1 else target_precision, "data": items.source,
            "split": split, "calibration": cal_r, "holdout": hold_r, "warnings": warnings,
            "notes": notes}
