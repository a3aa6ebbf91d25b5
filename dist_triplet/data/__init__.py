"""Data reading: named MNIST-format sets and your own data, as uint8 or float32 rows.

One entry point for training, :func:`load_data` (``data`` section of the config):

* ``data.dataset`` (``fashion_mnist``, ``mnist``, ``idx``) with ``data.root``: the named
  MNIST-format data sets, as before (:mod:`.idx`).
* ``data.path`` with ``data.format`` (``auto``, ``idx``, ``npz``, ``folder``, ``csv``):
  your own data (:mod:`.idx`, :mod:`.npz`, :mod:`.images`). ``auto`` decides from the
  path where that is unambiguous and asks for ``data.format`` where it is not.

:func:`load_rows` reads one split (or all rows) the same way for embedding (index,
search, embed), without the training class rules, with each image file's path.

Images stay uint8 (H, W, C) rows (scaled to [0, 1] in the training step on the device);
features stay float32. Without a test split the data are split by ``data.split``
(:mod:`.split`, whose docstring states the rules for 1-sample classes). With
``data.cache_dir`` the arrays are one memory-mapped copy per host (:mod:`.cache`).
docs/data.md is the user's guide.

Modules: :mod:`.formats` (which reader), :mod:`.idx`, :mod:`.npz`, :mod:`.images` (one
reader per format; :mod:`.arrays`: a bare ``.npy`` or IDX file, for the retrieval
commands), :mod:`.source` (the one pass over the pixels), :mod:`.split` (split protocols,
limits and class rules), :mod:`.cache` (the shared cache), :mod:`.load` (:func:`load_data`,
:func:`load_rows`). This file only names the public API.

Needs NumPy (and Pillow for image files); no MXNet.
"""
from __future__ import annotations

from .formats import FORMATS, detect_format, is_idx_dir, open_source
from .idx import (DATASET_NAMES, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, MNIST_CLASSES,
                  load_dataset, read_idx, write_idx)
from .images import MODES
from .load import ROW_SPLITS, load_data, load_rows
from .split import (SPLIT_PROTOCOLS, Split, anchor_rows, as_float, check_pair,
                    check_sampler_classes, check_test, check_training, class_split, describe,
                    limit_rows, stratified_split, subset)

__all__ = [
    "FASHION_MNIST_CLASSES", "MNIST_CLASSES", "DATASET_NAMES", "FASHION_MNIST_ROOT", "FORMATS",
    "SPLIT_PROTOCOLS", "MODES", "Split", "read_idx", "write_idx", "load_dataset",
    "subset", "limit_rows", "as_float", "anchor_rows", "detect_format", "is_idx_dir", "open_source",
    "load_data", "load_rows", "ROW_SPLITS",
    "check_training", "check_test", "check_pair", "check_sampler_classes",
    "stratified_split", "class_split", "describe",
]
