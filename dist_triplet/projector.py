"""TensorBoard embedding-projector export (rank 0), through tensorboardX.

The seed article wrote the projector with TensorFlow (``tf.Variable`` + ``Saver`` +
``projector.visualize_embeddings``); tensorboardX's ``SummaryWriter.add_embedding`` writes
the same ``projector_config.pbtxt`` without TensorFlow, plus a sprite of thumbnails.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

# TensorBoard's front end loads sprites up to 8192 px a side (tensorboardX#516).
_MAX_SPRITE_PX = 8192


def export_projector(log_dir: str, embeddings: dict, labels: np.ndarray,
                     class_names: Sequence[str], images: np.ndarray | None = None) -> list:
    """Write one projector entry per item of ``embeddings`` into ``log_dir``.

    Rank 0 only; calls no collective.

    Args:
        log_dir: TensorBoard log directory (the run's ``tensorboard/``).
        embeddings: tag -> (N, D) float32 array, e.g. ``{'origin': pixels, 'triplet': emb}``
            as the seed article (raw pixels beside learned embeddings).
        labels: (N,) int class ids; metadata holds ``class_names[label]``, one line per point.
        class_names: names indexed by class id.
        images: (N, H*W) float32 in [0, 1] of square images for sprite thumbnails, or None.
            Left out (with no error) if the sprite would exceed TensorBoard's 8192 px limit.

    Returns:
        The directories written, one per tag (each has tensors.tsv, metadata.tsv and,
        with images, sprite.png).
    """
    from tensorboardX import SummaryWriter

    n = len(labels)
    metadata = [class_names[int(c)] for c in labels]
    label_img = None
    if images is not None:
        side = int(round(math.sqrt(images.shape[1])))
        if side * side == images.shape[1] and math.ceil(math.sqrt(n)) * side <= _MAX_SPRITE_PX:
            label_img = images.reshape(n, 1, side, side)  # (N, C, H, W) as tensorboardX expects
    written = []
    with SummaryWriter(log_dir) as writer:
        for tag, mat in embeddings.items():
            if len(mat) != n:
                raise ValueError(f"projector tag {tag!r}: {len(mat)} rows but {n} labels")
            writer.add_embedding(np.asarray(mat, dtype=np.float32), metadata=metadata,
                                 label_img=label_img, tag=tag)
            written.append(os.path.join(log_dir, "00000", tag))
    return written
