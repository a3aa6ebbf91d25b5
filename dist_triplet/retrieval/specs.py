"""Data specs (docs/search.md, "Data specs"): ``BASE[:train|:test|:all]`` (default
``test``), read into rows to embed and checked against the model's input. The training
class rules do not apply: a gallery may hold one class.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["DataOptions", "ModelInput", "Items", "read_items", "load_array", "SPLITS"]

SPLITS = ("train", "test", "all")


@dataclass
class DataOptions:
    """``--data-format``, ``--mode``, ``--image-size``, ``--set KEY=VALUE`` as ``data.*``."""

    format: Optional[str] = None
    mode: Optional[str] = None
    image_size: Optional[str] = None
    sets: Sequence[str] = ()

    def overrides(self) -> List[str]:
        """``data.key=value`` strings for :func:`dist_triplet.config.load_config`."""
        given = {f"data.{k}": (f"{flag} {v}", v) for k, flag, v in (
            ("format", "--data-format", self.format), ("mode", "--mode", self.mode),
            ("image_size", "--image-size", self.image_size)) if v is not None}
        for item in self.sets:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. image_size=32")
            if "." in key and not key.startswith("data."):
                raise ValueError(f"--set {item!r}: only data.* keys describe the data")
            if (key := key if key.startswith("data.") else "data." + key) in given:
                raise ValueError(f"--set {item!r} and {given[key][0]} both set {key}: give one")
            given[key] = (f"--set {item}", value)
        return [f"{k}={v}" for k, (_, v) in given.items()]


@dataclass
class ModelInput:
    """What an exported model takes (its meta.json): ``units`` F values a row; ``kind``
    ``"images"`` (uint8 / 255, ``image_shape`` (H, W, C); channels 1 = Pillow mode L,
    3 = RGB), ``"features"``, or None when meta.json does not say; ``where`` names it."""

    units: int
    kind: Optional[str] = None
    image_shape: Optional[tuple] = None
    where: str = "meta.json"

    @classmethod
    def from_meta(cls, units: int, meta: dict, where: str) -> "ModelInput":
        if "image_shape" not in meta:
            return cls(units, None, None, where)
        shape = meta["image_shape"]
        return cls(units, "features" if shape is None else "images", _hwc(shape), where)

    @property
    def mode(self) -> Optional[str]:
        """The Pillow mode of the model's images (L or RGB), or None."""
        return {1: "L", 3: "RGB"}.get(self.image_shape[2]) if self.kind == "images" else None

    def describe(self) -> str:
        if self.kind == "images":
            return f"{'x'.join(map(str, self.image_shape))} images ({self.units} values)"
        return f"{self.units}-D features" if self.kind == "features" else \
            f"{self.units} values per row"


@dataclass
class Items:
    """Rows to embed: ``x`` (N, F) float32 network input; ``labels`` (N,) int64 or None;
    ``class_names`` per class id; ``ids`` N item ids; ``image_shape`` (H, W) or (H, W, C)
    of image rows; ``kind`` images / features / None; ``source``, ``shape``: messages."""

    x: np.ndarray
    labels: Optional[np.ndarray]
    class_names: Optional[tuple]
    ids: List[str]
    image_shape: Optional[tuple]
    source: str
    kind: Optional[str] = None
    shape: Optional[tuple] = None
    reads: tuple = ()   # files read, and data directories (ending in os.sep): fsutil.check_not_read


def _hwc(shape) -> Optional[tuple]:
    """(H, W) -> (H, W, 1); (H, W, C) unchanged."""
    return None if shape is None else tuple(int(v) for v in shape) + (1,) * (len(shape) == 2)


def _check_input(items: Items, model: ModelInput) -> Items:
    """``items`` if they fit the model's input (one line naming the data, meta.json and
    both shapes otherwise); flat rows for an image model get the model's image shape."""
    width, kind = int(items.x.shape[1]), items.kind
    mine = _hwc(items.image_shape) if kind == "images" else None
    found = ModelInput(width, kind, mine).describe()
    bad = width != model.units or (model.kind == kind == "images" and mine != model.image_shape)
    if bad or (model.kind is not None and kind is not None and kind != model.kind):
        raise ValueError(f"{items.source}: the model takes {model.describe()} ({model.where}), "
                         f"found {found}" + (f" (shape {items.shape})" if items.shape else ""))
    if kind is None and model.kind == "images":
        shape = model.image_shape
        items.image_shape, items.kind = (shape[:2] if shape[2] == 1 else shape), "images"
    return items


def load_array(path: str, model: ModelInput) -> tuple:
    """An IDX images file or a ``.npy`` (by content) as ((N, F) float32, array shape), F
    values a row (:func:`read_items` checks F against ``model.units``).

    uint8 is divided by 255 (the training input of images; a model of features, trained on
    floats, refuses it); floats are used as they are (a warning when an image model gets
    values above 1). Raises FileNotFoundError / ValueError naming ``path``.
    """
    from ..data.arrays import read_array
    (arr, kind), units, where = read_array(path), model.units, model.where
    if kind == "npy" and arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: expected uint8 pixels (divided by 255) or floats "
                         f"(used as they are), found dtype {arr.dtype}")
    if kind == "idx" and arr.ndim != 3:
        raise ValueError(f"{path}: expected an IDX images file (3 dims, magic 2051), "
                         f"found {arr.ndim} dim(s): a labels file?")
    if not 2 <= arr.ndim <= 4 or arr.shape[0] == 0:
        raise ValueError(f"{path}: expected (N, {units}) or (N, rows, cols) images with "
                         f"N >= 1, found shape {arr.shape}")
    flat = arr.reshape(len(arr), -1).astype(np.float32)     # its width: read_items checks it
    if arr.dtype == np.uint8 and arr.ndim == 2 and model.kind == "features":
        raise ValueError(f"{path}: uint8 values, but the model takes float features ({where})")
    if arr.dtype == np.uint8:
        flat /= np.float32(255)              # the same float32 division as data.load_split
    elif bad := int(np.count_nonzero(~np.isfinite(flat))):
        raise ValueError(f"{path}: {bad} of {flat.size} values are NaN or infinite; "
                         "expected finite pixels")
    elif flat.max() > 1.0 and model.kind != "features":
        print(f"warning: {path}: float values go up to {float(flat.max()):g}, but the "
              "model was trained on pixels / 255 in [0, 1]; divide by 255 (or pass uint8 "
              "pixels) unless this is intended", file=sys.stderr, flush=True)
    return flat, tuple(arr.shape)


def _from_split(data, split: str, files, where: str, labels_path, reads=()) -> Items:
    x = np.asarray(data.images, np.float32) / np.float32(255 if data.images.dtype == "uint8" else 1)
    shape = data.image_shape
    shape = None if shape is None else tuple(shape[:2] if shape[2] == 1 else shape)
    if labels_path is not None:      # they would replace the labels, not the class names
        raise ValueError(f"labels file {labels_path}: {where} carries its own labels; a "
                         "labels file is for an IDX images file or a .npy")
    ids = files if files is not None else [f"{split}/{i}" for i in range(len(data.labels))]
    return Items(x, data.labels, tuple(data.class_names), list(ids), shape, where,
                 "features" if data.image_shape is None else "images", reads=tuple(reads))


def read_items(spec: str, model: ModelInput, labels_path: Optional[str] = None,
               options: Optional[DataOptions] = None) -> Items:
    """The rows of data ``spec`` (module docstring), checked against ``model``'s input;
    image files at the model's mode and size unless ``options`` set them.

    Raises:
        FileNotFoundError / ValueError: missing or invalid files, an unknown split, a row
            width or image shape other than the model's (the message names the data,
            meta.json and both shapes), a run whose data moved (names its config).
    """
    from ..config import load_config
    from ..data import FASHION_MNIST_ROOT, is_idx_dir, load_dataset, load_rows

    options = options or DataOptions()
    given = bool(options.overrides())           # any data option at all
    base, split = spec, "test"
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS:
        base, split = head, tail
    elif sep and not os.path.exists(spec) and (head in ("fashion_mnist", "mnist")
                                               or os.path.exists(head)):
        raise ValueError(f"data {spec}: unknown split {tail!r}; use {head}:train, "
                         f"{head}:test or {head}:all")
    config, named = None, base in ("fashion_mnist", "mnist")   # ./fashion_mnist: a directory
    if os.path.isdir(base) and os.path.isfile(os.path.join(base, "config.yaml")) and not named:
        config = os.path.join(base, "config.yaml")
    elif os.path.isfile(base) and base.lower().endswith((".yaml", ".yml")):
        config = base
    data_path = not named and (os.path.isdir(base) or (os.path.isfile(base) and base.lower(
        ).endswith((".npz", ".csv"))) or (os.path.exists(base) and bool(options.format)))
    if config is not None or (data_path and (given or not is_idx_dir(base))):
        overrides = options.overrides()
        keys, shape = {o.partition("=")[0] for o in overrides}, model.image_shape
        if config is None and "data.path" in keys:
            raise ValueError(f"data {spec}: --set path=... replaces the data path itself; "
                             "give the other path as the spec (or a run with --set path=)")
        if model.kind == "images" and (config is None or "data.path" in keys):  # as it takes
            wanted = (("data.mode", model.mode), ("data.image_size", f"{list(shape[:2])}"))
            overrides += [f"{k}={v}" for k, v in wanted if k not in keys and v is not None]
        try:
            cfg = load_config(config, overrides if config else [f"data.path={base}"] + overrides)
            data, files = load_rows(cfg.data, split)
        except (FileNotFoundError, ValueError) as exc:
            if config is None or config in str(exc):
                raise
            raise type(exc)(f"{config}: {exc}") from None   # the run's data moved
        if files is None and keys & {"data.mode", "data.image_size"}:   # not image files
            raise ValueError(f"data {spec}: --mode / --image-size apply to image files (a "
                             f"folder or a .csv); {cfg.data.path} is read as stored")
        where = f"{os.path.abspath(base)}:{split}"
        limit = {"train": cfg.data.limit_train, "test": cfg.data.limit_test}.get(split, 0)
        # data.limit_* keeps a sample: its row i is not row i of the full split, so its ids
        # must not read as the full data's (--exclude-self would leave out other items).
        tag = f"{split}[limit {limit}, seed {cfg.data.split_seed}]" if limit and \
            files is None else split
        d = cfg.data.path or ""       # a data directory covers its files: not one by one
        reads = [f for f in (config,) if f] + ([os.path.join(d, "")] if os.path.isdir(d) else
                                               [d] * bool(d) + list(files or ()))
        return _check_input(_from_split(data, tag, files, where, labels_path, reads), model)
    if given:
        raise ValueError(f"data {spec}: --data-format/--mode/--image-size/--set describe a "
                         "data path or a run's data; this spec is a named data set or a file")
    if named or os.path.isdir(base):
        if split == "all":
            raise ValueError(f"data {spec}: :all is for data paths and runs; use "
                             f"{base}:train or {base}:test")
        name = base if named else "fashion_mnist" if \
            os.path.realpath(base) == os.path.realpath(FASHION_MNIST_ROOT) else "idx"
        data = load_dataset(name, None if named else base, train=split == "train")
        where = f"{base if named else os.path.abspath(base)}:{split}"
        return _check_input(_from_split(data, split, None, where, labels_path,
                                        () if named else (os.path.join(base, ""),)), model)
    x, shape = load_array(spec, model)
    image_shape, kind = None, None
    if len(shape) in (3, 4):
        image_shape, kind = shape[1:], "images"
    elif model.kind is None:
        side = int(round(np.sqrt(x.shape[1])))
        image_shape = (side, side) if side * side == x.shape[1] else None
    labels = class_names = None
    if labels_path is not None:
        from ..data.arrays import read_labels
        values, labels = np.unique(read_labels(labels_path, len(x)), return_inverse=True)
        class_names = tuple(str(v) for v in values)   # the labels present (ids like 2e9 too)
    name = os.path.basename(spec)
    items = Items(x, labels, class_names, [f"{name}#{i}" for i in range(len(x))], image_shape,
                  os.path.abspath(spec), kind, shape, (spec,) + (labels_path,) * bool(labels_path))
    return _check_input(items, model)
