"""Pictures of a run and of a search: the end-of-run report and neighbour grids (matplotlib).

:func:`write_report` writes ``RUN/report/`` (rank 0, at the end of a run):

    pca_raw.png      2-D PCA of the raw inputs, coloured by class, legend of class names
    pca_learned.png  the same for the learned embeddings (the seed article's two pictures)
    curves.png       loss, seed triplet accuracy, P@1, R-Precision, MAP@R per epoch; the
                     raw-pixel P@1 / R-Precision / MAP@R as horizontal dashed lines
    neighbours.png   fixed test queries (the first test item of each class, up to
                     ``MAX_QUERY_ROWS`` classes; the title says when capped) and their
                     nearest neighbours among the other test items, framed green / red;
                     for feature data (no image shape) text tiles: test row, class, distance
    report.html      the metrics table and these pictures (relative paths)

PCA (eigenvectors of the scatter matrix, i.e. a thin SVD) of a fixed random subsample
(``points``, default 2,000) centred on its mean, so the report costs well under the
end-of-run budget of 3 s (about 0.6 s CPU plus matplotlib's import; docs/search.md).
Only the Agg backend is used: no display needed.
"""
from __future__ import annotations

import html
import os
from typing import Optional, Sequence

import numpy as np

from .fsutil import atomic_dir

__all__ = ["neighbour_grid", "neighbour_queries", "pca_2d", "write_report", "REPORT_FILES",
           "MAX_QUERY_ROWS"]

REPORT_FILES = ("pca_raw.png", "pca_learned.png", "curves.png", "neighbours.png",
                "report.html")
_GREEN, _RED, _GREY = "#1a9850", "#d73027", "#888888"
MAX_QUERY_ROWS = 12   # rows of neighbours.png: Fashion-MNIST's 10 classes fit, 100 would not


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def neighbour_grid(path: str, query_images: Optional[np.ndarray],
                   gallery_images: Optional[np.ndarray],
                   pos: np.ndarray, dist: np.ndarray, query_labels: Optional[np.ndarray],
                   gallery_labels: Optional[np.ndarray], class_names: Optional[Sequence[str]],
                   no_match: Optional[Sequence[bool]] = None, title: Optional[str] = None,
                   query_ids: Optional[Sequence[str]] = None,
                   gallery_ids: Optional[Sequence[str]] = None) -> str:
    """Each query (column 0) beside its k neighbours, as thumbnails; writes PNG ``path``.

    Args:
        query_images: (R, h, w) grey or (R, h, w, 1 | 3) uint8 or float in [0, 1]; None
            draws label-only tiles. Grey is drawn dark on white (as the seed's pictures).
        gallery_images: (N, ...) likewise (memory-mapped is fine), or None.
        pos: (R, k) int64 gallery positions (-1: none); dist: (R, k) squared L2.
        query_labels: (R,) gallery class ids (-2: a class the gallery lacks) or None; with
            labels, neighbours are framed green (same class) or red.
        gallery_labels: (N,) int64 class ids (-1 unknown) or None.
        no_match: per query, True when its nearest neighbour is beyond the threshold.
        query_ids, gallery_ids: item ids, written on label-only tiles (no images).
    """
    plt = _pyplot()
    rows, k = pos.shape
    h, w = _tile_shape(query_images, gallery_images)
    pad, gap, text_h = 2, 3, 18          # frame, gap between tiles, text lines (pixels)
    cell_h, cell_w = h + 2 * pad + text_h, w + 2 * pad + gap
    mosaic = np.ones((rows * cell_h, (k + 1) * cell_w, 3), np.float32)
    labels_at = []

    def name(c):
        if class_names is None or c is None or c < 0:
            return "?"
        return str(class_names[c])

    def put(r, j, img, colour, text):
        y, x = r * cell_h, j * cell_w
        mosaic[y:y + h + 2 * pad, x:x + w + 2 * pad] = _rgb(colour)
        tile = np.ones((h, w, 3), np.float32)
        if img is not None:
            img = np.asarray(img)
            v = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
            if v.ndim == 3 and v.shape[2] == 3:
                tile = v                                    # colour: as it is
            else:                                           # grey: dark ink on white
                tile = np.repeat(1.0 - v.reshape(h, w)[:, :, None], 3, axis=2)
        mosaic[y + pad:y + pad + h, x + pad:x + pad + w] = np.clip(tile, 0, 1)
        labels_at.append((x + pad + w / 2, y + 2 * pad + h + 1, text))

    for r in range(rows):
        q_lab = None if query_labels is None else int(query_labels[r])
        q_text = "query" + (f"\n{name(q_lab)}" if q_lab is not None else "")
        if no_match is not None and no_match[r]:
            q_text = "query, no match" + (f"\n{name(q_lab)}" if q_lab is not None else "")
        if query_images is None and query_ids is not None:
            q_text = f"{_short(query_ids[r])}\n{q_text}"
        put(r, 0, None if query_images is None else query_images[r], "#000000", q_text)
        for j in range(k):
            p = int(pos[r, j])
            if p < 0:
                continue
            g_lab = None if gallery_labels is None else int(gallery_labels[p])
            colour = _GREY
            if q_lab is not None and g_lab is not None and g_lab >= 0:
                colour = _GREEN if g_lab == q_lab else _RED
            text = f"{dist[r, j]:.3g}" + (f"\n{name(g_lab)}" if g_lab is not None else "")
            if gallery_images is None and gallery_ids is not None:
                text = f"{_short(gallery_ids[p])}\n{text}"
            put(r, j + 1, None if gallery_images is None else gallery_images[p], colour, text)
    # One image and a text per tile: 10x faster than an axes per tile (subplots).
    scale = 2.2                           # output pixels per mosaic pixel at dpi 100
    fig = plt.figure(figsize=(mosaic.shape[1] * scale / 100, (mosaic.shape[0] + 14) * scale / 100))
    ax = fig.add_axes((0, 0, 1, mosaic.shape[0] / (mosaic.shape[0] + 14)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for x, y, text in labels_at:
        ax.text(x, y, text, ha="center", va="top", fontsize=5.5, linespacing=1.0)
    fig.suptitle(title or "queries (left) and nearest neighbours; squared L2 distance under each",
                 fontsize=7, y=0.998, va="top")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(item_id: str, width: int = 14) -> str:
    """An id cut to ``width`` characters from the end (a path's file name survives)."""
    item_id = str(item_id)
    return item_id if len(item_id) <= width else "…" + item_id[-(width - 1):]


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)], np.float32)


def _tile_shape(query_images, gallery_images) -> tuple:
    for imgs in (query_images, gallery_images):
        if imgs is not None:
            return tuple(int(v) for v in np.asarray(imgs[0]).shape[:2])
    return (14, 36)  # label-only tiles


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
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(coords[m, 0], coords[m, 1], s=4, color=cmap(int(c) % cmap.N),
                   label=str(class_names[c]) if c < len(class_names) else str(c))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    # Fixed margins clipped "PC 2" behind wide tick labels (-2000): the tight bounding box
    # keeps every label (one extra draw, ~0.1 s; tight_layout would be slower).
    fig.subplots_adjust(left=0.12, right=0.75, bottom=0.1, top=0.93)
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


_CURVES = (("seed_accuracy", "seed triplet accuracy"), ("precision_at_1", "Precision@1"),
           ("r_precision", "R-Precision"), ("map_at_r", "MAP@R"))


def _plot_curves(path: str, doc: dict) -> None:
    plt = _pyplot()
    rows = doc.get("epochs") or []
    raw = doc.get("raw_pixels") or {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ep = [r["epoch"] for r in rows if "loss" in r]
    a1.plot(ep, [r["loss"] for r in rows if "loss" in r], "o-", ms=3, color="black")
    from matplotlib.ticker import MaxNLocator
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs: no 1.5
    a1.set_xlabel("epoch")
    a1.set_ylabel("mean triplet loss")
    a1.set_title("training loss", fontsize=9)
    colours = ("#7570b3", "#1b9e77", "#d95f02", "#e7298a")
    for (key, label), colour in zip(_CURVES, colours):
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            a2.plot(*zip(*pts), "o-", ms=3, color=colour, label=label)
        if isinstance(raw.get(key), (int, float)):
            a2.axhline(raw[key], color=colour, ls="--", lw=1, label=f"{label}, raw pixels")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1.02)
    a2.set_title("test-set metrics (dashed: raw pixels)", fontsize=9)
    # Beside the axes, at a readable size: inside, seven entries hid the curves.
    a2.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.subplots_adjust(left=0.07, right=0.72, bottom=0.14, top=0.91, wspace=0.22)
    fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def _nearest_others(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple:
    """Exact k nearest other rows of each query row: (dist (R, k) float32 squared L2,
    pos (R, k) int64), ties by lower row (the rule of metrics.retrieval_metrics)."""
    x = emb.astype(np.float64)
    q = x[queries]
    d = (np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", x, x)[None, :]
         - 2.0 * q @ x.T)
    d = np.maximum(d, 0.0).astype(np.float32)
    d[np.arange(len(queries)), queries] = np.inf
    pos = np.stack([np.lexsort((np.arange(len(x)), row))[:k] for row in d])
    return np.take_along_axis(d, pos, 1), pos


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


def _html(doc: dict, images: Sequence[tuple], note: str = "") -> str:
    final = doc.get("final") or {}
    raw = doc.get("raw_pixels") or {}
    keys = [("seed_accuracy", "seed triplet accuracy"), ("precision_at_1", "Precision@1"),
            ("r_precision", "R-Precision"), ("map_at_r", "MAP@R"), ("loss", "final loss"),
            ("spread", "embedding spread"), ("collapsed", "collapsed"),
            ("triplets_per_s", "triplets/s (last epoch)")]
    rows = "\n".join(
        f"<tr><td>{label}</td><td>{_fmt(final.get(key), key)}</td>"
        f"<td>{_fmt(raw.get(key), key) if key in raw else ''}</td></tr>"
        for key, label in keys if key in final or key in raw)
    figs = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(cap)}">'
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>"
                     for f, cap in images)
    run = html.escape(str(doc.get("run_dir", "")))
    note = f"<p>{html.escape(note)}</p>" if note else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dist_triplet report: {run}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}
td:first-child{{text-align:left}}figure{{display:inline-block;margin:.5em;vertical-align:top}}
img{{max-width:100%}}</style></head>
<body><h1>dist_triplet run report</h1><p>{run}</p>
<h2>Metrics on the test set</h2>
<table><tr><th>metric</th><th>learned embedding</th><th>raw pixels</th></tr>
{rows}
</table>
<p>Precision@1, R-Precision, MAP@R: leave-one-out retrieval by squared L2 (Musgrave et
al. 2020). Seed triplet accuracy: share of fixed test triplets whose margin-0 triplet loss
is 0 (the seed article's metric).</p>
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


def write_report(run_dir: str, metrics_doc: dict, raw_inputs: np.ndarray, embeddings: np.ndarray,
                 labels: np.ndarray, class_names: Sequence[str],
                 image_shape: Optional[Sequence[int]] = None, *, points: int = 2000,
                 neighbours: int = 8, seed: int = 0) -> str:
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

    The files go into ``run_dir/.report.tmp-<pid>/``, which is renamed to ``report/``
    (:func:`dist_triplet.fsutil.atomic_dir`; an earlier report is replaced).
    Raises ValueError on mismatched row counts, before anything is written.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(raw_inputs) != n or len(embeddings) != n:
        raise ValueError(f"report: {len(raw_inputs)} inputs, {len(embeddings)} embeddings and "
                         f"{n} labels; expected one per test item")
    out = os.path.join(run_dir, "report")
    with atomic_dir(out) as tmp:
        raw_xy, rows = pca_2d(raw_inputs, points, seed)
        _plot_pca(os.path.join(tmp, "pca_raw.png"), raw_xy, labels[rows], class_names,
                  f"raw inputs: 2-D PCA of {len(rows)} test items")
        emb_xy, _ = pca_2d(embeddings, points, seed)
        _plot_pca(os.path.join(tmp, "pca_learned.png"), emb_xy, labels[rows], class_names,
                  f"learned embeddings: 2-D PCA of the same {len(rows)} test items")
        _plot_curves(os.path.join(tmp, "curves.png"), metrics_doc)
        queries, which = neighbour_queries(labels)
        k = max(1, min(neighbours, n - 1))
        dist, pos = _nearest_others(embeddings, queries, k)
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
        figs = (("pca_raw.png", "raw inputs, 2-D PCA"),
                ("pca_learned.png", "learned embeddings, 2-D PCA"),
                ("curves.png", "training curves"),
                ("neighbours.png", f"{which} and its nearest neighbours"))
        with open(os.path.join(tmp, "report.html"), "w") as fh:
            fh.write(_html(metrics_doc, figs, note))
    return out
