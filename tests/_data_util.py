"""Small generated data sets in every format, for the data tests and the end-to-end runs.

Each image is its class's prototype plus noise, so the classes are learnable; pixel values
are a function of (seed, class, index), so tests can recompute what a file holds.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from dist_triplet.data.images import pillow

# Load Pillow's core now, at collection, bound to its own libjpeg: a test that imports
# horovod.mxnet in this process first would otherwise break every JPEG (see pillow()).
try:
    pillow()
except ValueError:  # no Pillow: the image tests skip themselves
    pass


def data_cfg(**kw) -> SimpleNamespace:
    """A ``data`` config section (DataConfig's defaults) with ``kw`` changed."""
    base = dict(dataset="fashion_mnist", root=None, path=None, format="auto", mode="RGB",
                image_size=None, split="fraction", test_fraction=0.2, split_seed=0,
                cache_dir=None, limit_train=0, limit_test=0)
    base.update(kw)
    return SimpleNamespace(**base)


def make_images(n_per_class, classes, h, w, c, seed=0) -> tuple:
    """(N, H, W, C) uint8 images and (N,) int64 labels, class-major."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, h, w, c))
    labels = np.repeat(np.arange(classes), n_per_class)
    noise = rng.integers(0, 256, size=(len(labels), h, w, c))
    images = np.round(0.5 * protos[labels] + 0.5 * noise).astype(np.uint8)
    return images, labels


def write_png(path, array) -> None:
    Image = pillow()
    arr = np.asarray(array, np.uint8)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def write_folder(root, images, labels, names=None, ext=".png") -> list:
    """ROOT/<name>/<i>.png for each image; returns the paths in class-folder order."""
    names = names or [f"class_{c:02d}" for c in range(int(labels.max()) + 1)]
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        folder = os.path.join(root, names[lab])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:05d}{ext}")
        write_png(path, img)
        paths.append(path)
    return paths


def write_csv(path, rows, header="path,label") -> None:
    with open(path, "w") as fh:
        fh.write(header + "\n")
        for row in rows:
            fh.write(",".join(str(v) for v in row) + "\n")
