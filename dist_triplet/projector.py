"""TensorBoard embedding-projector export (rank 0), through tensorboardX.

The seed article wrote the projector with TensorFlow (``tf.Variable`` + ``Saver`` +
``projector.visualize_embeddings``); tensorboardX's ``SummaryWriter.add_embedding`` writes
the same ``projector_config.pbtxt`` without TensorFlow, plus a sprite of thumbnails.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Sequence

import numpy as np

# TensorBoard's front end loads sprites up to 8192 px a side (tensorboardX#516).
_MAX_SPRITE_PX = 8192


def sprite_thumbnails(images: np.ndarray, image_shape) -> np.ndarray:
    """(N, C, S, S) float32 in [0, 1] thumbnails for tensorboardX's sprite.

    Args:
        images: (N, H*W*C) rows, uint8 (divided by 255) or float in [0, 1].
        image_shape: (H, W, C) of each row, C = 1 or 3.

    Non-square images are centred on a black S x S square, S = max(H, W): tensorboardX
    and TensorBoard need square thumbnails (tensorboard#670), and padding keeps the
    aspect ratio that a resize would distort.
    """
    h, w, c = (int(v) for v in image_shape)
    n = len(images)
    side = max(h, w)
    x = np.asarray(images).reshape(n, h, w, c)
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    out = np.zeros((n, c, side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, :, top:top + h, left:left + w] = x.transpose(0, 3, 1, 2)
    return out


def export_projector(log_dir: str, embeddings: dict, labels: np.ndarray,
                     class_names: Sequence[str], images: np.ndarray | None = None,
                     writer=None, image_shape=None) -> list:
    """Write one projector entry per item of ``embeddings`` into ``log_dir``.

    Rank 0 only; calls no collective.

    Args:
        log_dir: TensorBoard log directory (the run's ``tensorboard/``).
        embeddings: tag -> (N, D) float32 array, e.g. ``{'origin': pixels, 'triplet': emb}``
            as the seed article (raw pixels beside learned embeddings).
        labels: (N,) int class ids; metadata holds ``class_names[label]``, one line per point.
        class_names: names indexed by class id.
        images: (N, H*W*C) rows of images for sprite thumbnails (uint8, or float32 in
            [0, 1]), or None (features: no sprite). Left out (with no error) if the sprite
            would exceed TensorBoard's 8192 px limit.
        writer: an open ``tensorboardX.SummaryWriter`` on ``log_dir`` to reuse (the run's
            scalar writer), or None to open one.
        image_shape: (H, W, C) of ``images``' rows; None = square one-channel images
            (H = W = sqrt of the row width), as MNIST. Non-square images are padded
            (:func:`sprite_thumbnails`).

    An earlier export in ``log_dir`` (a resumed run exporting again) is replaced, not
    appended to: tensorboardX appends every call to ``projector_config.pbtxt``.

    Returns:
        The directories written, one per tag (each has tensors.tsv, metadata.tsv and,
        with images, sprite.png).
    """
    from tensorboardX import SummaryWriter

    n = len(labels)
    metadata = [class_names[int(c)] for c in labels]
    label_img = None
    if images is not None:
        if image_shape is None:
            side = int(round(math.sqrt(images.shape[1])))
            image_shape = (side, side, 1) if side * side == images.shape[1] else None
        if image_shape is not None:
            side = max(image_shape[0], image_shape[1])
            if math.ceil(math.sqrt(n)) * side <= _MAX_SPRITE_PX:
                label_img = sprite_thumbnails(images, image_shape)  # (N, C, S, S)
    for tag, mat in embeddings.items():
        if len(mat) != n:
            raise ValueError(f"projector tag {tag!r}: {len(mat)} rows but {n} labels")
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
            writer.add_embedding(np.asarray(mat, dtype=np.float32), metadata=metadata,
                                 label_img=label_img, tag=tag)
            written.append(os.path.join(log_dir, "00000", tag))
    finally:
        if own:
            writer.close()
    return written
