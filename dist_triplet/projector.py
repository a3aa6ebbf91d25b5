"""TensorBoard embedding-projector export (rank 0), through tensorboardX.

The seed article wrote the projector with TensorFlow (``tf.Variable`` + ``Saver`` +
``projector.visualize_embeddings``); tensorboardX's ``SummaryWriter.add_embedding`` writes
the same ``projector_config.pbtxt`` (and tensors.tsv, metadata.tsv) without TensorFlow.

The sprite of thumbnails is made here (:func:`make_sprite`), not by tensorboardX 2.6.5:
its ``make_sprite`` allocates the square canvas with ``np.ndarray`` and fills only the
grid's rows, so the cells below the last image hold uninitialised memory (random pixels,
different on every run), and it accepts only square single-channel or RGB(A) NCHW images.
Ours pads every empty cell, and non-square images to a square cell, with ``PAD_RGB``.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from typing import Optional, Sequence, Tuple

import numpy as np

from .fsutil import atomic_write

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


def _write_sprite(entry_dir: str, sprite: np.ndarray) -> str:
    from PIL import Image
    path = os.path.join(entry_dir, "sprite.png")
    with atomic_write(path, "wb") as fh:
        Image.fromarray(sprite, mode="RGB").save(fh, format="PNG")
    return path


def _add_sprite_to_config(config: str, side: int) -> None:
    """Give the last entry of projector_config.pbtxt (the one ``add_embedding`` just
    appended) the sprite block tensorboardX's append_pbtxt writes for a label_img: the
    sprite beside the entry's tensors.tsv, and the cell size."""
    with open(config) as fh:
        text = fh.read()
    start = text.rindex("embeddings {\n")
    tensors = re.search(r'tensor_path: "(.*)tensors\.tsv"\n', text[start:]).group(1)
    if not text.endswith("}\n"):  # the entry's closing brace; nothing follows it
        raise RuntimeError(f"{config}: unexpected end of tensorboardX's projector config")
    block = (f'sprite {{\nimage_path: "{tensors}sprite.png"\n'
             f"single_image_dim: {side}\nsingle_image_dim: {side}\n}}\n")
    with atomic_write(config) as fh:
        fh.write(text[:-2] + block + "}\n")


def export_projector(log_dir: str, embeddings: dict, labels: np.ndarray,
                     class_names: Sequence[str], images: np.ndarray | None = None,
                     writer=None, image_shape: Optional[Sequence[int]] = None) -> list:
    """Write one projector entry per item of ``embeddings`` into ``log_dir``.

    Rank 0 only; calls no collective.

    Args:
        log_dir: TensorBoard log directory (the run's ``tensorboard/``).
        embeddings: tag -> (N, D) float32 array, e.g. ``{'origin': pixels, 'triplet': emb}``
            as the seed article (raw pixels beside learned embeddings).
        labels: (N,) int class ids; metadata holds ``class_names[label]``, one line per point.
        class_names: names indexed by class id.
        images: thumbnails for the sprite, in any form :func:`make_sprite` takes (e.g.
            (N, H*W) float32 in [0, 1] of square grey images), or None. Left out (with no
            error) if the sprite would exceed TensorBoard's 8192 px limit.
        writer: an open ``tensorboardX.SummaryWriter`` on ``log_dir`` to reuse (the run's
            scalar writer), or None to open one.
        image_shape: (H, W) or (H, W, C) of flat ``images`` rows (see :func:`make_sprite`).

    An earlier export in ``log_dir`` (a resumed run exporting again) is replaced, not
    appended to: tensorboardX appends every call to ``projector_config.pbtxt``.

    Returns:
        The directories written, one per tag (each has tensors.tsv, metadata.tsv and,
        with images, sprite.png).
    """
    from tensorboardX import SummaryWriter

    n = len(labels)
    metadata = [class_names[int(c)] for c in labels]
    for tag, mat in embeddings.items():
        if len(mat) != n:
            raise ValueError(f"projector tag {tag!r}: {len(mat)} rows but {n} labels")
    sprite = side = None
    if images is not None:
        if len(images) != n:
            raise ValueError(f"projector images: {len(images)} rows but {n} labels")
        shape = _as_images(images[:1], image_shape).shape
        cell, per_row = sprite_layout(n, shape[1], shape[2])
        if cell * per_row <= _MAX_SPRITE_PX:
            sprite, side = make_sprite(images, image_shape)
    for tag in embeddings:
        shutil.rmtree(os.path.join(log_dir, "00000", tag), ignore_errors=True)
    config = os.path.join(log_dir, "projector_config.pbtxt")
    if os.path.exists(config):
        os.remove(config)
    own = writer is None
    writer = SummaryWriter(log_dir) if own else writer
    written = []
    try:
        for tag, mat in embeddings.items():
            writer.add_embedding(np.asarray(mat, dtype=np.float32), metadata=metadata, tag=tag)
            entry = os.path.join(log_dir, "00000", tag)
            if sprite is not None:
                _write_sprite(entry, sprite)
                _add_sprite_to_config(config, side)
            written.append(entry)
    finally:
        if own:
            writer.close()
    return written
