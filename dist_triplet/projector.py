"""TensorBoard embedding-projector export (rank 0): the files TensorBoard's projector reads.

The seed article wrote the projector with TensorFlow (``tf.Variable`` + ``Saver`` +
``projector.visualize_embeddings``): the matrix as a binary checkpoint, a metadata.tsv and
``projector_config.pbtxt``. This module writes the same without TensorFlow: per tag a
``tensors.bytes`` of raw little-endian float32 rows, whose shape the config gives
(``tensor_shape``), ``metadata.tsv`` and a sprite of thumbnails, and one config naming them.
TensorBoard's projector plugin reads such a file when it is not UTF-8 text (its
``_read_tensor_binary_file``); a matrix whose bytes happen to be valid UTF-8 (an all-zero
one, say) is written as ``tensors.tsv`` text instead, so every export loads.

Why not tensorboardX's ``add_embedding`` (used before): it writes the matrix as TSV text,
formatting every number in Python; for the 10,000 x 784 raw test pixels (the seed's
``origin`` entry) that took 6-35 s, and the run's whole end-of-run budget is 3 s. The
binary file takes 0.1 s (docs/benchmark.md).

The sprite of thumbnails is made here (:func:`make_sprite`), not by tensorboardX 2.6.5:
its ``make_sprite`` allocates the square canvas with ``np.ndarray`` and fills only the
grid's rows, so the cells below the last image hold uninitialised memory (random pixels,
different on every run), and it accepts only square single-channel or RGB(A) NCHW images.
Ours pads every empty cell, and non-square images to a square cell, with ``PAD_RGB``.
"""
from __future__ import annotations

import io
import math
import os
import shutil
from typing import Optional, Sequence, Tuple

import numpy as np

from .fsutil import atomic_write

# Tags (tensor names) of a run's two entries. TensorBoard 2.21's projector opens on the
# first of its tensors sorted by: with metadata first, then more rows first, then by name
# (vz-projector-data-panel's sort in tensorboard/plugins/projector/tf_projector_plugin/
# projector_binary.js; the order in projector_config.pbtxt does not count). Both entries
# have metadata and the same rows, so the name decides: "learned_embedding" sorts before
# "raw_pixels", and the projector opens on the learned embedding.
LEARNED_TAG, RAW_TAG = "learned_embedding", "raw_pixels"
# TensorBoard's front end loads sprites up to 8192 px a side (tensorboardX#516).
_MAX_SPRITE_PX = 8192
# Colour of empty sprite cells and of the padding that makes non-square images square:
# black, the background of MNIST-style images and of tensorboardX's own grid.
PAD_RGB = (0, 0, 0)


def _as_images(images: np.ndarray, image_shape: Optional[Sequence[int]]) -> np.ndarray:
    """(N, H, W, C) uint8 RGB from (N, H*W[*C]) rows, (N, H, W) or (N, H, W, C)."""
    images = np.asarray(images)
    if images.ndim == 2:
        n, f = images.shape
        if image_shape is None:
            side = int(round(math.sqrt(f)))
            if side * side != f:
                raise ValueError(f"sprite: rows of {f} values are not square images; give "
                                 "image_shape=(H, W) or (H, W, C)")
            image_shape = (side, side)
        if int(np.prod(image_shape)) != f:
            raise ValueError(f"sprite: image_shape={tuple(image_shape)} does not hold the "
                             f"{f} values of a row")
        images = images.reshape((n, *image_shape))
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"sprite: images of shape {images.shape}: expected (N, H, W) or "
                         "(N, H, W, C) with C = 1 (grey) or 3 (RGB)")
    if images.dtype != np.uint8:
        # floats in [0, 1], as dist_triplet.data returns them
        images = np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    if images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    return images


def sprite_layout(n: int, height: int, width: int) -> Tuple[int, int]:
    """(cell side S, images per row) of the sprite of ``n`` images of height x width:
    S = max(height, width); ceil(sqrt(n)) per row, so the sprite is a square of that many
    cells a side, filled row by row (TensorBoard reads it row-major)."""
    return max(height, width), max(1, math.ceil(math.sqrt(n)))


def make_sprite(images: np.ndarray, image_shape: Optional[Sequence[int]] = None
                ) -> Tuple[np.ndarray, int]:
    """The projector's sprite: every image in a square cell of a square grid, row-major.

    Args:
        images: (N, H, W) or (N, H, W, C) with C 1 or 3, or (N, H*W*C) rows with
            ``image_shape``; uint8, or float in [0, 1] (scaled by 255 and rounded).
        image_shape: (H, W) or (H, W, C) of flat rows; None = square grey (H = W =
            sqrt(row length)).

    Returns:
        (sprite, S): sprite (G*S, G*S, 3) uint8 RGB with G = ceil(sqrt(N)) cells a side;
        image i is centred in cell (i // G, i % G), padded to S x S (S = max(H, W)) with
        ``PAD_RGB``; cells N .. G*G-1 are ``PAD_RGB`` throughout.

    Raises:
        ValueError: a shape that is not one of the above (names it).
    """
    images = _as_images(images, image_shape)
    n, height, width, _ = images.shape
    side, per_row = sprite_layout(n, height, width)
    sprite = np.empty((per_row * side, per_row * side, 3), np.uint8)
    sprite[...] = PAD_RGB
    top, left = (side - height) // 2, (side - width) // 2
    for i in range(n):
        r, c = divmod(i, per_row)
        sprite[r * side + top: r * side + top + height,
               c * side + left: c * side + left + width] = images[i]
    return sprite, side


def _png(sprite: np.ndarray) -> bytes:
    """The sprite as PNG bytes (RGB). zlib level 1: a 2,800 px sprite of 10,000 thumbnails
    encodes in a fifth of the default level's time for ~10% more bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(sprite, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_tensor(entry_dir: str, mat: np.ndarray) -> str:
    """``mat`` (N, D) float32 into ``entry_dir``: tensors.bytes (raw little-endian float32),
    or tensors.tsv when those bytes are valid UTF-8, which TensorBoard would try to parse
    as text. Returns the file name."""
    raw = np.ascontiguousarray(mat, dtype="<f4").tobytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        with atomic_write(os.path.join(entry_dir, "tensors.bytes"), "wb") as fh:
            fh.write(raw)
        return "tensors.bytes"
    with atomic_write(os.path.join(entry_dir, "tensors.tsv")) as fh:
        np.savetxt(fh, mat, delimiter="\t", fmt="%.9g")
    return "tensors.tsv"


def read_tensor(entry_dir: str) -> np.ndarray:
    """The (N, D) float32 matrix of one projector entry written by :func:`export_projector`
    (tensors.bytes with its shape from the entry's ``projector_config.pbtxt``, or
    tensors.tsv). Raises FileNotFoundError when the entry has neither."""
    entry_dir = os.path.normpath(entry_dir)
    tsv = os.path.join(entry_dir, "tensors.tsv")
    if os.path.exists(tsv):
        return np.loadtxt(tsv, delimiter="\t", ndmin=2).astype(np.float32)
    path = os.path.join(entry_dir, "tensors.bytes")
    log_dir = os.path.dirname(os.path.dirname(entry_dir))
    rel = os.path.relpath(path, log_dir)
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as fh:
        for block in fh.read().split("embeddings {")[1:]:
            if f'tensor_path: "{rel}"' in block:
                shape = [int(line.split(":")[1]) for line in block.splitlines()
                         if line.strip().startswith("tensor_shape:")]
                return np.fromfile(path, dtype="<f4").reshape(shape)
    raise FileNotFoundError(f"{path}: not named in {log_dir}/projector_config.pbtxt")


def metadata_tsv(labels: np.ndarray, class_names: Sequence[str],
                 ids: Optional[Sequence[str]] = None) -> str:
    """The projector's metadata: a header row ``id<TAB>class``, then one row per point.

    TensorBoard reads a first line holding a tab as the column names (multi-column
    metadata; one column takes no header). ``ids`` default to ``test/<row>``, the ids
    ``python -m dist_triplet.search`` gives the rows of an IDX or .npz test set. Tabs and
    line breaks inside a cell become spaces.
    """
    def cell(text) -> str:
        return " ".join(str(text).replace("\t", " ").splitlines())
    if ids is None:
        ids = [f"test/{i}" for i in range(len(labels))]
    if len(ids) != len(labels):
        raise ValueError(f"projector metadata: {len(ids)} ids but {len(labels)} labels")
    return "id\tclass\n" + "".join(f"{cell(i)}\t{cell(class_names[int(c)])}\n"
                                   for i, c in zip(ids, labels))


def export_projector(log_dir: str, embeddings: dict, labels: np.ndarray,
                     class_names: Sequence[str], images: np.ndarray | None = None,
                     image_shape: Optional[Sequence[int]] = None,
                     ids: Optional[Sequence[str]] = None) -> list:
    """Write one projector entry per item of ``embeddings`` into ``log_dir``.

    Rank 0 only; calls no collective.

    Args:
        log_dir: TensorBoard log directory (the run's ``tensorboard/``).
        embeddings: tag -> (N, D) float32 array, e.g. ``{RAW_TAG: pixels, LEARNED_TAG:
            emb}``: raw pixels beside learned embeddings, as the seed article's ``origin``
            and ``triplet`` (the tag names choose the entry TensorBoard opens on: see
            ``LEARNED_TAG``).
        labels: (N,) int class ids; class_names: names indexed by class id.
        ids: (N,) item ids for the metadata's ``id`` column (:func:`metadata_tsv`).
        images: thumbnails for the sprite, in any form :func:`make_sprite` takes (e.g.
            (N, H*W) float32 in [0, 1] of square grey images), or None. Left out (with no
            error) if the sprite would exceed TensorBoard's 8192 px limit.
        image_shape: (H, W) or (H, W, C) of flat ``images`` rows (see :func:`make_sprite`).

    Layout (as tensorboardX's): ``log_dir/projector_config.pbtxt`` and per tag
    ``log_dir/00000/<tag>/`` with tensors.bytes (or tensors.tsv, see the module docstring;
    :func:`read_tensor` reads either), metadata.tsv (:func:`metadata_tsv`) and, with
    images, sprite.png. An
    earlier export in ``log_dir`` (a resumed run exporting again) is replaced, not
    appended to.

    Returns:
        The directories written, one per tag.
    """
    n = len(labels)
    for tag, mat in embeddings.items():
        if len(mat) != n:
            raise ValueError(f"projector tag {tag!r}: {len(mat)} rows but {n} labels")
    png = side = None
    if images is not None:
        if len(images) != n:
            raise ValueError(f"projector images: {len(images)} rows but {n} labels")
        shape = _as_images(images[:1], image_shape).shape
        cell, per_row = sprite_layout(n, shape[1], shape[2])
        if cell * per_row <= _MAX_SPRITE_PX:
            sprite, side = make_sprite(images, image_shape)
            png = _png(sprite)          # encoded once, the same file for every tag
    metadata = metadata_tsv(labels, class_names, ids)
    entries, written = [], []
    for tag, mat in embeddings.items():
        entry = os.path.join(log_dir, "00000", tag)
        shutil.rmtree(entry, ignore_errors=True)     # an earlier export is replaced
        os.makedirs(entry)
        rel = f"00000/{tag}"
        mat = np.asarray(mat, dtype=np.float32)
        lines = [f'  tensor_name: "{tag}:00000"',
                 f'  tensor_path: "{rel}/{_write_tensor(entry, mat)}"',
                 f"  tensor_shape: {mat.shape[0]}", f"  tensor_shape: {mat.shape[1]}",
                 f'  metadata_path: "{rel}/metadata.tsv"']
        with atomic_write(os.path.join(entry, "metadata.tsv")) as fh:
            fh.write(metadata)
        if png is not None:
            with atomic_write(os.path.join(entry, "sprite.png"), "wb") as fh:
                fh.write(png)
            lines += ["  sprite {", f'    image_path: "{rel}/sprite.png"',
                      f"    single_image_dim: {side}", f"    single_image_dim: {side}", "  }"]
        entries.append("embeddings {\n" + "\n".join(lines) + "\n}\n")
        written.append(entry)
    # One write of the whole config: a second export (a resumed run) replaces the first.
    with atomic_write(os.path.join(log_dir, "projector_config.pbtxt")) as fh:
        fh.write("".join(entries))
    return written
