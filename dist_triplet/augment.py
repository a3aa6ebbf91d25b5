"""Per-row random numbers drawn on the host, and the image augmentation that uses them.

Randomness in a step never comes from MXNet's device generators: every random number a
step needs is drawn here with NumPy from ``SeedSequence([seed, epoch, worker, stream])``
for a whole epoch and travels to the device with the epoch's row indices
(``engine.DataParallelStep.epoch_indices``). A step is therefore a pure function of
(parameters, rows, these numbers): a run resumed at an epoch boundary draws exactly what
an uninterrupted one draws, and a kvstore device and the Horovod rank with the same
worker index draw the same numbers.

Augmentation (``augment.crop_pad``, ``augment.flip``): random crop with zero padding and
horizontal flip, the standard CIFAR recipe (He et al. 2016, Sec. 4.2: pad 4, random 32x32
crop, flip). Each image row is shifted by (dy, dx) in [-pad, pad] (pixels shifted in from
outside are 0, what a crop of the zero-padded image gives) and mirrored left-right with
probability 1/2, on the device, as one gather (:func:`crop_flip`).

Pure NumPy on the host side; :func:`crop_flip` takes ``F`` (``mx.nd`` or ``mx.sym``) and
runs inside the hybridized step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["Augment", "augmentation", "draw", "crop_flip", "AUG_COLUMNS"]

_NOISE_STREAM = 0x4E4F4953  # "NOIS": independent of the samplers' streams
AUG_COLUMNS = 3             # dy, dx, flip


@dataclass(frozen=True)
class Augment:
    """What to do to image rows: ``image_shape`` (H, W, C) of the rows, ``pad`` the largest
    shift in pixels (0 = no crop), ``flip`` mirror left-right with probability 1/2."""

    image_shape: Tuple[int, int, int]
    pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip

    def columns(self, u: np.ndarray) -> np.ndarray:
        """(..., 3) float32 (dy, dx, flip) from uniforms ``u`` (..., 3) in [0, 1):
        shifts uniform over the 2 * pad + 1 integers in [-pad, pad], flip 0 or 1."""
        span = 2 * self.pad + 1
        shift = np.floor(u[..., :2] * span) - self.pad
        flip = (u[..., 2:3] < 0.5) if self.flip else np.zeros_like(u[..., 2:3])
        return np.concatenate([shift, flip], axis=-1).astype(np.float32)


def augmentation(section, image_shape):
    """The ``augment.Augment`` of config section ``augment`` for rows of ``image_shape``
    (H, W, C), or None when it is off.

    Raises:
        ValueError: augmentation asked for on feature rows (``image_shape`` None), or a
            crop padding not smaller than the image.
    """
    if not (section.pad or section.flip):
        return None
    if image_shape is None:
        raise ValueError(f"augment.pad={section.pad} / augment.flip={section.flip} need image "
                         "data; the training rows are feature vectors (set augment.pad=0 "
                         "augment.flip=false)")
    if section.pad >= min(image_shape[:2]):
        raise ValueError(f"augment.pad={section.pad} must be smaller than the images "
                         f"({image_shape[0]}x{image_shape[1]})")
    return Augment(tuple(int(v) for v in image_shape), section.pad, section.flip)


def check_rows(image_shape, rows: int) -> None:
    """ValueError when ``rows`` augmented images of ``image_shape`` a step hold 2**24
    pixels or more: the crop gathers through float32 flat indices, exact below 2**24."""
    if (cells := rows * int(np.prod(image_shape))) >= 2 ** 24:
        raise ValueError(f"augmentation of {rows} rows of {tuple(image_shape)} images per "
                         f"step: {cells} pixels exceed float32's exact integers (2**24); use "
                         "a smaller batch")


def draw(seed: int, epoch: int, worker: int, shape: tuple) -> np.ndarray:
    """Uniforms in [0, 1), float64, of ``shape``, from
    ``default_rng(SeedSequence([seed, epoch, worker, stream]))``: a function of
    (seed, epoch, worker) alone.

    Raises:
        ValueError: a negative seed, epoch or worker (SeedSequence entropy must be >= 0).
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("worker", worker)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, found {value}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, worker, _NOISE_STREAM]))
    return rng.random(shape)


def crop_flip(F, x, dy, dx, flip, image_shape, pad: int):
    """Shift and mirror each image row: (B, H*W*C) float32 -> (B, H*W*C) float32.

    Output pixel (i, j, c) of row b is input pixel (i + dy_b, j', c) with
    ``j' = W - 1 - (j + dx_b)`` when ``flip_b`` else ``j + dx_b``, and 0 where that lies
    outside the image: exactly the (H, W) crop at offset (pad + dy, pad + dx) of the
    mirrored (if ``flip_b``) image zero-padded by ``pad``. Indices are computed in float32:
    exact while B*H*W*C < 2**24 (``train.augmentation`` checks it). Exact (a gather and a 0/1 mask), differentiable in ``x``.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        x: (B, H*W*C) float32 rows stored (H, W, C).
        dy, dx: (B,) float32 integer shifts in [-pad, pad]; flip: (B,) float32 0 or 1.
        image_shape: (H, W, C).
        pad: the largest shift (only used to clip; 0 gives the identity for dy = dx = 0).
    """
    h, w, c = (int(v) for v in image_shape)
    width = h * w * c
    i = F.reshape(F.arange(0, h), shape=(1, h, 1, 1))
    j = F.reshape(F.arange(0, w), shape=(1, 1, w, 1))
    ch = F.reshape(F.arange(0, c), shape=(1, 1, 1, c))
    dy = F.reshape(dy, shape=(-1, 1, 1, 1))
    dx = F.reshape(dx, shape=(-1, 1, 1, 1))
    flip = F.reshape(flip, shape=(-1, 1, 1, 1))
    src_i = F.broadcast_add(i, dy)                                     # (B, H, 1, 1)
    shifted = F.broadcast_add(j, dx)                                   # (B, 1, W, 1)
    src_j = shifted + F.broadcast_mul(flip, (w - 1) - 2 * shifted)     # mirrored if flip
    inside = F.broadcast_mul((src_i >= 0) * (src_i <= h - 1),
                             (src_j >= 0) * (src_j <= w - 1))          # (B, H, W, 1)
    row = F.reshape(F.contrib.arange_like(x, axis=0), shape=(-1, 1, 1, 1)) * width
    flat = F.broadcast_add(F.broadcast_add(row, F.clip(src_i, 0, h - 1) * (w * c)),
                           F.broadcast_add(F.clip(src_j, 0, w - 1) * c, ch))  # (B, H, W, C)
    out = F.take(F.reshape(x, shape=(-1,)), F.reshape(flat, shape=(-1,)))
    mask = F.broadcast_like(inside, flat)
    return F.reshape(out, shape=(-1, width)) * F.reshape(mask, shape=(-1, width))
