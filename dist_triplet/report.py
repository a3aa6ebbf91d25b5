"""Pictures of a run and of a search: the end-of-run report and neighbour grids (matplotlib).

:func:`write_report` writes ``RUN/report/`` (rank 0, at the end of a run):

    curves.png       loss, learning rate, seed triplet accuracy, P@1, R-Precision, MAP@R
                     per epoch, each panel on its own scale; raw-pixel values dashed
    distances.png    squared L2 of sampled same-class / other-class test pairs, and each
                     query's nearest-neighbour distance, hit or miss; the calibrated
                     threshold drawn when ``RUN/index/threshold.json`` exists
    confusion.png    which class each query class's nearest neighbour comes from
    pca_raw.png      2-D PCA of the raw inputs, coloured by class, legend of class names
    pca_learned.png  the same for the learned embeddings (the seed article's two pictures)
    neighbours.png   fixed test queries (the first test item of each class, up to
                     ``MAX_QUERY_ROWS`` classes; the title says when capped) and their
                     nearest neighbours among the other test items, framed green / red;
                     for feature data (no image shape) text tiles: test row, class, distance
    report.html      the metrics table, a plain sentence when the learned embedding
                     retrieves worse than the raw pixels, Precision@1 per class (worst
                     first) and these pictures, all by relative path

The numbers behind distances, classes and confusion: :mod:`dist_triplet.diagnostics`.
PCA (eigenvectors of the scatter matrix, i.e. a thin SVD) of a fixed random subsample
(``points``, default 2,000) centred on its mean. The report is part of the end-of-run
budget of 3 s (docs/benchmark.md); on the main job's 10,000 test items it costs 3.5-3.7 s
CPU on the 2 loaded cores here, ~1.7 s by the quiet-machine ratio (docs/search.md has the
split). Only the Agg backend is used: no display needed.

``python -m dist_triplet.report RUN [--index DIR]`` draws the report again (:func:`main`).
"""
from __future__ import annotations

import html
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np

from .fsutil import atomic_dir
from .pictures import _GREEN, _GREY, _RED, neighbour_grid, pyplot as _pyplot

__all__ = ["neighbour_grid", "neighbour_queries", "pca_2d", "write_report", "REPORT_FILES",
           "MAX_QUERY_ROWS"]

REPORT_FILES = ("curves.png", "distances.png", "confusion.png", "pca_raw.png",
                "pca_learned.png", "neighbours.png", "report.html")
MAX_QUERY_ROWS = 12   # rows of neighbours.png: Fashion-MNIST's 10 classes fit, 100 would not


def pca_2d(x: np.ndarray, points: int = 2000, seed: int = 0) -> tuple:
    """2-D PCA of a fixed subsample: returns (coords (m, 2) float64, rows (m,) int64).

    ``m = min(points, N)`` rows drawn without replacement by ``default_rng(seed)`` (sorted);
    coordinates are the centred rows times the top two eigenvectors of their (F, F)
    scatter matrix (= the top right singular vectors of a thin SVD, at a quarter of its
    cost for 2,000 x 784: one GEMM and ``eigh``), signs fixed so that each axis's largest
    loading is positive (deterministic pictures).
    """
    n = len(x)
    rows = np.arange(n) if n <= points else np.sort(
        np.random.default_rng(seed).choice(n, size=points, replace=False))
    sub = np.asarray(x[rows], dtype=np.float64)
    sub = sub - sub.mean(axis=0)
    if sub.shape[1] < 2:
        sub = np.pad(sub, ((0, 0), (0, 2 - sub.shape[1])))
    if sub.shape[1] <= sub.shape[0]:
        vals, vecs = np.linalg.eigh(sub.T @ sub)           # ascending eigenvalues
        top = vecs[:, np.argsort(vals)[::-1][:2]]           # (F, 2)
    else:
        # Wider than tall (e.g. 64 x 64 x 3 images): the (m, m) Gram matrix has the same
        # non-zero eigenvalues, and its eigenvectors u give the scatter matrix's as
        # sub.T u / sqrt(val): O(m^2 F), where the (F, F) eigh is O(F^3) (minutes at F=12,288).
        vals, u = np.linalg.eigh(sub @ sub.T)
        order = np.argsort(vals)[::-1][:2]
        scale = np.sqrt(vals[order])
        top = np.divide(sub.T @ u[:, order], scale, out=np.zeros((sub.shape[1], 2)),
                        where=scale > 0)
    top *= np.sign(top[np.abs(top).argmax(axis=0), np.arange(2)])
    return sub @ top, rows


def _plot_pca(path: str, coords, labels, class_names, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.8))
    from matplotlib.lines import Line2D
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    # One scatter in row order (no class drawn over all others; a third of the time of one
    # scatter per class), and a legend entry per class present.
    ax.scatter(coords[:, 0], coords[:, 1], s=4, color=cmap(labels % cmap.N))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(handles=[Line2D([], [], ls="", marker="o", ms=4, color=cmap(int(c) % cmap.N),
                              label=str(class_names[c]) if c < len(class_names) else str(c))
                       for c in np.unique(labels)],
              fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    # Fixed margins clipped "PC 2" behind wide tick labels (-2000): the tight bounding box
    # keeps every label (one extra draw, ~0.1 s; tight_layout would be slower).
    fig.subplots_adjust(left=0.12, right=0.75, bottom=0.1, top=0.93)
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


# Panels of curves.png: (metrics.json key, title); each on its own scale, so that a P@1
# moving from 0.75 to 0.79 is not flattened on a 0-1 axis shared with MAP@R 0.3.
_CURVES = (("loss", "training loss (mean triplet loss)"), ("lr", "learning rate"),
           ("seed_accuracy", "seed triplet accuracy"), ("precision_at_1", "Precision@1"),
           ("r_precision", "R-Precision"), ("map_at_r", "MAP@R"))


def _plot_curves(path: str, doc: dict) -> None:
    """Six small panels, one per key of ``_CURVES``, each scaled to its own values and
    the raw-pixel value (dashed) when metrics.json has one."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    rows = doc.get("epochs") or []
    raw = doc.get("raw_pixels") or {}
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), sharex=True)
    epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int)]
    if epochs:      # every panel spans every epoch, also R-Precision's single last point
        axes[0, 0].set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    for ax, (key, title) in zip(axes.ravel(), _CURVES):
        pts = [(r["epoch"], r[key]) for r in rows
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, color="#1b9e77" if key != "loss" else "black",
                    label="learned")
        if isinstance(raw.get(key), (int, float)):
            ax.axhline(raw[key], color="#d95f02", ls="--", lw=1.2,
                       label=f"raw pixels {raw[key]:.4f}")
            ax.legend(fontsize=7, loc="best", frameon=False)
        if not pts and key not in raw:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                    transform=ax.transAxes, color=_GREY)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs: no 1.5
        ax.tick_params(labelsize=7)
        ax.margins(y=0.15)
    for ax in axes[1]:
        ax.set_xlabel("epoch", fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.09, top=0.93, hspace=0.38,
                        wspace=0.25)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_distances(path: str, same: np.ndarray, other: np.ndarray,
                    threshold: Optional[float], source: str) -> None:
    """Histograms of squared L2 between sampled same-class and other-class test pairs,
    with the calibrated threshold (``calibrate``: "nearest within it => same class")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    every = np.concatenate([same, other])
    top = float(np.percentile(every, 99.5)) if len(every) else 1.0
    if threshold is not None:
        top = max(top, 1.1 * threshold)
    bins = np.linspace(0.0, top if top > 0 else 1.0, 61)
    for values, label, colour in ((same, "same class", _GREEN), (other, "other class", _RED)):
        if len(values):
            ax.hist(np.clip(values, 0, bins[-1]), bins=bins, histtype="stepfilled",
                    alpha=0.45, color=colour, density=True,
                    label=f"{label} ({len(values):,} pairs)")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.2,
                   label=f"match threshold {threshold:.4g}" + (f" ({source})" if source else ""))
    ax.set_title("distances between test items: the more the two overlap, the less a "
                 "distance says", fontsize=9)
    ax.set_xlabel("squared L2 distance in embedding units (last bin: beyond)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.14, top=0.9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_confusion(path: str, matrix: np.ndarray, class_names: Sequence[str]) -> None:
    """Row-normalised (C, C) matrix in percent of the row (colours, colour bar and cells
    alike): row = query class, column = class of its nearest other test item; the
    numbers in the cells up to 15 classes, names up to 40."""
    plt = _pyplot()
    c = matrix.shape[0]
    pct = 100 * matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(9.0, 3.0 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    if c <= 40:
        names = [str(n) for n in class_names[:c]]
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(j, i, f"{pct[i, j]:.0f}" if pct[i, j] >= 0.5 else "<1",
                            ha="center", va="center", fontsize=6.5,
                            color="white" if pct[i, j] > 60 else "black")
    ax.set_xlabel("class of the nearest other test item", fontsize=8)
    ax.set_ylabel("query class", fontsize=8)
    ax.set_title("where each class's nearest neighbour comes from (% of the row)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("% of the row", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def _fmt(v, key: str = "") -> str:
    """A table cell: throughputs (``*_per_s``) as whole numbers with thousands separators
    (24,665), other floats to 4 decimals, anything else as text."""
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, (int, float)) and key.endswith("_per_s"):
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def worse_than_raw(doc: dict, raw_name: str = "raw pixels",
                   config: Optional[dict] = None) -> str:
    """The sentence saying that the learned embedding retrieves worse than the raw inputs
    (final Precision@1 below metrics.json's ``raw_pixels`` one), or "" when it does not;
    what to try next follows from the run's ``config`` (its config.yaml; None: all of it):
    online mining unless the run mined, more epochs, a convolutional backbone on images
    unless it had one (the recipes and their numbers: docs/results.md)."""
    learned = (doc.get("final") or {}).get("precision_at_1")
    raw = (doc.get("raw_pixels") or {}).get("precision_at_1")
    if not all(isinstance(v, float) and math.isfinite(v) for v in (learned, raw)) \
            or learned >= raw:
        return ""
    sampler, train, model = ((config or {}).get(k) or {} for k in ("sampler", "train", "model"))
    epochs = train.get("epochs")
    tips = [] if sampler.get("kind") == "pk" else [
        "online mining, the recipe of configs/fashion_mnist_mining.yaml (sampler.kind: pk, "
        "semi-hard negatives, normalised embeddings), which beats the raw pixels there"]
    tips.append(f"more epochs (train.epochs={2 * epochs}; this run had {epochs})"
                if isinstance(epochs, int) else "more epochs (train.epochs)")
    if raw_name == "raw pixels" and model.get("backbone", "mlp") == "mlp":
        tips.append("a convolutional backbone (model.backbone: convnet, as in "
                    "configs/fashion_mnist_conv.yaml)")
    return (f"The learned embedding retrieves worse than the {raw_name}: Precision@1 "
            f"{learned:.4f} against {raw:.4f} for a nearest-neighbour search on the "
            f"{raw_name} themselves, so for finding an item of the same class this model "
            "is not yet better than no model. Other metrics (R-Precision, MAP@R, the seed "
            "triplet accuracy) can still be higher. Try " + "; ".join(tips)
            + " (docs/results.md).")


def _run_config(run_dir: str) -> Optional[dict]:
    """``run_dir/config.yaml`` as a dict, or None when it is missing or unreadable."""
    import yaml
    try:
        with open(os.path.join(run_dir, "config.yaml")) as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def _class_table(rows: Sequence, class_names: Sequence[str], shown: int = 20) -> str:
    """The per-class table (diagnostics.ClassRow, worst first), at most ``shown`` lines."""
    from .diagnostics import class_names_of
    lines = "\n".join(
        f"<tr><td>{html.escape(class_names_of(class_names, r.label))}</td><td>{r.queries}</td>"
        f"<td>{r.precision_at_1:.4f}</td><td>"
        + (f"{html.escape(class_names_of(class_names, r.confused_with))} "
           f"({r.confused_share:.1%})" if r.confused_with is not None else "")
        + "</td></tr>" for r in rows[:shown])
    more = (f"<p>… and {len(rows) - shown} more classes (the {shown} worst are shown).</p>"
            if len(rows) > shown else "")
    return ("<table id=\"per-class\"><tr><th>class</th><th>queries</th><th>Precision@1</th>"
            f"<th>most misses go to (share of queries)</th></tr>\n{lines}\n</table>{more}")


def _html(doc: dict, images: Sequence[tuple], *, note: str = "", warning: str = "",
          classes: str = "", search: str = "", config: Optional[dict] = None) -> str:
    final = doc.get("final") or {}
    raw = doc.get("raw_pixels") or {}
    config = config or {}
    # A P x K run's rows are images; the queries and gallery are the run's eval.* keys.
    unit = "images" if (config.get("sampler") or {}).get("kind") == "pk" else "triplets"
    ev, n = config.get("eval") or {}, final.get("queries")
    queries = (f"{n:,} test items as queries" if isinstance(n, int) else "the test items as "
               "queries") + (" (a seeded sample)" if ev.get("max_queries") else "") + (
        ", each searched in the training set" if ev.get("gallery") == "train" else
        ", each searched among the other test items (leave-one-out)")
    keys = [("seed_accuracy", "seed triplet accuracy"), ("precision_at_1", "Precision@1"),
            ("r_precision", "R-Precision"), ("map_at_r", "MAP@R"), ("loss", "final loss"),
            ("spread", "embedding spread"), ("collapsed", "collapsed"),
            ("triplets_per_s", f"{unit}/s (last epoch)")]
    rows = "\n".join(
        f"<tr><td>{label}</td><td>{_fmt(final.get(key), key)}</td>"
        f"<td>{_fmt(raw.get(key), key) if key in raw else ''}</td></tr>"
        for key, label in keys if key in final or key in raw)
    figs = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(cap)}">'
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>"
                     for f, cap in images)
    note = f"<p>{html.escape(note)}</p>" if note else ""
    warning = f'<p class="warn" id="worse-than-raw">{html.escape(warning)}</p>' if warning else ""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dist_triplet run report</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}
td:first-child{{text-align:left}}figure{{display:inline-block;margin:.5em;vertical-align:top}}
img{{max-width:100%}}.warn{{background:#fde0dc;padding:.5em;border-left:4px solid #d73027}}</style></head>
<body><h1>dist_triplet run report</h1>
<p>Written {when} (at the end of the run, or again by
<code>python -m dist_triplet.report</code>), in the run directory's <code>report/</code>
folder: <a href="../metrics.json">metrics.json</a> holds these numbers and every epoch's,
<a href="../config.yaml">config.yaml</a> the run's settings. Every metric is defined in
the project's docs/metrics.md.</p>
<h2>Metrics on the test set</h2>
{warning}
<table><tr><th>metric</th><th>learned embedding</th><th>raw pixels</th></tr>
{rows}
</table>
<p>Precision@1, R-Precision, MAP@R: retrieval by squared L2 (Musgrave et al. 2020),
{queries}. Seed triplet accuracy: share of fixed test triplets whose margin-0
triplet loss is 0 (the seed article's metric).</p>
<h2>Which classes fail</h2>
{search}
{classes}
<h2>Pictures</h2>
{figs}
{note}
</body></html>
"""


def neighbour_queries(labels: np.ndarray, cap: int = MAX_QUERY_ROWS) -> tuple:
    """The fixed queries of neighbours.png: ``(rows (R,) int64, description str)``.

    Rows: the first test item of each class (by class id), for the first ``cap`` classes
    (R = min(cap, classes)), in row order. The description is "first test item of each
    class", or "first test item of each of the first R classes (of C)" when capped.
    """
    classes, first = np.unique(np.asarray(labels), return_index=True)
    rows = np.sort(first[:cap]).astype(np.int64)
    if len(classes) <= cap:
        return rows, "first test item of each class"
    return rows, (f"first test item of each of the first {len(rows)} classes "
                  f"(of {len(classes)})")


def known_threshold(index_dir: str, model_dir: Optional[str] = None) -> tuple:
    """``(threshold, label)`` from ``index_dir/threshold.json`` (written by ``python -m
    dist_triplet.calibrate --index INDEX_DIR``), or ``(None, "")`` when it is absent or
    unreadable, or when the index was built with another model than ``model_dir``'s (a
    run resumed and trained on: the threshold is the old embedding's); ``label`` names
    the file for the picture's legend."""
    path = os.path.join(index_dir, "threshold.json")
    try:
        with open(path) as fh:
            value = float(json.load(fh)["threshold"])
        if model_dir is not None:
            from .export import model_files
            from .retrieval.model import sha256_file
            with open(os.path.join(index_dir, "meta.json")) as fh:
                built_with = json.load(fh)["model"]["params_sha256"]
            if built_with != sha256_file(model_files(model_dir)[1]):
                return None, ""
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""
    return value, os.path.join(os.path.basename(os.path.normpath(index_dir)), "threshold.json")


def write_report(run_dir: str, metrics_doc: dict, raw_inputs: np.ndarray, embeddings: np.ndarray,
                 labels: np.ndarray, class_names: Sequence[str],
                 image_shape: Optional[Sequence[int]] = None, *, points: int = 2000,
                 neighbours: int = 8, seed: int = 0, index_dir: Optional[str] = None) -> str:
    """Write ``run_dir/report/`` (module docstring) atomically; returns its path.

    Rank 0 only; calls no collective.

    Args:
        metrics_doc: the run's metrics.json contents (``epochs``, ``final``, ``raw_pixels``).
        raw_inputs: (N, F) test inputs: float32 pixels / 255 or uint8 pixels.
        embeddings: (N, D) float32 test embeddings of the final network.
        labels: (N,) int class ids; class_names: name per id.
        image_shape: (rows, cols) or (rows, cols, channels) with product F, to draw
            thumbnails, or None (feature rows: neighbours.png then shows text tiles, test
            row, class and distance, and report.html says why).
        points: rows in the PCA subsample; neighbours: neighbours per query.
        index_dir: the index whose calibrated match threshold (squared L2) distances.png
            draws, when it has one (:func:`known_threshold`); default ``run_dir/index``.

    The files go into ``run_dir/.report.tmp-<pid>/``, which is renamed to ``report/``
    (:func:`dist_triplet.fsutil.atomic_dir`; an earlier report is replaced). Nothing in
    them names ``run_dir``: the page reads the same after the run directory is moved.
    Raises ValueError on mismatched row counts, before anything is written.
    """
    from . import diagnostics as dg
    labels = np.asarray(labels)
    n = len(labels)
    if len(raw_inputs) != n or len(embeddings) != n:
        raise ValueError(f"report: {len(raw_inputs)} inputs, {len(embeddings)} embeddings and "
                         f"{n} labels; expected one per test item")
    threshold, source = known_threshold(index_dir or os.path.join(run_dir, "index"),
                                        os.path.join(run_dir, "model"))
    raw_name = "raw pixels" if image_shape is not None else "raw features"
    out = os.path.join(run_dir, "report")
    with atomic_dir(out) as tmp:
        raw_xy, rows = pca_2d(raw_inputs, points, seed)
        _plot_pca(os.path.join(tmp, "pca_raw.png"), raw_xy, labels[rows], class_names,
                  f"raw inputs: 2-D PCA of {len(rows)} test items")
        emb_xy, _ = pca_2d(embeddings, points, seed)
        _plot_pca(os.path.join(tmp, "pca_learned.png"), emb_xy, labels[rows], class_names,
                  f"learned embeddings: 2-D PCA of the same {len(rows)} test items")
        _plot_curves(os.path.join(tmp, "curves.png"), metrics_doc)
        # The class of each query's nearest other test item: per-class P@1, confusion.
        # A collapsed embedding ties everywhere: its nearest neighbours say nothing, and
        # certifying them would cost a full distance matrix per miss. Skipped, and said.
        collapsed = bool((metrics_doc.get("final") or {}).get("collapsed"))
        q = np.zeros(0, np.int64) if collapsed else dg.query_rows(labels, seed=seed)
        n_classes = max(len(class_names), int(labels.max(initial=-1)) + 1)
        matrix = dg.confusion(labels[q], dg.nearest_classes(embeddings, labels, q), n_classes)
        table = dg.per_class(matrix)
        same, other = dg.pair_distances(embeddings, labels, seed=seed)
        _plot_distances(os.path.join(tmp, "distances.png"), same, other, threshold, source)
        _plot_confusion(os.path.join(tmp, "confusion.png"), matrix, class_names)
        queries, which = neighbour_queries(labels)
        k = max(1, min(neighbours, n - 1))
        pos = dg.nearest_others(embeddings, queries, k)
        dist = dg.sq_dist(embeddings, np.repeat(queries, k), pos.ravel()).reshape(pos.shape)
        imgs = ids = None
        note = ""
        if image_shape is not None:
            imgs = np.asarray(raw_inputs).reshape((n,) + tuple(image_shape))
            title = (f"{which} (left) and its nearest other test items; squared L2 in "
                     "embedding units")
        else:
            ids = [f"test #{i}" for i in range(n)]
            title = (f"no thumbnails (feature rows): {which} (left) and its nearest other "
                     "test items by test row, class and squared L2 distance")
            note = ("neighbours.png: the test data are feature rows, not images, so its "
                    "tiles show the test row number, class and distance instead of pictures.")
        neighbour_grid(os.path.join(tmp, "neighbours.png"),
                       None if imgs is None else imgs[queries], imgs, pos, dist,
                       labels[queries], labels, class_names, title=title,
                       query_ids=None if ids is None else [ids[q] for q in queries],
                       gallery_ids=ids)
        figs = (("curves.png", "training curves, each metric on its own scale"),
                ("distances.png", "distances between test items, same class against "
                 "other class; dashed: the calibrated match threshold, when the run's index "
                 "has one"),
                ("confusion.png", "nearest-neighbour class confusion"),
                ("pca_raw.png", "raw inputs, 2-D PCA"),
                ("pca_learned.png", "learned embeddings, 2-D PCA"),
                ("neighbours.png", f"{which} and its nearest neighbours"))
        hits = int(sum(r.hits for r in table))
        search = (f"<p>Each of {len(q):,} test items searched among the other test items "
                  f"(leave-one-out, squared L2; {hits:,} hits, Precision@1 "
                  f"{hits / max(len(q), 1):.4f}"
                  + (f"; a seeded sample of the {n:,}" if len(q) < n else "") +
                  "): Precision@1 per class, worst first, and the class its misses go to "
                  "most.</p>")
        if collapsed:
            search = ("<p>No per-class statistics: the embedding collapsed (metrics.json "
                      "final.collapsed), so nearest neighbours are ties.</p>")
        if threshold is not None:
            search += (f"<p>Calibrated match threshold: squared L2 {threshold:.6g} "
                       f"({html.escape(source)}; distances.png draws it): a query whose "
                       "nearest item lies beyond it gets no match.</p>")
        with open(os.path.join(tmp, "report.html"), "w") as fh:
            config = _run_config(run_dir)
            fh.write(_html(metrics_doc, figs, note=note,
                           warning=worse_than_raw(metrics_doc, raw_name, config),
                           classes=_class_table(table, class_names), search=search,
                           config=config))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_triplet.report RUN [--index DIR]``: draw ``RUN/report/`` again,
    e.g. after ``calibrate`` to see its threshold among the distances. Embeds the run's
    test set (``RUN:test``, as the run read it) with the exported model ``RUN/model``;
    the numbers of the tables come from ``RUN/metrics.json``. Exit 2 with one ``error:``
    line on a missing or broken file."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(
        prog="python -m dist_triplet.report",
        description="Draw a run's report (RUN/report/report.html) again from its exported "
                    "model and test data, with the match threshold of a calibrated index.")
    parser.add_argument("run", help="the run directory (holds metrics.json, model/)")
    parser.add_argument("--index", help="index directory whose threshold.json to draw "
                                        "(default RUN/index)")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.run, "metrics.json")
    if not os.path.isfile(metrics):
        print(f"error: {metrics} does not exist: {args.run} is not a finished run directory",
              file=sys.stderr)
        return 2
    try:
        with open(metrics) as fh:
            doc = json.load(fh)
        if not isinstance(doc, dict) or not isinstance(doc.get("epochs", []), list):
            raise ValueError(f"{metrics}: not a run's metrics (a JSON object with 'epochs')")
        from .retrieval import Index, Model, read_items
        if args.index is not None:      # given: a calibrated index of this run's model
            from .retrieval.search import check_model, load_threshold
            index = Index.load(args.index)
            check_model(index, os.path.join(args.run, "model"))
            if load_threshold(index) is None:
                raise ValueError(f"{args.index} holds no threshold.json: calibrate it first "
                                 f"(python -m dist_triplet.calibrate --index {args.index})")
        model = Model(os.path.join(args.run, "model"))
        items = read_items(f"{args.run}:test", model.input)
        emb = model.embed(items.x, source=items.source)
        out = write_report(args.run, doc, items.x, emb, items.labels, items.class_names,
                           items.image_shape, index_dir=args.index)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(os.path.join(out, "report.html"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
