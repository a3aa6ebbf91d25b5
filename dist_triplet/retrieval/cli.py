"""The retrieval commands ``index``, ``search``, ``calibrate``, ``embed`` (docs/search.md):
bad input is one line ``error: ...`` and exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from ..fsutil import atomic_write, check_not_read, check_out, undo_made_dirs, write_json
from .index import Index, ModelRef, thumbnails
from .specs import DataOptions, read_items

__all__ = ["index_main", "search_main", "calibrate_main", "embed_main"]


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new option's dest and says so once on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.metavar}",
              file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def _parser(name: str, description: str, batch_size: int = 2048,
            old_format: bool = True) -> argparse.ArgumentParser:
    """A parser with ``--force``, ``--batch-size`` and the data options; its usage names
    the command as invoked (``dist-triplet-NAME`` or ``python -m dist_triplet.NAME``)."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    prog = script if script == f"dist-triplet-{name}" else f"python -m dist_triplet.{name}"
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--batch-size", type=int, default=batch_size, help="rows per forward pass")
    g = p.add_argument_group("data path options (data.* keys, as the trainer reads them)")
    formats = ("auto", "idx", "npz", "folder", "csv")
    g.add_argument("--data-format", choices=formats, help="data.format of a data path "
                   "(default: auto-detected)")
    if old_format:
        g.add_argument("--format", dest="data_format", choices=formats, action=_Deprecated,
                       metavar="--data-format", help=argparse.SUPPRESS)
    g.add_argument("--mode", choices=("L", "RGB"),
                   help="data.mode of image files (default: the model's channels)")
    g.add_argument("--image-size", help="data.image_size of image files: H,W or one int "
                   "(default: the model's image size)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any data.* key, e.g. --set split=classes (repeatable); applies to a "
                        "run's data section too")
    return p


def _options(args) -> DataOptions:
    size = args.image_size
    return DataOptions(args.data_format, args.mode,
                       f"[{size}]" if size is not None and "," in size else size, tuple(args.set))


def _at_least(args, **lows: int) -> None:
    for name, low in lows.items():
        if (value := getattr(args, name)) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _run(body, args) -> int:
    try:
        with undo_made_dirs():          # a failed command leaves no directory it made
            return body(args)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


_SPEC_HELP = ("RUN_DIR[:train|:test|:all] (the run's own data), a config .yaml[:split], "
              "fashion_mnist[:split], mnist[:split], a data path (image folder, .csv, .npz, "
              "IDX directory)[:split], or an IDX images file / .npy (default split test)")


def index_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_triplet.index``; returns the exit status (0, or 2 on bad input)."""
    p = _parser("index", "Embed a gallery and save a faiss index of it.")
    p.add_argument("--model", required=True, help="export directory (RUN/model) or run dir")
    p.add_argument("--data", required=True, help="gallery: " + _SPEC_HELP)
    p.add_argument("--labels", help="labels for a file --data: IDX labels or integer .npy")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--kind", choices=("flat", "hnsw", "ivf"), default="flat",
                   help="flat = exact (default); hnsw / ivf = approximate")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=64, help="hnsw efSearch")
    p.add_argument("--nprobe", type=int, default=16, help="ivf lists probed per query")
    p.add_argument("--no-thumbnails", action="store_true",
                   help="store no images.npy (thumbnails for search --grid)")
    return _run(_index, p.parse_args(argv))


def _index(args) -> int:
    from .model import Model
    _at_least(args, batch_size=1, hnsw_m=2, ef_search=1, nprobe=1)    # faiss HNSW: M >= 2
    check_out(args.out, args.force, file=False)                   # before any work
    t0 = time.perf_counter()
    model = Model(args.model)
    items = read_items(args.data, model.input, args.labels, _options(args))
    check_not_read(args.out, "--out", files=items.reads)      # inside an image folder, ...
    emb = model.embed(items.x, args.batch_size, source=items.source)
    t_embed = time.perf_counter() - t0
    images = None if items.image_shape is None or args.no_thumbnails else \
        thumbnails(items.x, items.image_shape)
    index = Index.build(emb, items.labels, items.ids, items.class_names, kind=args.kind,
                        images=images, data=items.source, hnsw_m=args.hnsw_m,
                        ef_search=args.ef_search, nprobe=args.nprobe,
                        model=ModelRef(model.dir, model.params_sha256, model.input.units))
    index.meta.input, index.meta.time_embed_s = items.kind, round(t_embed, 3)
    index.meta.image_shape = None if items.image_shape is None else list(items.image_shape)
    if r := index.meta.recall:
        print(f"{args.kind} index: recall@{r['k']} {r['recall_at_k']:.4f} against exact "
              f"search ({r['queries']} gallery items as queries; {index.meta.params})", flush=True)
    index.save(args.out, force=args.force)
    print(f"wrote {args.out}: {args.kind} index of {len(emb)} x {emb.shape[1]} embeddings of "
          f"{items.source} (embed {t_embed:.2f} s, build {index.meta.time_build_s:.2f} s, id "
          f"{index.meta.index_id[:12]})", flush=True)
    return 0


def search_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_triplet.search``; returns the exit status (0, or 2 on bad input)."""
    p = _parser("search", "Top-k neighbours of queries in a saved index.", old_format=False)
    p.add_argument("--index", required=True, help="index directory (python -m dist_triplet.index)")
    p.add_argument("--query", "--data", dest="query", required=True, help="queries: " + _SPEC_HELP)
    p.add_argument("--labels", help="labels for a file --query: IDX labels or integer .npy")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--out-format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--format", dest="out_format", choices=("jsonl", "csv"), action=_Deprecated,
                   metavar="--out-format", help=argparse.SUPPRESS)
    p.add_argument("--out", help="write results here (atomically) instead of stdout")
    p.add_argument("--grid", help="PNG of queries (from every class) beside their neighbours")
    p.add_argument("--grid-rows", type=int, default=8, help="queries in the --grid picture")
    p.add_argument("--model", help="model export (default: the one the index was built with)")
    p.add_argument("--threshold", help="threshold file (default INDEX_DIR/threshold.json if any)")
    p.add_argument("--exclude-self", action="store_true",
                   help="leave out the gallery item with the query's id (gallery vs itself)")
    return _run(_search, p.parse_args(argv))


def _search(args) -> int:
    from . import search as s
    _at_least(args, k=1, grid_rows=1, batch_size=1)
    check_out(args.out, args.force)
    check_out(args.grid, args.force, "--grid")
    if args.out and args.grid and os.path.abspath(args.out) == os.path.abspath(args.grid):
        raise ValueError(f"--out and --grid are both {args.out}: give two files")
    if args.grid and not args.grid.lower().endswith(".png"):
        raise ValueError(f"--grid {args.grid}: the grid is a PNG; name a .png file")
    index = Index.load(args.index)
    if args.k > len(index) - args.exclude_self:
        raise ValueError(f"--k {args.k} is larger than the gallery of {args.index} ({len(index)} "
                         f"items{', one left out' if args.exclude_self else ''})")
    thr = s.load_threshold(index, args.threshold)
    model = s.check_model(index, args.model)
    items = read_items(args.query, model.input, args.labels, _options(args))
    for out, flag in ((args.out, "--out"), (args.grid, "--grid")):
        check_not_read(out, flag, index.dir, model.dir, files=items.reads + (args.threshold,))
    dist, pos, times, notes, left, codes = s.search_items(index, model, items, args.k,
                                                          args.exclude_self, args.batch_size)
    recs = s.records(index, items, dist, pos, codes, thr["threshold"] if thr else None)
    if short := sum(len(r["neighbours"]) < args.k for r in recs):
        notes.append(f"warning: {short} of {len(recs)} queries got fewer than --k {args.k} "
                     f"neighbours: the {index.meta.kind} index returned fewer candidates "
                     "(raise efSearch / nprobe when building it)")
    if args.grid:
        from ..pictures import neighbour_grid
        rows = s.grid_queries(codes, len(recs), args.grid_rows)
        pictures = items.image_shape is not None and index.images is not None
        neighbour_grid(args.grid, thumbnails(items.x[rows], items.image_shape) if pictures
                       else None, index.images if pictures else None, pos[rows], dist[rows],
                       None if codes is None else codes[rows], index.labels, index.class_names,
                       no_match=[recs[i]["no_match"] for i in rows],
                       query_ids=[items.ids[i] for i in rows], gallery_ids=index.ids,
                       title=None if pictures else "no thumbnails (feature rows or an index "
                       "without images.npy): queries (left) and nearest neighbours by id, "
                       "class and squared L2 distance")
    text = s.format_records(recs, args.out_format)
    if args.out:
        with atomic_write(args.out) as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    for line in notes:
        print(line, file=sys.stderr, flush=True)
    print(f"{len(recs)} queries against {len(index)} {index.meta.kind} items, k={args.k}: "
          f"embed {times['embed_s']:.2f} s, search {times['search_s']:.2f} s",
          file=sys.stderr, flush=True)
    if codes is not None:
        p1, counted = s.precision_at_1(index, codes, pos[:, 0], left)
        rejected = sum(r["no_match"] for r in recs)
        print(f"precision@1 {p1:.4f} (nearest neighbour's label, {counted} queries with a "
              "same-class gallery item)" + (f"; {rejected} no match beyond sq_l2 "
                                            f"{thr['threshold']:.6g}" if thr else ""),
              file=sys.stderr, flush=True)
    return 0


def calibrate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_triplet.calibrate``; returns the exit status (0, or 2 on bad input)."""
    p = _parser("calibrate", "Choose and store a match threshold for an index.")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--data", required=True, help="labelled calibration data: " + _SPEC_HELP)
    p.add_argument("--labels", help="labels for a file --data: IDX labels or integer .npy")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-precision", type=float, default=0.9,
                      help="largest threshold with at least this precision (default 0.9)")
    rule.add_argument("--best-f1", action="store_true", help="threshold of highest F1")
    p.add_argument("--holdout", help="separate held-out data (a data spec)")
    p.add_argument("--holdout-labels", help="labels for a file --holdout")
    p.add_argument("--holdout-fraction", type=float,
                   help="share of --data held out when --holdout is not given (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")
    p.add_argument("--model", help="model export (default: the index's)")
    p.add_argument("--out", help="threshold file to write (default INDEX_DIR/threshold.json)")
    return _run(_calibrate, p.parse_args(argv))


def _calibrate(args) -> int:
    from .calibrate import calibrate
    from .search import THRESHOLD_FILE, check_model
    target = None if args.best_f1 else args.target_precision
    if target is not None and not 0.0 < target <= 1.0:
        raise ValueError(f"--target-precision must be in (0, 1], got {target}")
    if args.holdout is None and args.holdout_labels is not None \
            or args.holdout is not None and args.holdout_fraction is not None:
        raise ValueError("--holdout-labels goes with --holdout; --holdout-fraction without it")
    if not 0.0 < (frac := 0.5 if args.holdout_fraction is None else args.holdout_fraction) < 1:
        raise ValueError(f"--holdout-fraction must be in (0, 1), got {frac}")
    _at_least(args, seed=0)
    index = Index.load(args.index)
    out = os.path.join(index.dir, THRESHOLD_FILE) if args.out is None else args.out
    check_out(out, args.force, "--out" if args.out is not None else "threshold file")
    model = check_model(index, args.model)
    items = read_items(args.data, model.input, args.labels, _options(args))
    held = None if args.holdout is None else read_items(
        args.holdout, model.input, args.holdout_labels, _options(args))
    dirs = (model.dir,) if os.path.basename(out) == THRESHOLD_FILE else (index.dir, model.dir)
    check_not_read(out, "--out", *dirs, files=items.reads + (held.reads if held else ()))
    doc = calibrate(index, model, items, target_precision=target, best_f1=args.best_f1,
                    holdout=held, holdout_fraction=frac, seed=args.seed,
                    batch_size=args.batch_size)
    write_json(out, doc)
    for line in doc["notes"] + doc["warnings"]:
        print(line, file=sys.stderr, flush=True)
    rule = "best F1" if args.best_f1 else f"target precision {target}"
    print(f"threshold {doc['threshold']:.6g} (squared L2, {rule}) -> {out}")
    for name, r in (("calibration", doc["calibration"]), ("held-out", doc["holdout"])):
        print(f"  {name}: {r['queries']} queries, precision {r['precision']:.4f} recall "
              f"{r['recall']:.4f} F1 {r['f1']:.4f} ({r['accepted']} accepted, {r['right']} "
              "with a right nearest item)", flush=True)
    return 0


def embed_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_triplet.embed``; returns the exit status (0, or 2 on bad input)."""
    p = _parser("embed", "Embed images with a model exported by dist_triplet training.", 1024)
    p.add_argument("--model", required=True, help="export directory (RUN/model) or run dir")
    p.add_argument("--input", required=True, help="rows to embed: " + _SPEC_HELP)
    p.add_argument("--out", help="output .npy, (N, D) float32 (required)")
    p.add_argument("--output", dest="out", action=_Deprecated, metavar="--out",
                   help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu, or gpu (GPU 0)")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("the following arguments are required: --out")
    return _run(_embed, args)


def _embed(args) -> int:
    import mxnet as mx

    from .model import Model
    _at_least(args, batch_size=1)
    check_out(args.out, args.force)
    if args.device == "gpu" and mx.context.num_gpus() == 0:
        raise ValueError("--device gpu, but MXNet sees no GPU")
    model = Model(args.model, mx.gpu(0) if args.device == "gpu" else mx.cpu())
    items = read_items(args.input, model.input, None, _options(args))
    check_not_read(args.out, "--out", model.dir, files=items.reads)
    emb = model.embed(items.x, args.batch_size, source=args.input)
    with atomic_write(args.out, "wb") as fh:
        np.save(fh, emb)
    print(f"wrote {args.out}: {emb.shape[0]} x {emb.shape[1]} float32 embeddings of "
          f"{args.input}", flush=True)
    return 0
