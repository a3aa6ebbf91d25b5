"""Search an index with data (what ``search`` and :mod:`.calibrate` share): the model
check, query classes (by name, else by id: docs/search.md, "Data specs"), leave-one-out
by item id, the records, Precision@1, the grid rows.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from typing import List, Optional, Tuple

import numpy as np

from .index import Index
from .model import Model
from .specs import _hwc

__all__ = ["THRESHOLD_FILE", "check_model", "load_threshold", "query_classes",
           "search_items", "records", "format_records", "precision_at_1", "grid_queries"]

THRESHOLD_FILE = "threshold.json"
BY_ID = "so they are compared by class id"   # query_classes' note when names did not match


def check_model(index: Index, model=None) -> Model:
    """``model`` (a :class:`Model`, an export path, or None: the index's own) if ``index``
    was built with it (or records no model) and its input is the one meta.json records;
    else ValueError naming both models (the same directory: a resumed run exported since),
    or both meta.json files (one was edited)."""
    ref, shape = index.meta.model, index.meta.image_shape
    model = model if isinstance(model, Model) else Model(model or ref.dir)
    if ref.params_sha256 and model.params_sha256 != ref.params_sha256:
        raise ValueError(f"model {model.dir} ({model.dim or '?'}-wide embeddings, params sha256 "
                         f"{model.params_sha256[:12]}) is not the one {index.dir} was built with ("
                         + ("its parameters changed since, e.g. a resumed run exported again" if
                            model.dir == ref.dir else f"{ref.dir}, {index.dim}-wide") +
                         f"; sha256 {ref.params_sha256[:12]}): rebuild the index")
    if ref.input_units and ref.input_units != model.input.units or (   # shape None: Python API
            model.input.kind is not None and shape and _hwc(shape) != model.input.image_shape):
        raise ValueError(f"{os.path.join(index.dir, 'meta.json')}: keys 'model.input_units' "
                         f"{ref.input_units} and 'image_shape' {shape} do not fit the model "
                         f"{model.dir} ({model.input.describe()}, {model.input.where}): one "
                         "of the two was edited")
    return model


def load_threshold(index: Index, path: Optional[str] = None) -> Optional[dict]:
    """The calibrated threshold of ``index``: ``path``, else INDEX_DIR/threshold.json,
    else None. ValueError: invalid JSON, no finite ``threshold`` >= 0, or calibrated
    for another index (both ids named)."""
    if path is None and not os.path.isfile(path := os.path.join(index.dir, THRESHOLD_FILE)):
        return None
    if not os.path.isfile(path):
        raise ValueError(f"threshold file {path} does not exist")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    thr = doc.get("threshold") if isinstance(doc, dict) else None
    if type(thr) not in (int, float) or not math.isfinite(thr) or thr < 0:     # bool: no
        raise ValueError(f"{path}: 'threshold' is {thr!r}; expected a finite squared "
                         "distance >= 0 (re-run dist_triplet.calibrate)")
    if doc.get("index_id") != index.meta.index_id:
        raise ValueError(f"{path}: calibrated for index {str(doc.get('index_id'))[:12]}, "
                         f"but {index.dir} is index {index.meta.index_id[:12]}; calibrate "
                         "this index (python -m dist_triplet.calibrate)")
    return doc


def query_classes(index: Index, items) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(codes (M,) int64 of the queries in the gallery's class ids, -2 for a class the
    gallery lacks; a note or None); (None, None) without query labels. ValueError:
    no query class is a gallery class, by name or by id."""
    if items.labels is None:
        return None, None
    g_names, q_names = index.class_names or (), items.class_names or ()
    by_name = {name: i for i, name in enumerate(g_names)}
    codes = np.array([by_name.get(q_names[c], -2) for c in items.labels], np.int64)
    present = set(index.labels[index.labels >= 0].tolist())
    if np.isin(codes, list(present)).any():
        lacking = int(np.count_nonzero(~np.isin(codes, list(present))))
        return codes, (f"note: {lacking} of {len(codes)} queries have a class the gallery "
                       "lacks (open set: their nearest item is always wrong)" if lacking else None)
    if len(q_names) == len(g_names) and np.isin(items.labels, list(present)).any():
        return items.labels.astype(np.int64), (
            f"note: no query class name ({', '.join(map(repr, q_names[:3]))}, ...) is a "
            f"gallery class name ({', '.join(map(repr, g_names[:3]))}, ...): both number "
            f"{len(g_names)} classes, {BY_ID}")
    mine = [q_names[c] for c in np.unique(items.labels)[:5]]
    raise ValueError(f"{items.source}: no query class is in the gallery {index.dir} "
                     f"(query classes {', '.join(map(repr, mine))}; gallery classes "
                     f"{', '.join(map(repr, g_names[:5]))}): nothing to compare")


def search_items(index: Index, model: Model, items, k: int,
                 exclude_self: Optional[bool] = False, batch_size: int = 2048) -> tuple:
    """Embed ``items``, search ``index``: (dist (M, k) float64 squared L2, pos (M, k) int64,
    {"embed_s", "search_s"}, notes for stderr, left (M,) int64 gallery item left out or -1,
    ValueError if ``model`` is not the index's (:func:`check_model`),
    codes and note first: :func:`query_classes`, ValueError if compared by id and most
    queries that are gallery items, by id or at distance 0, have another id there).
    ``exclude_self`` leaves out the query's own item, by id (True: ValueError if none; None:
    where any), unless its embedding differs by over 1e-6 of the squared norms (a namesake:
    other data under the same names, e.g. two folders of one layout; a note says so)."""
    codes, note = query_classes(index, items)
    t0 = time.perf_counter()
    emb = check_model(index, model).embed(items.x, batch_size, desc="embedding queries",
                                          source=items.source)
    times = {"embed_s": time.perf_counter() - t0}
    where = {item: i for i, item in enumerate(index.ids)}
    same = np.array([where.get(item, -1) for item in items.ids], np.int64)
    hit = np.flatnonzero(same >= 0)
    q, g = emb[hit].astype(np.float64), index.vectors()[same[hit]].astype(np.float64)
    alias = hit[((q - g) ** 2).sum(1) > 1e-6 * ((q ** 2).sum(1) + (g ** 2).sum(1))]
    same[alias] = -1
    notes = [note] * bool(note) + ([f"note: {alias.size} of {len(emb)} queries have the id of "
             f"a gallery item of {index.dir} but not its embedding (e.g. {items.ids[alias[0]]!r})"
             ": other data under the same names, searched as new items"] if alias.size else [])
    if exclude_self and not (same >= 0).any():
        raise ValueError(f"--exclude-self: no query of {items.source} is an item of {index.dir} "
                         + (f"(the {alias.size} ids they share name other embeddings, e.g. "
                            f"{items.ids[alias[0]]!r})" if alias.size else f"by id (e.g. "
                            f"{items.ids[0]!r} vs {index.ids[0]!r})") + "; index and query "
                         "the same data spec to leave one out")
    t0 = time.perf_counter()
    left = same if exclude_self is not False else np.full_like(same, -1)
    dist, pos = index.search(emb, k, left if (left >= 0).any() else None, progress="searching")
    times["search_s"] = time.perf_counter() - t0
    if exclude_self is False and (selves := int(np.count_nonzero((same >= 0) | (dist[:, 0] == 0)))):
        notes.append(f"note: {selves} of {len(emb)} queries are gallery items or exact "
                     "copies of one (distance 0): each finds itself; pass --exclude-self "
                     "to leave it out")
    own = np.where(same >= 0, same, np.where(dist[:, 0] == 0, pos[:, 0], -1))  # query's item
    if note and BY_ID in note and 2 * np.count_nonzero(
            codes[own >= 0] != index.labels[own[own >= 0]]) > np.count_nonzero(own >= 0):
        raise ValueError(f"{items.source}: {note[6:]}; but most queries that are gallery items "
                         "have another class id there: the ids mean other classes (label the "
                         "queries by the gallery's class names)")
    return dist, pos, times, notes, left, codes


def records(index: Index, items, dist, pos, codes, threshold: Optional[float]) -> List[dict]:
    """One dict per query: ``{"query", "query_label", "prediction", "no_match",
    "correct", "neighbours": [{"rank", "id", "label", "sq_l2"}, ...]}``."""
    out, names = [], index.class_names
    for i in range(len(dist)):
        nb = [{"rank": r + 1, "id": index.ids[p], "label": None if index.labels[p] < 0 or
               names is None else names[index.labels[p]], "sq_l2": float(d)}
              for r, (d, p) in enumerate(zip(dist[i], pos[i])) if p >= 0]
        no_match = threshold is not None and not dist[i, 0] <= threshold
        correct = None if codes is None else bool(
            not no_match and pos[i, 0] >= 0 and codes[i] == index.labels[pos[i, 0]])
        out.append({"query": items.ids[i], "query_label": None if items.labels is None
                    else items.class_names[items.labels[i]],
                    "prediction": None if no_match or not nb else nb[0]["label"],
                    "no_match": bool(no_match), "correct": correct, "neighbours": nb})
    return out


def format_records(recs: List[dict], fmt: str) -> str:
    """jsonl (an object a query) or csv (a row a neighbour; none: one row, those cells empty)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in recs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "query_label", "rank", "id", "label", "sq_l2", "no_match"])
    for r in recs:
        for nb in r["neighbours"] or [dict.fromkeys(("rank", "id", "label", "sq_l2"), "")]:
            w.writerow([r["query"], r["query_label"] or "", nb["rank"], nb["id"],  # str(float):
                        nb["label"] or "", nb["sq_l2"], int(r["no_match"])])       # repr's digits
    return buf.getvalue()


def precision_at_1(index: Index, codes: np.ndarray, nearest: np.ndarray,
                   left: np.ndarray) -> Tuple[float, int]:
    """(share of queries whose nearest item has their class, queries counted) over the
    queries with another gallery item of their class than ``left`` (:func:`search_items`)."""
    counts = np.bincount(index.labels[index.labels >= 0], minlength=int(codes.max(initial=0)) + 1)
    have = np.where(codes >= 0, counts[np.maximum(codes, 0)], 0)
    have -= (left >= 0) & (index.labels[np.maximum(left, 0)] == codes)
    counted, hit = have > 0, (nearest >= 0) & (index.labels[nearest] == codes)   # -1: a miss
    return float(np.mean(hit[counted])) if counted.any() else float("nan"), int(counted.sum())


def grid_queries(codes: Optional[np.ndarray], n: int, rows: int) -> np.ndarray:
    """Which of ``n`` queries the ``--grid`` picture shows: round-robin over the classes
    ``codes`` (the first query of each class, then the second, ...), else the first ``rows``."""
    if codes is None:
        return np.arange(min(rows, n))
    order = np.lexsort((np.arange(n), codes))                     # by class, then row
    starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.lexsort((codes, rank))[:rows]
