"""Open-set matching: choose a distance threshold for an index, store it with the index.

    python -m dist_triplet.calibrate --index INDEX_DIR --data fashion_mnist:test \\
        [--target-precision 0.9 | --best-f1] [--holdout SPEC | --holdout-fraction 0.5 --seed 0]

The decision is "the nearest gallery item is within the threshold => the query is of its
class". Each labelled calibration query gives its nearest gallery item's squared distance
``d`` (embedding units) and whether that item has the query's class (compared by class
name). At threshold ``t``, queries with ``d <= t`` are accepted:

    precision(t) = accepted and right / accepted
    recall(t)    = accepted and right / right      (right: nearest item has the class)

so a query of a class the gallery lacks, or one whose nearest item is of another class, is
a true negative when rejected. This is TensorFlow Similarity's ``calibrate`` for its
``match_nearest`` strategy (precision / recall over the matches).

``--target-precision P`` (default 0.9) picks the largest ``t`` among the calibration
distances whose precision is at least P (the most recall at that precision);
``--best-f1`` the ``t`` of highest F1 (the smallest such ``t`` on ties). The threshold is
the calibration distance itself, so it reproduces the calibration counts exactly.

Held-out check: the calibration data are split by a seeded permutation (``--seed``)
into a part that chooses ``t`` and a held-out part (``--holdout-fraction``, default 0.5)
where precision and recall at ``t`` are reported; or ``--holdout SPEC`` gives separate
data and all of ``--data`` chooses. A query whose id is a gallery item's id (the gallery
itself used for calibration) is searched with that item left out.

``INDEX_DIR/threshold.json`` (written atomically) records the threshold, the rule, both
parts' precision / recall and the index's ``index_id``; :mod:`dist_triplet.search` refuses
a threshold file whose ``index_id`` is not its index's.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from .fsutil import write_json
from .index import Index, read_items
from .search import THRESHOLD_FILE, _query_label_ids, check_model, search_items

__all__ = ["curve", "choose_threshold", "rates", "nearest_outcomes", "main"]


def curve(dist: np.ndarray, right: np.ndarray) -> tuple:
    """Precision, recall and F1 at every distinct distance as threshold.

    Args:
        dist: (M,) nearest-neighbour squared distances; right: (M,) bool.

    Returns:
        (thresholds (T,) ascending distinct distances, precision (T,), recall (T,), f1 (T,))
        float64; recall and F1 are 0 when no query is right.
    """
    dist = np.asarray(dist, np.float64)
    right = np.asarray(right, bool)
    order = np.argsort(dist, kind="stable")
    d, r = dist[order], right[order]
    tp = np.cumsum(r)
    acc = np.arange(1, len(d) + 1)
    last = np.r_[d[1:] != d[:-1], True]       # the end of each run of equal distances
    t, tp, acc = d[last], tp[last].astype(np.float64), acc[last].astype(np.float64)
    total = max(int(right.sum()), 1)
    precision = tp / acc
    recall = tp / total
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    return t, precision, recall, f1


def choose_threshold(dist: np.ndarray, right: np.ndarray, target_precision: Optional[float] = None,
                     best_f1: bool = False) -> float:
    """The threshold (squared distance) by the rule of the module docstring.

    Raises:
        ValueError: no calibration query, or no threshold reaches ``target_precision``
            (the message gives the highest precision reachable).
    """
    if len(dist) == 0:
        raise ValueError("no calibration queries")
    t, precision, _, f1 = curve(dist, right)
    if best_f1:
        return float(t[int(np.argmax(f1))])
    ok = np.flatnonzero(precision >= target_precision)
    if not ok.size:
        raise ValueError(f"no threshold reaches precision {target_precision}: the highest is "
                         f"{precision.max():.4f}, at squared distance {t[precision.argmax()]:.6g}")
    return float(t[ok[-1]])


def rates(dist: np.ndarray, right: np.ndarray, threshold: float) -> dict:
    """Counts, precision, recall and F1 of accepting ``dist <= threshold``."""
    acc = np.asarray(dist) <= threshold
    right = np.asarray(right, bool)
    tp = int(np.count_nonzero(acc & right))
    n_acc, n_right = int(acc.sum()), int(right.sum())
    p = tp / n_acc if n_acc else float("nan")
    r = tp / n_right if n_right else float("nan")
    f1 = 2 * p * r / (p + r) if n_acc and n_right and tp else 0.0
    return {"queries": int(len(acc)), "accepted": n_acc, "right": n_right, "true_positives": tp,
            "precision": p, "recall": r, "f1": f1}


def nearest_outcomes(index: Index, model, items, batch_size: int = 2048,
                     labels_flag: str = "--labels") -> tuple:
    """(dist (M,) float32 nearest squared distance, right (M,) bool) of labelled ``items``;
    a query whose id is in the gallery is searched with that item left out. ``labels_flag``
    names the option that gives ``items`` labels, for the error when they have none."""
    if items.labels is None:
        raise ValueError(f"calibration data {items.source} carry no labels "
                         f"(pass {labels_flag})")
    exclude_self = bool(set(items.ids) & set(index.ids))
    _, dist, pos, _ = search_items(index, model, items, 1, exclude_self, batch_size)
    q_lab = _query_label_ids(index, items)
    return dist[:, 0], index.labels[pos[:, 0]] == q_lab


def _finite(v):
    return None if isinstance(v, float) and not np.isfinite(v) else v


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_triplet.calibrate",
                                description="Choose and store a match threshold for an index.")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--data", required=True, help="labelled calibration data (a data spec)")
    p.add_argument("--labels", help="labels for a file --data: IDX labels or integer .npy")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-precision", type=float, default=None,
                      help="largest threshold with at least this precision (default 0.9)")
    rule.add_argument("--best-f1", action="store_true", help="threshold of highest F1")
    p.add_argument("--holdout", help="separate held-out data (a data spec)")
    p.add_argument("--holdout-labels", help="labels for a file --holdout")
    p.add_argument("--holdout-fraction", type=float, default=0.5,
                   help="share of --data held out when --holdout is not given (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")
    p.add_argument("--model", help="model export (default: the index's)")
    p.add_argument("--batch-size", type=int, default=2048)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on bad input)."""
    args = parse_args(argv)
    try:
        target = args.target_precision
        if target is None and not args.best_f1:
            target = 0.9
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(f"--target-precision must be in (0, 1], got {target}")
        if args.holdout is None and not 0.0 < args.holdout_fraction < 1.0:
            raise ValueError(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        index = Index.load(args.index)
        model = check_model(index, args.model)
        items = read_items(args.data, model.in_units, args.labels)
        dist, right = nearest_outcomes(index, model, items, args.batch_size)
        if args.holdout is not None:
            held = read_items(args.holdout, model.in_units, args.holdout_labels)
            h_dist, h_right = nearest_outcomes(index, model, held, args.batch_size,
                                               "--holdout-labels")
            c_dist, c_right = dist, right
            split = {"holdout": held.source}
        else:
            perm = np.random.default_rng(args.seed).permutation(len(dist))
            n_hold = int(round(len(dist) * args.holdout_fraction))
            if n_hold < 1 or n_hold >= len(dist):
                raise ValueError(f"--data {args.data}: {len(dist)} queries cannot be split "
                                 f"{args.holdout_fraction} held out; pass --holdout")
            hold, cal = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
            c_dist, c_right, h_dist, h_right = dist[cal], right[cal], dist[hold], right[hold]
            split = {"holdout_fraction": args.holdout_fraction, "seed": args.seed}
        thr = choose_threshold(c_dist, c_right, target, args.best_f1)
        cal_r, hold_r = rates(c_dist, c_right, thr), rates(h_dist, h_right, thr)
        doc = {"index_id": index.index_id, "threshold": thr,
               "units": "squared L2 distance in embedding units",
               "rule": "best_f1" if args.best_f1 else "target_precision",
               "target_precision": target, "data": items.source, "split": split,
               "calibration": {k: _finite(v) for k, v in cal_r.items()},
               "holdout": {k: _finite(v) for k, v in hold_r.items()}}
        write_json(os.path.join(index.dir, THRESHOLD_FILE), doc)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    rule = "best F1" if args.best_f1 else f"target precision {target}"
    print(f"threshold {thr:.6g} (squared L2, {rule}) -> {os.path.join(index.dir, THRESHOLD_FILE)}")
    for name, r in (("calibration", cal_r), ("held-out", hold_r)):
        print(f"  {name}: {r['queries']} queries, precision {r['precision']:.4f} recall "
              f"{r['recall']:.4f} F1 {r['f1']:.4f} ({r['accepted']} accepted, {r['right']} "
              f"with a right nearest item)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
