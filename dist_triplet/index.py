"""A saved nearest-neighbour index over a gallery of embeddings (faiss), and its CLI.

    python -m dist_triplet.index --model RUN/model --data RUN:train --out INDEX_DIR \\
        [--kind flat|hnsw|ivf] [--batch-size 2048] [--force] \\
        [--format F --mode M --image-size H,W --set KEY=VALUE]   (for a data path)

``--data``: any data the trainer reads (:func:`read_items`: the run's own data, a data
set, an image folder, CSV, ``.npz``, IDX, or a ``.npy`` file).

The gallery is embedded with an exported model (:mod:`dist_triplet.export`) and stored in
``INDEX_DIR``:

    index.faiss   the faiss index (``faiss.write_index``); squared-L2 metric
    labels.npy    (N,) int64 class ids of the gallery items (-1: unknown)
    ids.json      {"ids": [N item ids or file paths], "class_names": [...] or null}
    images.npy    (N, H, W) or (N, H, W, 3) uint8 thumbnails (image data only)
    meta.json     kind, dimension, count, the model (path, params sha256), the data spec,
                  the approximate index's measured recall@10, and each file's sha256

The directory is written under a temporary name, fsynced and renamed: a reader sees no
index or a whole one. ``index_id`` (meta.json) is a sha256 over the content files; a
threshold (:mod:`dist_triplet.calibrate`) records it, so it cannot be used with another
index. :meth:`Index.load` checks every file against its sha256.

Distances are **squared Euclidean distances in embedding units** (the units of the
triplet margin, ``gluon.loss.TripletLoss``).

Kinds: ``flat`` (``IndexFlatL2``, exact; default), ``hnsw`` (``IndexHNSWFlat``, M=32,
efSearch 64 by default) and ``ivf`` (``IndexIVFFlat``, nlist ~ 4 sqrt(N), nprobe 16 by
default), following the faiss wiki "Guidelines to choose an index". An approximate
index's recall@10 against the exact search is measured on up to 1,000 gallery items when
it is built, printed and stored in meta.json.

Ranking and ties. faiss ranks by float32 distances, which orders near-ties by rounding
noise and returns an arbitrary member of a tie. :meth:`Index.search` re-ranks faiss's
candidates by the key of :func:`dist_triplet.metrics.retrieval_metrics` (float64
``||q||^2 + ||x||^2 - 2 q.x``, snapped at 0, rounded to float32) with ties broken by
the lower gallery position; for the flat index it widens the candidate list until a
rigorous float32 error bound certifies that nothing outside can rank higher. So a
leave-one-out search of the test set reproduces the run's Precision@1 exactly (one
caveat, shared with metrics' fast path: the dot product is summed per pair, not by GEMM,
so a key within one float64 rounding of a float32 rounding boundary could round the
other way).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .fsutil import atomic_dir, check_can_write

__all__ = ["Items", "DataOptions", "ModelInput", "check_input", "read_items", "Index",
           "build_index", "write_index_dir", "main", "KINDS", "IndexInputError"]

KINDS = ("flat", "hnsw", "ivf")
FORMAT = "dist_triplet.index/1"
_CONTENT = ("index.faiss", "labels.npy", "ids.json")  # hashed into index_id
_U32 = 2.0 ** -24        # float32 unit roundoff
RECALL_K = 10
RECALL_QUERIES = 1000
RECALL_RTOL = 1e-5
SPLITS = ("train", "test")
ROW_SPLITS = ("train", "test", "all")


class IndexInputError(ValueError):
    """Bad index directory or request (the message names the file and the value)."""


# ----------------------------------------------------------------------------- data specs

@dataclass
class DataOptions:
    """How a path spec is read (the CLIs' ``--format``, ``--mode``, ``--image-size`` and
    ``--set KEY=VALUE``), as ``data.*`` overrides of the config the spec starts from."""

    format: Optional[str] = None
    mode: Optional[str] = None
    image_size: Optional[str] = None
    sets: Sequence[str] = ()

    def overrides(self) -> List[str]:
        """``data.key=value`` strings for :func:`dist_triplet.config.load_config`."""
        out = [f"data.{k}={v}" for k, v in (("format", self.format), ("mode", self.mode),
                                            ("image_size", self.image_size)) if v is not None]
        for item in self.sets:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. image_size=32")
            if "." in key and not key.startswith("data."):
                raise ValueError(f"--set {item!r}: only data.* keys describe the data")
            out.append(f"{key if key.startswith('data.') else 'data.' + key}={value}")
        return out

    def __bool__(self) -> bool:
        return bool(self.format or self.mode or self.image_size or self.sets)


@dataclass
class ModelInput:
    """What an exported model takes (its meta.json, :mod:`dist_triplet.export`).

    units: the input width F. kind: ``"images"`` (uint8 pixels / 255, ``image_shape``
    (H, W, C)), ``"features"`` (used as they are) or None when meta.json does not say
    (exports before issue 10). where: meta.json's path, for messages.
    """

    units: int
    kind: Optional[str] = None
    image_shape: Optional[tuple] = None
    where: str = "meta.json"

    @classmethod
    def from_meta(cls, units: int, meta: dict, where: str) -> "ModelInput":
        if "image_shape" not in meta:
            return cls(units, None, None, where)
        shape = meta["image_shape"]
        if shape is None:
            return cls(units, "features", None, where)
        return cls(units, "images", tuple(int(v) for v in shape), where)

    def describe(self) -> str:
        if self.kind == "images":
            return f"{'x'.join(map(str, self.image_shape))} images ({self.units} values)"
        if self.kind == "features":
            return f"{self.units}-D features"
        return f"{self.units} values per row"


def _hwc(shape: Optional[tuple]) -> Optional[tuple]:
    """(H, W) -> (H, W, 1); (H, W, C) unchanged; None unchanged."""
    if shape is None:
        return None
    return tuple(shape) + (1,) if len(shape) == 2 else tuple(shape)


def check_input(items: "Items", model: ModelInput) -> "Items":
    """Check ``items`` against the model's input; returns them, with the model's image
    shape for flat rows of a known image model.

    Raises:
        ValueError: one line naming the data, meta.json and both shapes: images of
            another (H, W, C), images for a features model or features for an image
            model, or another row width.
    """
    width = int(items.x.shape[1])
    kind = items.kind
    mine = _hwc(items.image_shape) if kind == "images" else None
    found = (f"{'x'.join(map(str, mine))} images ({width} values)" if kind == "images"
             else f"{width}-D features" if kind == "features" else f"rows of {width} values")
    bad = width != model.units
    if model.kind == "images" and kind == "images":
        bad = bad or mine != _hwc(model.image_shape)
    elif model.kind is not None and kind is not None and kind != model.kind:
        bad = True
    if bad:
        raise ValueError(f"{items.source}: the model takes {model.describe()} ({model.where}), "
                         f"found {found}" + (f" (shape {items.shape})" if items.shape else ""))
    if kind is None and model.kind == "images":
        # flat rows for an image model: the model's shape, for thumbnails
        shape = model.image_shape
        items.image_shape = tuple(shape[:2]) if shape[2] == 1 else tuple(shape)
        items.kind = "images"
    return items


@dataclass
class Items:
    """Rows to embed, with what is known about them.

    Attributes:
        x: (N, F) float32 network input (pixels / 255 for 8-bit images).
        labels: (N,) int64 class ids, or None when the data carry no labels.
        class_names: name of each class id (None without labels).
        ids: N item ids: the file path relative to the data root for image folders and
            CSV, ``<split>/<row>`` for other data sets, ``<file>#<row>`` for a file.
        image_shape: (rows, cols) or (rows, cols, channels) when rows are images, else None.
        source: the data spec, for messages and meta.json.
        kind: ``"images"``, ``"features"``, or None for flat rows of unknown kind.
        shape: the array shape as read (for messages), or None.
    """

    x: np.ndarray
    labels: Optional[np.ndarray]
    class_names: Optional[tuple]
    ids: List[str]
    image_shape: Optional[tuple]
    source: str
    kind: Optional[str] = None
    shape: Optional[tuple] = None


def _square(width: int) -> Optional[tuple]:
    side = int(round(np.sqrt(width)))
    return (side, side) if side * side == width else None


def _read_labels(path: str, n: int) -> np.ndarray:
    """(n,) int64 labels from an IDX labels file or an integer .npy."""
    from .data import read_idx
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path} does not exist")
    with open(path, "rb") as fh:
        npy = fh.read(6) == b"\x93NUMPY"
    lab = np.load(path, allow_pickle=False) if npy else read_idx(path)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 0):
        raise ValueError(f"{path}: expected (N,) non-negative integer labels, found shape "
                         f"{lab.shape} dtype {lab.dtype}")
    if lab.shape[0] != n:
        raise ValueError(f"{path}: holds {lab.shape[0]} labels for {n} images")
    return lab.astype(np.int64)


def _config_file(base: str) -> Optional[str]:
    """The config a spec names: ``RUN_DIR`` (its config.yaml) or a ``.yaml`` file."""
    if os.path.isdir(base) and os.path.isfile(os.path.join(base, "config.yaml")):
        return os.path.join(base, "config.yaml")
    if os.path.isfile(base) and base.lower().endswith((".yaml", ".yml")):
        return base
    return None


def _is_data_path(base: str) -> bool:
    """A path the trainer's data.path reads (not an IDX images file or a .npy)."""
    if os.path.isdir(base):
        return True
    return os.path.isfile(base) and base.lower().endswith((".npz", ".csv"))


def _from_split(data, split: str, files: Optional[List[str]], where: str,
                labels_path: Optional[str]) -> Items:
    """Items of a data Split (uint8 images / 255, features as they are)."""
    x = data.images
    kind = "images" if data.image_shape is not None else "features"
    if x.dtype == np.uint8:  # the Split keeps bytes; the network takes bytes / 255
        x = x.astype(np.float32) / np.float32(255)
    else:
        x = np.asarray(x, np.float32)
    # The Split says whether rows are images: (H, W, C); one channel is kept as (H, W).
    shape = data.image_shape
    if shape is not None and shape[2] == 1:
        shape = shape[:2]
    labels = data.labels
    if labels_path is not None:
        labels = _read_labels(labels_path, len(labels))
    ids = files if files is not None else [f"{split}/{i}" for i in range(len(labels))]
    return Items(x, labels, tuple(data.class_names), list(ids),
                 tuple(shape) if shape else None, where, kind)


def read_items(spec: str, model, labels_path: Optional[str] = None,
               options: Optional[DataOptions] = None) -> Items:
    """Turn a data spec into the rows to embed: the one place the CLIs read data.

    ``spec`` is ``BASE[:train|:test|:all]`` (default split ``test``), BASE one of:

    * ``RUN_DIR`` (a directory holding ``config.yaml``) or a config ``.yaml`` file: the
      data section of that config, read as the trainer reads it
      (:func:`dist_triplet.data.load_rows`: same files, format, mode, image size, split
      protocol, seed and limits), so ``RUN:test`` is the run's evaluated test set;
    * ``fashion_mnist`` or ``mnist``: a named data set (:func:`dist_triplet.data.load_dataset`);
    * a directory of MNIST-format IDX files (class names ``"0"``, ``"1"``, ...;
      Fashion-MNIST's names for its Debian directory);
    * a data path as ``data.path`` takes it: an image folder, a ``.csv``, a ``.npz`` or a
      directory with ``train.npz``, with ``options`` (``--format``, ``--mode``,
      ``--image-size``, ``--set KEY=VALUE``) as ``data.*`` keys;
    * a file: an IDX images file or a ``.npy`` of (N, F) rows, (N, H, W) or
      (N, H, W, C) images (uint8 / 255, floats as they are), read by
      :func:`dist_triplet.embed.load_images`; no labels unless ``labels_path`` (IDX
      labels or integer ``.npy``) is given.

    ``options`` also apply to a run's or config's data section (e.g. another
    ``data.path`` with the run's mode and image size). ``split`` ``all`` = every row,
    without the split and limits. Image-folder and CSV rows get their file paths
    (relative to the data root) as ids.

    Args:
        model: a :class:`ModelInput` (the model's input width and kind, checked by
            :func:`check_input`), or the input width F (int).

    Raises:
        FileNotFoundError / ValueError: missing or invalid files, a row width or image
            shape other than the model's (the message names the data, meta.json and both
            shapes), an unknown split (the message names the spec).
    """
    from .config import load_config
    from .data import FASHION_MNIST_ROOT, load_dataset, load_rows
    from .data import is_idx_dir
    from .embed import load_images

    model = model if isinstance(model, ModelInput) else ModelInput(int(model))
    options = options or DataOptions()
    base, split = spec, "test"
    head, sep, tail = spec.rpartition(":")
    if sep and tail in ROW_SPLITS:
        base, split = head, tail
    elif sep and not os.path.exists(spec) and (
            head in ("fashion_mnist", "mnist") or os.path.exists(head)):
        raise ValueError(f"data {spec}: unknown split {tail!r}; use {head}:train, "
                         f"{head}:test or {head}:all")
    config = _config_file(base)
    data_path = os.path.exists(base) and (_is_data_path(base) or bool(options.format))
    if config is not None or (data_path and (options or not is_idx_dir(base))):
        overrides = options.overrides()
        try:
            if config is not None:
                cfg = load_config(config, overrides)
            else:
                cfg = load_config(None, [f"data.path={base}"] + overrides)
            data, files = load_rows(cfg.data, split)
        except (FileNotFoundError, ValueError) as exc:
            if config is None or config in str(exc):
                raise
            # The run's data.path is as it was given to the trainer (maybe relative to
            # its working directory): say which config named it.
            raise type(exc)(f"{config}: {exc}") from None
        where = os.path.abspath(base)
        items = _from_split(data, split, files, f"{where}:{split}", labels_path)
        return check_input(items, model)
    if options:
        raise ValueError(f"data {spec}: --data-format/--mode/--image-size/--set describe a "
                         "data path or a run's data; this spec is a named data set or a file")
    if base in ("fashion_mnist", "mnist") or os.path.isdir(base):
        if split == "all":
            raise ValueError(f"data {spec}: :all is for data paths and runs; use "
                             f"{base}:train or {base}:test")
        if base in ("fashion_mnist", "mnist"):
            data = load_dataset(base, None, train=split == "train")
        else:
            same = os.path.realpath(base) == os.path.realpath(FASHION_MNIST_ROOT)
            data = load_dataset("fashion_mnist" if same else "idx", base,
                                train=split == "train")
        where = os.path.abspath(base) if os.path.isdir(base) else base
        if data.images.shape[1] != model.units:
            raise ValueError(f"{data.source}: the model takes {model.units} values per image, "
                             f"the {split} images have {data.images.shape[1]}")
        items = _from_split(data, split, None, f"{where}:{split}", labels_path)
        return check_input(items, model)
    x = load_images(spec, model.units)
    with open(spec, "rb") as fh:
        npy = fh.read(6) == b"\x93NUMPY"
    kind, arr_shape = None, None
    if npy:
        arr = np.load(spec, mmap_mode="r", allow_pickle=False)
        arr_shape = tuple(arr.shape)
        if arr.ndim in (3, 4):
            shape, kind = tuple(arr.shape[1:]), "images"
        else:
            shape = _square(x.shape[1]) if model.kind is None else None
    else:  # an IDX images file: rows x cols are the model's if it says, else square
        shape = _square(x.shape[1])
    labels = class_names = None
    if labels_path is not None:
        labels = _read_labels(labels_path, len(x))
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    name = os.path.basename(spec)
    items = Items(x, labels, class_names, [f"{name}#{i}" for i in range(len(x))], shape,
                  os.path.abspath(spec), kind, arr_shape)
    return check_input(items, model)


# ----------------------------------------------------------------------------- model

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Model:
    """An exported embedding network (:func:`dist_triplet.export.load_model`) with its
    input width, embedding width and the sha256 of its parameters file."""

    def __init__(self, path: str):
        from .embed import _input_units, _resolve_model_dir
        from .export import load_model, model_files, read_meta
        self.dir = os.path.abspath(_resolve_model_dir(path))
        self.block = load_model(self.dir)
        meta = read_meta(self.dir)
        self.in_units = _input_units(self.block, meta, model_files(self.dir)[2])
        # What the model takes (images of (H, W, C) or features), checked against the data.
        self.input = ModelInput.from_meta(self.in_units, meta, model_files(self.dir)[2])
        self.dim = meta.get("embedding_dim")
        self.params_sha256 = sha256_file(model_files(self.dir)[1])

    def embed(self, x: np.ndarray, batch_size: int = 2048, desc: str = "embedding",
              source: Optional[str] = None) -> np.ndarray:
        """(N, F) float32 -> (N, D) float32, in batches, with a progress bar on a terminal.
        batch_size 2048 = eval.batch_size's default, so the embeddings are the evaluator's.
        Raises ValueError naming ``source`` (the input, for the message) when an embedding
        value is NaN or infinite."""
        from tqdm import tqdm

        from .embed import embed_images
        out = []
        with tqdm(total=len(x), desc=desc, unit="item", disable=not sys.stderr.isatty(),
                  leave=False) as bar:
            for start in range(0, len(x), batch_size):
                out.append(embed_images(self.block, x[start:start + batch_size], batch_size))
                bar.update(len(out[-1]))
        emb = np.concatenate(out) if out else np.zeros((0, self.dim or 0), np.float32)
        bad = int(np.count_nonzero(~np.isfinite(emb)))
        if bad:
            raise ValueError(f"{source + ': ' if source else ''}the model in {self.dir} gave "
                             f"{bad} non-finite embedding values (NaN or infinite): are the "
                             "inputs scaled as in training (pixels / 255 in [0, 1])?")
        return emb


# faiss computes squared distances in float32: |q - x|^2 <= 2 (|q|^2 + |x|^2) must stay
# below float32's largest value, else it overflows to inf and faiss returns no neighbour.
MAX_SQ_NORM = float(np.finfo(np.float32).max) / 8


def check_in_range(emb: np.ndarray, source: str) -> None:
    """Raise IndexInputError naming ``source`` when an embedding (M, D) float32 is so
    large that its squared distances overflow float32 (``MAX_SQ_NORM``)."""
    sq = np.einsum("ij,ij->i", emb.astype(np.float64), emb.astype(np.float64))
    big = ~(sq <= MAX_SQ_NORM)
    if big.any():
        raise IndexInputError(
            f"{source}: {int(big.sum())} of {len(sq)} embeddings have squared norm up to "
            f"{float(sq.max()):.3g}, beyond {MAX_SQ_NORM:.3g}, where squared distances "
            "overflow float32: are the inputs scaled as in training (pixels / 255 in [0, 1])?")



# ----------------------------------------------------------------------------- building

def build_index(emb: np.ndarray, kind: str = "flat", *, hnsw_m: int = 32, ef_search: int = 64,
                nprobe: int = 16, seed: int = 0):
    """A faiss index over ``emb`` (N, D) float32 (squared L2). Returns (index, params).

    ``hnsw``: ``IndexHNSWFlat(D, hnsw_m)``, ``efSearch = ef_search``. ``ivf``:
    ``IndexIVFFlat`` with nlist = min(4 sqrt(N), N / 39) (faiss wants >= 39 training
    points per list), trained on the gallery, ``nprobe = min(nprobe, nlist)``.
    """
    import faiss
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if kind == "flat":
        index, params = faiss.IndexFlatL2(d), {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efSearch": ef_search,
                  "efConstruction": int(index.hnsw.efConstruction)}
    elif kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = seed
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    index.add(emb)
    return index, params


def measured_recall(index, emb: np.ndarray, k: int = RECALL_K, queries: int = RECALL_QUERIES,
                    seed: int = 0) -> dict:
    """Recall@k of ``index`` against exact search, on up to ``queries`` gallery items.

    For each sampled gallery vector q: the share of the index's k results whose exact
    squared distance is at most the exact k-th smallest distance, within float32 rounding
    (relative 1e-5: even the flat index ranks in float32), so a tie at the k-th place
    counts as found whichever member faiss returned; averaged. The flat index gives 1.0. Returns
    ``{"recall_at_k": float, "k": k, "queries": m}``.
    """
    import faiss
    n = len(emb)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = emb[pick]
    exact = faiss.IndexFlatL2(emb.shape[1])
    exact.add(emb)
    # The exact k-th distance in float64, from the flat index's k + 10 best candidates
    # (float32 rounding may misorder near-ties, never by 10 places).
    _, cand = exact.search(q, min(n, k + 10))
    _, got = index.search(q, k)
    x64, q64 = emb.astype(np.float64), q.astype(np.float64)
    found = 0
    for i in range(len(q)):
        kth = np.sort(((x64[cand[i]] - q64[i]) ** 2).sum(axis=1))[k - 1]
        mine = got[i][got[i] >= 0]
        found += int(np.count_nonzero(((x64[mine] - q64[i]) ** 2).sum(axis=1)
                                      <= kth * (1 + RECALL_RTOL) + 1e-12))
    return {"recall_at_k": found / (k * len(q)), "k": int(k), "queries": int(len(q))}


def is_index_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "meta.json")) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: str, force: bool) -> None:
    """Refuse ``out`` before any work: it exists (without ``force``), or is not an index."""
    if os.path.exists(out):
        if not force:
            raise ValueError(f"--out {out} already exists; pass --force to replace it")
        if not os.path.isdir(out) or (os.listdir(out) and not is_index_dir(out)):
            raise ValueError(f"--out {out} exists and is not an index directory; "
                             "--force replaces only an index")
    check_can_write(out, "--out")


# meta.json's keys that readers use: key -> (type(s), description for the message).
_META_SCHEMA = {
    "kind": (str, "a string"),
    "index_id": (str, "a string"),
    "files": (dict, "a mapping of file name to sha256"),
    "model": (dict, "a mapping with dir, params_sha256"),
    "params": (dict, "a mapping"),
}
_MODEL_SCHEMA = {"dir": str, "params_sha256": str}


def _check_meta_schema(meta: dict, meta_path: str) -> None:
    """Raise IndexInputError naming ``meta_path`` and the key when meta.json lacks a key
    the readers use, or holds a value of the wrong type (an edited or damaged index)."""
    def bad(key: str, want: str) -> IndexInputError:
        found = "missing" if key not in meta else f"is {meta[key]!r}"
        return IndexInputError(f"{meta_path}: key {key!r} {found}, expected {want}: "
                               "corrupt or edited index; rebuild it with dist_triplet.index")
    for key, (kind, want) in _META_SCHEMA.items():
        if not isinstance(meta.get(key), kind):
            raise bad(key, want)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["files"].items()):
        raise bad("files", _META_SCHEMA["files"][1])
    for key, kind in _MODEL_SCHEMA.items():
        if not isinstance(meta["model"].get(key), kind):
            found = "missing" if key not in meta["model"] else f"is {meta['model'][key]!r}"
            raise IndexInputError(f"{meta_path}: key 'model.{key}' {found}, expected a "
                                  "string: corrupt or edited index; rebuild it with "
                                  "dist_triplet.index")
    if meta["kind"] == "hnsw" and not isinstance(meta["params"].get("efSearch"), int):
        raise bad("params", "a mapping with an integer efSearch")
    if meta["kind"] == "ivf" and not isinstance(meta["params"].get("nprobe"), int):
        raise bad("params", "a mapping with an integer nprobe")


def write_index_dir(out: str, index, labels: np.ndarray, ids: Sequence[str],
                    class_names: Optional[Sequence[str]], images: Optional[np.ndarray],
                    meta: dict, force: bool = False) -> dict:
    """Write an index directory atomically; returns its meta.json contents.

    Everything goes into ``.<name>.tmp-<pid>`` beside ``out``, is fsynced and renamed to
    ``out`` (:func:`dist_triplet.fsutil.atomic_dir`; an earlier index there is replaced
    only with ``force``). On an exception nothing is left behind.
    """
    import faiss
    check_out_dir(out, force)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_dir(out) as tmp:
        faiss.write_index(index, os.path.join(tmp, "index.faiss"))
        np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))
        with open(os.path.join(tmp, "ids.json"), "w") as fh:
            json.dump({"ids": list(ids),
                       "class_names": list(class_names) if class_names is not None else None},
                      fh)
        if images is not None:
            np.save(os.path.join(tmp, "images.npy"), images)
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        meta = dict(meta, format=FORMAT, files=files,
                    index_id=hashlib.sha256("".join(files[f] for f in _CONTENT)
                                            .encode()).hexdigest())
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
    return meta


# ----------------------------------------------------------------------------- loading, search

def exact_keys(q: np.ndarray, x: np.ndarray, q_norm: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
    """Ranking keys of metrics.retrieval_metrics for pairs: q (M, D), x (M, C, D) float64,
    norms (M,) and (M, C) -> (M, C) float32 squared distances (see metrics._exact_sq_dist)."""
    try:  # the evaluation branch moves the search engine (and this key) into knn.py
        from .knn import exact_keys as key
    except ImportError:
        from .metrics import _exact_sq_dist as key
    with np.errstate(invalid="ignore", over="ignore"):
        return key(np.einsum("mcd,md->mc", x, q), q_norm[:, None] + x_norm)


class Index:
    """A loaded index directory (see the module docstring).

    Attributes: ``dir``, ``meta`` (meta.json), ``faiss`` (the faiss index), ``dim`` D,
    ``labels`` (N,) int64 (-1 unknown), ``ids`` (N str), ``class_names`` (or None),
    ``images`` (N, rows, cols) uint8 memory-mapped, or None.
    """

    def __init__(self, path: str, meta: dict, index, labels, ids, class_names, images):
        self.dir, self.meta, self.faiss = path, meta, index
        self.dim, self.labels, self.ids = int(index.d), labels, ids
        self.class_names, self.images = class_names, images
        self._vectors = None

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def index_id(self) -> str:
        return self.meta["index_id"]

    @classmethod
    def load(cls, path: str) -> "Index":
        """Load and verify ``path``. Raises IndexInputError naming the file: missing directory
        or file, a file whose sha256 differs from meta.json's (corrupt), unreadable data."""
        import faiss
        if not os.path.isdir(path):
            raise IndexInputError(f"index directory {path} does not exist (build one with "
                              "python -m dist_triplet.index)")
        meta_path = os.path.join(path, "meta.json")
        try:
            with open(meta_path) as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            raise IndexInputError(f"{meta_path} is missing: {path} is not an index "
                                  "directory") from None
        except ValueError as exc:
            raise IndexInputError(f"{meta_path}: not valid JSON ({exc}): corrupt index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise IndexInputError(f"{meta_path}: format {found!r} is not {FORMAT!r}")
        _check_meta_schema(meta, meta_path)
        for name, digest in meta.get("files", {}).items():
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise IndexInputError(f"{fpath} is missing: incomplete index directory")
            if sha256_file(fpath) != digest:
                raise IndexInputError(f"{fpath}: sha256 differs from meta.json's: the file is "
                                  "corrupt or was changed after the index was built")
        for name in _CONTENT:
            if name not in meta.get("files", {}):
                raise IndexInputError(f"{meta_path}: lists no {name}: corrupt index")
        try:
            index = faiss.read_index(os.path.join(path, "index.faiss"))
            labels = np.load(os.path.join(path, "labels.npy"), allow_pickle=False)
            with open(os.path.join(path, "ids.json")) as fh:
                doc = json.load(fh)
            images = (np.load(os.path.join(path, "images.npy"), mmap_mode="r")
                      if "images.npy" in meta["files"] else None)
        except (RuntimeError, ValueError, OSError) as exc:
            raise IndexInputError(f"{path}: cannot read the index: "
                                  f"{str(exc).splitlines()[0]}") from None
        n = int(index.ntotal)
        if labels.shape != (n,) or len(doc.get("ids", [])) != n:
            raise IndexInputError(f"{path}: {n} vectors but {labels.shape} labels and "
                              f"{len(doc.get('ids', []))} ids: corrupt index")
        kind = meta.get("kind")
        if kind == "hnsw":
            index.hnsw.efSearch = int(meta["params"]["efSearch"])
        elif kind == "ivf":
            index.nprobe = int(meta["params"]["nprobe"])
        cn = doc.get("class_names")
        return cls(os.path.abspath(path), meta, index, labels, doc["ids"],
                   tuple(cn) if cn is not None else None, images)

    def vectors(self) -> np.ndarray:
        """(N, D) float64 gallery vectors (reconstructed from the index once)."""
        if self._vectors is None:
            if self.meta.get("kind") == "ivf":
                self.faiss.make_direct_map()
            self._vectors = self.faiss.reconstruct_n(0, len(self)).astype(np.float64)
            self._norms = np.einsum("ij,ij->i", self._vectors, self._vectors)
        return self._vectors

    def label_name(self, label: int) -> Optional[str]:
        if label < 0 or self.class_names is None:
            return None
        return self.class_names[label]

    def search(self, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None,
               chunk: int = 1024) -> tuple:
        """Top-``k`` gallery items of each query.

        Args:
            queries: (M, D) float32 embeddings.
            k: 1 <= k <= N (N - 1 when excluding).
            exclude: (M,) int64 gallery position to leave out per query (-1: none); the
                leave-one-out search of a gallery against itself.

        Returns:
            (dist (M, k) float32 squared L2 in embedding units, pos (M, k) int64 gallery
            positions), ranked by the metrics key, ties by lower position (module
            docstring). For the flat index the result is exact; for hnsw/ivf it is the
            re-ranked approximate candidate set (positions -1 / distance inf if fewer).

        Raises:
            IndexInputError: width other than D, or k out of range.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(self)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexInputError(f"queries have shape {q.shape}, the index {self.dir} holds "
                              f"{self.dim}-wide embeddings")
        excl = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        room = n - (1 if (excl >= 0).any() else 0)
        if not 1 <= k <= room:
            raise IndexInputError(f"k={k} but the gallery of {self.dir} has {n} items"
                              f"{' (one left out per query)' if room < n else ''}: use k <= {room}")
        x64 = self.vectors()
        xn = self._norms
        exact = self.meta.get("kind", "flat") == "flat"
        dist = np.empty((len(q), k), np.float32)
        pos = np.empty((len(q), k), np.int64)
        # Bound on |faiss float32 distance - true distance|: the expansion in float32 with
        # D-term dot products (Higham, Accuracy and Stability, 3.1): (D + 4) u (|q|^2 + |x|^2),
        # doubled for safety.
        max_xn = float(xn.max()) if n else 0.0
        for s in range(0, len(q), chunk):
            qb, eb = q[s:s + chunk], excl[s:s + chunk]
            q64 = qb.astype(np.float64)
            qn = np.einsum("ij,ij->i", q64, q64)
            err = 2 * (self.dim + 4) * _U32 * (qn + max_xn)
            todo = np.arange(len(qb))
            width = min(n, k + 1 + max(8, k))
            while todo.size:
                # (queries x width x D) float64 gathered per pass: at most ~2^24 values.
                step = max(1, (1 << 24) // (width * self.dim))
                left = []
                for t in range(0, todo.size, step):
                    sub = todo[t:t + step]
                    top_k, top_p, done = self._rank(qb[sub], q64[sub], qn[sub], eb[sub],
                                                    err[sub], k, width, exact)
                    dist[s + sub[done]] = top_k[done]
                    pos[s + sub[done]] = top_p[done]
                    left.append(sub[~done])
                todo = np.concatenate(left)
                width = min(n, width * 4)
        return dist, pos

    def _rank(self, qb, q64, qn, eb, err, k, width, exact):
        """One pass over ``width`` faiss candidates: re-ranked top k and which are certain."""
        n = len(self)
        d_f, cand = self.faiss.search(qb, width)
        ok = cand >= 0
        c = np.where(ok, cand, 0)
        keys = exact_keys(q64, self._vectors[c], qn, self._norms[c])
        keys[~ok | (cand == eb[:, None])] = np.inf
        order = np.lexsort((np.where(ok, cand, n), keys), axis=-1)[:, :k]  # ties: lower position
        top_k = np.take_along_axis(keys, order, 1)
        top_p = np.take_along_axis(np.where(ok, cand, -1), order, 1)
        if not exact or width >= n:
            return top_k, top_p, np.ones(len(qb), bool)
        # Anything not returned has a faiss distance >= the last one, hence a true key
        # >= d_last - err: the top k are certain when the k-th key is below that.
        bound = (d_f[:, -1].astype(np.float64) - err) * (1 - 4 * _U32)
        return top_k, top_p, top_k[:, -1] < bound


# ----------------------------------------------------------------------------- CLI

def add_data_options(p: argparse.ArgumentParser, format_alias: bool = True) -> None:
    """The options of a data path spec, shared by index, search, calibrate and embed
    (``--data-format``; also ``--format`` where the CLI has no output format)."""
    g = p.add_argument_group("data path options (data.* keys, as the trainer reads them)")
    g.add_argument(*(("--data-format", "--format") if format_alias else ("--data-format",)),
                   dest="data_format",
                   choices=("auto", "idx", "npz", "folder", "csv"),
                   help="data.format of a data path (default: auto-detected)")
    g.add_argument("--mode", choices=("L", "RGB"), help="data.mode of image files")
    g.add_argument("--image-size", help="data.image_size of image files: H,W or one int")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any data.* key, e.g. --set split=classes (repeatable); applies to a "
                        "run's data section too")


def data_options(args: argparse.Namespace) -> DataOptions:
    size = args.image_size
    if size is not None:
        size = "[" + size + "]" if "," in size else size
    return DataOptions(args.data_format, args.mode, size, tuple(args.set))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_triplet.index",
                                description="Embed a gallery and save a faiss index of it.")
    p.add_argument("--model", required=True, help="export directory (RUN/model) or run dir")
    p.add_argument("--data", required=True,
                   help="gallery: RUN_DIR[:train|:test|:all] (the run's own data), a config "
                        ".yaml[:split], fashion_mnist[:split], mnist[:split], a data path "
                        "(image folder, .csv, .npz, IDX directory)[:split], or an IDX images "
                        "file / .npy (default split test)")
    p.add_argument("--labels", help="labels for a file --data: IDX labels or integer .npy")
    add_data_options(p)
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--kind", choices=KINDS, default="flat",
                   help="flat = exact (default); hnsw / ivf = approximate")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=64, help="hnsw efSearch")
    p.add_argument("--nprobe", type=int, default=16, help="ivf lists probed per query")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per forward pass")
    p.add_argument("--force", action="store_true", help="replace an existing index at --out")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on bad input)."""
    import time
    args = parse_args(argv)
    try:
        for name in ("batch_size", "hnsw_m", "ef_search", "nprobe"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, name)}")
        check_out_dir(args.out, args.force)  # before any work
        t0 = time.perf_counter()
        model = Model(args.model)
        items = read_items(args.data, model.input, args.labels, data_options(args))
        emb = model.embed(items.x, args.batch_size, source=items.source)
        check_in_range(emb, items.source)
        t_embed = time.perf_counter() - t0
        t1 = time.perf_counter()
        index, params = build_index(emb, args.kind, hnsw_m=args.hnsw_m,
                                    ef_search=args.ef_search, nprobe=args.nprobe)
        t_build = time.perf_counter() - t1
        recall = None
        if args.kind != "flat":
            recall = measured_recall(index, emb)
            print(f"{args.kind} index: recall@{recall['k']} {recall['recall_at_k']:.4f} against "
                  f"exact search ({recall['queries']} gallery items as queries; {params})",
                  flush=True)
        images = None
        if items.image_shape is not None:
            images = np.clip(np.rint(items.x * 255), 0, 255).astype(np.uint8).reshape(
                (len(items.x),) + tuple(items.image_shape))
        labels = items.labels if items.labels is not None else np.full(len(emb), -1, np.int64)
        meta = {"kind": args.kind, "params": params, "metric": "squared L2 (embedding units)",
                "dim": int(emb.shape[1]), "count": int(len(emb)), "data": items.source,
                "input": items.kind,
                "image_shape": list(items.image_shape) if items.image_shape else None,
                "model": {"dir": model.dir, "params_sha256": model.params_sha256,
                          "input_units": int(model.in_units)},
                "recall": recall, "time_embed_s": round(t_embed, 3),
                "time_build_s": round(t_build, 3)}
        meta = write_index_dir(args.out, index, labels, items.ids, items.class_names, images,
                               meta, force=args.force)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.out}: {args.kind} index of {len(emb)} x {emb.shape[1]} embeddings of "
          f"{items.source} (embed {t_embed:.2f} s, build {t_build:.2f} s, id "
          f"{meta['index_id'][:12]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
