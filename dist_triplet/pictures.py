"""Pictures shared by the run report and ``python -m dist_triplet.search --grid``: the
neighbour grid (each query beside its nearest gallery items). matplotlib, Agg backend;
the lowest layer of the drawing code, so the retrieval CLIs and the report both import it
without importing each other."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["neighbour_grid", "pyplot"]

_GREEN, _RED, _GREY = "#1a9850", "#d73027", "#888888"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
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
    plt = pyplot()
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
    # The title wrapped to the picture's width (~5.5 px a character at 7 pt; a narrow grid
    # cut it off), 6 mosaic pixels a line, at least 14 above the tiles.
    import textwrap
    lines = textwrap.wrap(title or "queries (left) and nearest neighbours; squared L2 "
                          "distance under each", max(16, int(mosaic.shape[1] * scale / 5.5)))
    head = max(14, 6 * len(lines) + 2)
    fig = plt.figure(figsize=(mosaic.shape[1] * scale / 100,
                              (mosaic.shape[0] + head) * scale / 100))
    ax = fig.add_axes((0, 0, 1, mosaic.shape[0] / (mosaic.shape[0] + head)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for x, y, text in labels_at:
        ax.text(x, y, text, ha="center", va="top", fontsize=5.5, linespacing=1.0)
    fig.suptitle("\n".join(lines), fontsize=7, y=0.998, va="top")
    from .fsutil import atomic_write
    try:                                  # a failed write leaves no half picture at path
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
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
