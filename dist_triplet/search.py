"""Query a saved index: top-k neighbours per query, with an optional picture.

    python -m dist_triplet.search --index INDEX_DIR --query fashion_mnist:test [--k 10] \\
        [--format jsonl|csv] [--out results.jsonl] [--grid grid.png] [--exclude-self]

``--query`` takes what ``--data`` of :mod:`dist_triplet.index` takes (a data set, an IDX
directory or file, a ``.npy`` of images; ``--labels`` for a file). The queries are
embedded with the model the index was built with (meta.json), or ``--model``, which must
be that model (same parameters file sha256) or the run is refused.

Output (stdout, or ``--out`` written atomically), one record per query:

* jsonl: ``{"query": id, "query_label": name|null, "prediction": name|null,
  "no_match": bool, "correct": bool|null, "neighbours": [{"rank", "id", "label",
  "sq_l2"}, ...]}``;
* csv: one row per (query, neighbour): ``query,query_label,rank,id,label,sq_l2,no_match``.

``sq_l2`` is the **squared Euclidean distance in embedding units** (the margin's units).
``prediction`` is the nearest neighbour's label; with a calibrated threshold
(``INDEX_DIR/threshold.json`` from :mod:`dist_triplet.calibrate`, or ``--threshold
FILE``) a query whose nearest neighbour is farther than it gets ``no_match: true`` and no
prediction. ``--exclude-self`` leaves out the gallery item with the query's id (searching
a gallery against itself); with labelled queries the Precision@1 over the queries is
printed on stderr, which then equals :func:`dist_triplet.metrics.retrieval_metrics`'s.

``--grid out.png``: the first ``--grid-rows`` queries, each beside its k neighbours as
thumbnails, framed green (same label) or red (different) when labels are known, with the
squared distance under each (matplotlib, Agg backend).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from .fsutil import atomic_write
from .index import Index, IndexInputError, Model, check_in_range, read_items

__all__ = ["load_threshold", "search_items", "main"]

THRESHOLD_FILE = "threshold.json"


def load_threshold(index: Index, path: Optional[str] = None) -> Optional[dict]:
    """The calibrated threshold of ``index``: ``path``, else INDEX_DIR/threshold.json, else None.

    Raises:
        IndexInputError: the file is not valid JSON, has no numeric ``threshold``, or was
            calibrated for another index (its ``index_id`` differs; both ids named).
    """
    explicit = path is not None
    path = path if explicit else os.path.join(index.dir, THRESHOLD_FILE)
    if not os.path.isfile(path):
        if explicit:
            raise IndexInputError(f"threshold file {path} does not exist")
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except ValueError as exc:
        raise IndexInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("threshold"), (int, float)) \
            or isinstance(doc.get("threshold"), bool):
        raise IndexInputError(f"{path}: expected a JSON object with a numeric 'threshold'")
    if not math.isfinite(doc["threshold"]) or doc["threshold"] < 0:
        raise IndexInputError(f"{path}: 'threshold' is {doc['threshold']!r}; expected a "
                              "finite squared distance >= 0 (re-run dist_triplet.calibrate)")
    if doc.get("index_id") != index.index_id:
        raise IndexInputError(f"{path}: calibrated for index {str(doc.get('index_id'))[:12]}, "
                              f"but {index.dir} is index {index.index_id[:12]}; calibrate "
                              "this index (python -m dist_triplet.calibrate)")
    return doc


def check_model(index: Index, model_path: Optional[str]) -> Model:
    """The index's model, or ``model_path`` if it is the same model.

    Raises:
        IndexInputError: the model's embedding width differs from the index's, or its
            parameters file is not the one the index was built with (both named).
    """
    path = model_path or index.meta["model"]["dir"]
    model = Model(path)
    if model.dim is not None and int(model.dim) != index.dim:
        raise IndexInputError(f"model {model.dir} gives {model.dim}-wide embeddings, but the "
                              f"index {index.dir} holds {index.dim}-wide ones: it was built by "
                              f"another model ({index.meta['model']['dir']})")
    if model.params_sha256 != index.meta["model"]["params_sha256"]:
        raise IndexInputError(f"model {model.dir} (params sha256 {model.params_sha256[:12]}) is "
                              f"not the one {index.dir} was built with "
                              f"({index.meta['model']['dir']}, sha256 "
                              f"{index.meta['model']['params_sha256'][:12]}); rebuild the index")
    return model


def search_items(index: Index, model: Model, items, k: int, exclude_self: bool = False,
                 batch_size: int = 2048) -> tuple:
    """Embed ``items`` and search: returns (emb (M, D) float32, dist (M, k) float32
    squared L2, pos (M, k) int64 gallery positions, {"embed_s", "search_s"} seconds).
    ``exclude_self`` leaves out the gallery item whose id is the query's id."""
    t0 = time.perf_counter()
    emb = model.embed(items.x, batch_size, desc="queries", source=items.source)
    times = {"embed_s": time.perf_counter() - t0}
    if emb.shape[1] != index.dim:
        raise IndexInputError(f"the model gives {emb.shape[1]}-wide embeddings, the index "
                              f"{index.dir} holds {index.dim}-wide ones")
    check_in_range(emb, items.source)
    exclude = None
    if exclude_self:
        where = {item: i for i, item in enumerate(index.ids)}
        exclude = np.array([where.get(item, -1) for item in items.ids], np.int64)
    t0 = time.perf_counter()
    dist, pos = index.search(emb, k, exclude)
    times["search_s"] = time.perf_counter() - t0
    return emb, dist, pos, times


def _query_label_ids(index: Index, items) -> Optional[np.ndarray]:
    """Query labels as gallery class ids, compared by class name (-2: a class the gallery
    lacks, so never equal to a neighbour's); None without query labels."""
    if items.labels is None:
        return None
    if index.class_names is None:
        return np.full(len(items.labels), -2, np.int64)
    by_name = {name: i for i, name in enumerate(index.class_names)}
    names = items.class_names
    return np.array([by_name.get(names[c], -2) for c in items.labels], np.int64)


def records(index: Index, items, dist, pos, threshold: Optional[float]) -> list:
    """One dict per query (the jsonl record of the module docstring)."""
    q_lab = _query_label_ids(index, items)
    out = []
    for i in range(len(dist)):
        nb = [{"rank": r + 1, "id": index.ids[p], "label": index.label_name(int(index.labels[p])),
               "sq_l2": float(d)} for r, (d, p) in enumerate(zip(dist[i], pos[i])) if p >= 0]
        no_match = threshold is not None and not (dist[i, 0] <= threshold)
        pred = None if no_match else nb[0]["label"]
        q_name = items.class_names[items.labels[i]] if items.labels is not None else None
        correct = None
        if q_lab is not None:
            correct = bool(not no_match and q_lab[i] == index.labels[pos[i, 0]])
        out.append({"query": items.ids[i], "query_label": q_name, "prediction": pred,
                    "no_match": bool(no_match), "correct": correct, "neighbours": nb})
    return out


def precision_at_1(index: Index, items, q_lab: np.ndarray, nearest: np.ndarray,
                   exclude_self: bool) -> tuple:
    """Share of queries whose nearest neighbour has their label, over the queries with at
    least one other gallery item of their class (as retrieval_metrics, which leaves out a
    class's only sample). Returns (precision, queries counted); NaN when none counts."""
    counts = np.bincount(index.labels[index.labels >= 0], minlength=len(index.class_names or ()))
    have = np.array([counts[c] if c >= 0 else 0 for c in q_lab], np.int64)
    if exclude_self:
        where = {item: i for i, item in enumerate(index.ids)}
        for i, item in enumerate(items.ids):
            g = where.get(item)
            if g is not None and index.labels[g] == q_lab[i]:
                have[i] -= 1
    counted = have > 0
    if not counted.any():
        return float("nan"), 0
    hit = index.labels[nearest] == q_lab
    return float(hit[counted].mean()), int(counted.sum())


def format_records(recs: list, fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in recs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "query_label", "rank", "id", "label", "sq_l2", "no_match"])
    for r in recs:
        for nb in r["neighbours"]:
            w.writerow([r["query"], r["query_label"] or "", nb["rank"], nb["id"],
                        nb["label"] or "", repr(nb["sq_l2"]), int(r["no_match"])])
    return buf.getvalue()


def _atomic_text(path: str, text: str) -> None:
    """``text`` to ``path`` via a temp file and os.replace; a path that exists and is not
    a regular file (/dev/null, a pipe) is written directly, never replaced."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w") as fh:
            fh.write(text)
        return
    with atomic_write(path) as fh:
        fh.write(text)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_triplet.search",
                                description="Top-k neighbours of queries in a saved index.")
    p.add_argument("--index", required=True, help="index directory (python -m dist_triplet.index)")
    p.add_argument("--query", required=True,
                   help="queries: a data spec as index --data, or an IDX images file / .npy")
    p.add_argument("--labels", help="labels for a file --query: IDX labels or integer .npy")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--out", help="write results here (atomically) instead of stdout")
    p.add_argument("--grid", help="PNG of queries beside their neighbours")
    p.add_argument("--grid-rows", type=int, default=8, help="queries in the --grid picture")
    p.add_argument("--model", help="model export (default: the one the index was built with)")
    p.add_argument("--threshold", help="threshold file (default INDEX_DIR/threshold.json if any)")
    p.add_argument("--exclude-self", action="store_true",
                   help="leave out the gallery item with the query's id (gallery vs itself)")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per forward pass")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on bad input)."""
    args = parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        if args.grid_rows < 1 or args.batch_size < 1:
            raise ValueError("--grid-rows and --batch-size must be >= 1")
        for path in (args.out, args.grid):
            if path is not None and (os.path.isdir(path) or
                                     not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
                raise ValueError(f"output {path}: is a directory or its directory does not exist")
        index = Index.load(args.index)
        room = len(index) - (1 if args.exclude_self else 0)
        if args.k > room:
            raise ValueError(f"--k {args.k} is larger than the gallery of {args.index} "
                             f"({len(index)} items{', one left out' if args.exclude_self else ''})")
        thr = load_threshold(index, args.threshold)
        if args.grid and index.images is None:
            raise ValueError(f"--grid needs image thumbnails, but {args.index} was built from "
                             f"non-image rows ({index.meta.get('data')})")
        model = check_model(index, args.model)
        items = read_items(args.query, model.in_units, args.labels)
        _, dist, pos, times = search_items(index, model, items, args.k, args.exclude_self,
                                    args.batch_size)
        recs = records(index, items, dist, pos, thr["threshold"] if thr else None)
        short = sum(len(r["neighbours"]) < args.k for r in recs)
        if short:
            print(f"warning: {short} of {len(recs)} queries got fewer than --k {args.k} "
                  f"neighbours: the {index.meta.get('kind')} index returned fewer candidates "
                  "(raise efSearch / nprobe when building it)", file=sys.stderr, flush=True)
        text = format_records(recs, args.format)
        if args.grid:
            from .report import neighbour_grid
            if items.image_shape is None:
                raise ValueError(f"--grid: the queries {args.query} are not image-shaped")
            rows = min(args.grid_rows, len(recs))
            q_img = items.x[:rows].reshape((rows,) + tuple(items.image_shape))
            q_lab = _query_label_ids(index, items)
            neighbour_grid(args.grid, q_img, index.images, pos[:rows], dist[:rows],
                           q_lab[:rows] if q_lab is not None else None, index.labels,
                           index.class_names,
                           no_match=[r["no_match"] for r in recs[:rows]])
        if args.out:
            _atomic_text(args.out, text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{len(recs)} queries against {len(index)} {index.meta.get('kind')} items, k={args.k}: "
          f"embed {times['embed_s']:.2f} s, search {times['search_s']:.2f} s", file=sys.stderr,
          flush=True)
    q_lab = _query_label_ids(index, items)
    if q_lab is not None:
        p1, counted = precision_at_1(index, items, q_lab, pos[:, 0], args.exclude_self)
        rejected = sum(r["no_match"] for r in recs)
        print(f"precision@1 {p1:.4f} (nearest neighbour's "
              f"label, {counted} queries with a same-class gallery item)"
              + (f"; {rejected} no match beyond sq_l2 {thr['threshold']:.6g}" if thr else ""),
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
