"""A saved nearest-neighbour index over a gallery of embeddings: build, save, load, search.

The directory is docs/search.md's "The index directory" (``meta.json``: :class:`IndexMeta`;
``index_id``: :meth:`IndexMeta.content_id`). Search is :func:`.neighbours.knn` by squared L2
in embedding units: exact for a flat index, approximate for hnsw and ivf.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Dict, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import numpy as np

from ..fsutil import atomic_dir, check_out
from .neighbours import build_faiss, knn, recall_at_k
from .model import sha256_file

__all__ = ["Index", "IndexMeta", "ModelRef", "thumbnails", "FORMAT", "THUMB"]

FORMAT = "dist_triplet.index/3"   # /3: index_id covers the model's parameters
THUMB = 32                      # thumbnails: at most this many pixels a side
_CONTENT = ("index.faiss", "labels.npy", "ids.json")      # hashed into index_id


@dataclass
class ModelRef:
    """The model an index was built with: its export directory, the sha256 of its
    parameters file (search and calibrate refuse another) and its input width."""

    dir: str
    params_sha256: str
    input_units: int = 0


@dataclass
class IndexMeta:
    """meta.json of an index directory (module docstring)."""

    kind: str                                  # flat | hnsw | ivf
    dim: int                                   # D
    count: int                                 # N
    model: ModelRef
    params: Dict[str, int] = field(default_factory=dict)   # hnsw M/efSearch, ivf nlist/nprobe
    data: str = ""                             # the data spec the gallery came from
    input: Optional[str] = None                # images | features
    image_shape: Optional[List[int]] = None    # of the model's input images
    recall: Optional[Dict[str, float]] = None  # hnsw / ivf: recall_at_k, k, queries
    time_embed_s: float = 0.0
    time_build_s: float = 0.0
    metric: str = "squared L2 (embedding units)"
    format: str = FORMAT
    files: Dict[str, str] = field(default_factory=dict)    # name -> sha256
    index_id: str = ""

    @classmethod
    def from_json(cls, doc, where: str) -> "IndexMeta":
        """ValueError naming ``where`` and the key: a key missing or of another type."""
        return _typed(cls, doc, where, "")

    def content_id(self) -> str:
        """``index_id``: sha256 over the sha256s of ``_CONTENT`` and the model's parameters."""
        return hashlib.sha256("".join([self.files.get(f, "") for f in _CONTENT] + [
            self.model.params_sha256]).encode()).hexdigest()


def _typed(cls, doc, where: str, prefix: str):
    """``cls`` (a dataclass) from ``doc``, each field checked against its type hint."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'meta.json'} is not a JSON object")
    hints, values = get_type_hints(cls), {}
    for f in fields(cls):
        key = prefix + f.name
        if f.name not in doc:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where}: key {key!r} missing: corrupt or edited index; "
                                 "rebuild it with dist_triplet.index")
            continue
        value, hint = doc[f.name], hints[f.name]
        if is_dataclass(hint):
            value = _typed(hint, value, where, key + ".")
        elif not _fits(value, hint):
            raise ValueError(f"{where}: key {key!r} is {value!r}, expected {hint}: corrupt "
                             "or edited index; rebuild it with dist_triplet.index")
        values[f.name] = value
    return cls(**values)


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a type hint (int/float/str/bool, Optional, List, Dict)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if origin in (list, dict):
        inner = value.values() if isinstance(value, dict) else value
        return isinstance(value, origin) and all(_fits(v, args[-1]) for v in inner)
    hint = (int, float) if hint is float else hint
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def thumbnails(x: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """uint8 thumbnails of rows ``x`` (N, F) float32 in [0, 1] of images ``image_shape``
    ((H, W) or (H, W, C)): (N, h, w[, C]), each side at most ``THUMB``, by averaging
    f x f pixel blocks, f = min(ceil(max(H, W) / THUMB), H, W) (the last partial blocks
    dropped)."""
    shape = tuple(image_shape)
    img = x.reshape((len(x),) + shape + (() if len(shape) == 3 else (1,)))
    f = min(-(-max(shape[:2]) // THUMB), min(shape[:2]))     # a 40 x 1 image keeps 1 column
    h, w = shape[0] // f, shape[1] // f
    img = img[:, :h * f, :w * f].reshape(len(x), h, f, w, f, img.shape[3]).mean(axis=(2, 4))
    out = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out[..., 0] if out.shape[3] == 1 else out


class Index:
    """A gallery index in memory: ``meta`` (:class:`IndexMeta`), ``faiss``, ``labels`` (N,)
    int64 (-1 unknown), ``ids`` (N str), ``class_names`` (tuple or None), ``images``
    thumbnails or None, ``dir`` once saved or loaded."""

    def __init__(self, meta: IndexMeta, index, labels, ids, class_names, images, path=None):
        self.meta, self.faiss, self.labels, self.ids = meta, index, labels, list(ids)
        self.class_names, self.images, self.dir = class_names, images, path
        self._vectors = None

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss.d)

    @classmethod
    def build(cls, embeddings, labels=None, ids=None, class_names=None, *, kind: str = "flat",
              images: Optional[np.ndarray] = None, model: Optional[ModelRef] = None,
              data: str = "", hnsw_m: int = 32, ef_search: int = 64, nprobe: int = 16,
              seed: int = 0) -> "Index":
        """An index over ``embeddings`` (N, D) float32 (:func:`.neighbours.build_faiss`; an
        approximate kind measures its recall@10 on 1,000 gallery items); ``labels`` (N,)
        int (-1 / None: unknown), ``ids`` N strings (default row numbers), ``class_names``
        per class id, ``images`` (N, h, w[, c]) uint8 thumbnails or None."""
        import time
        t0 = time.perf_counter()
        index, params = build_faiss(embeddings, kind, hnsw_m=hnsw_m, ef_search=ef_search,
                                    nprobe=nprobe, seed=seed)
        n = int(index.ntotal)
        recall = None if kind == "flat" else recall_at_k(index, embeddings, seed=seed)
        meta = IndexMeta(kind=kind, dim=int(index.d), count=n, params=params, data=data,
                         model=model or ModelRef("", ""), recall=recall,
                         time_build_s=round(time.perf_counter() - t0, 3))
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        ids = [str(i) for i in range(n)] if ids is None else list(ids)
        if labels.shape != (n,) or len(ids) != n:
            raise ValueError(f"{n} embeddings but {labels.shape} labels and {len(ids)} ids")
        if (s := np.shape(images)) and (s[:1] != (n,) or len(s) not in (3, 4) or max(
                s[1:3]) > THUMB or s[3:] not in ((), (3,)) or np.asarray(images).dtype != np.uint8):
            raise ValueError(f"images must be ({n}, h, w[, 3]) uint8 thumbnails (h, w <= {THUMB}), "
                             f"found {s} {np.asarray(images).dtype}")
        return cls(meta, index, labels, ids, None if class_names is None else
                   tuple(class_names), images)

    def save(self, out: str, force: bool = False) -> "Index":
        """Write the directory ``out`` atomically (module docstring); an existing one is
        replaced only with ``force`` and only if it is an index. Sets ``meta.files``,
        ``meta.index_id`` and ``dir``; returns self."""
        import faiss
        if os.path.exists(out) and force and (not os.path.isdir(out) or (
                os.listdir(out) and not os.path.isfile(os.path.join(out, "index.faiss")))):
            raise ValueError(f"--out {out} exists and is not an index directory; "
                             "--force replaces only an index")
        check_out(out, force, file=False)
        with atomic_dir(out) as tmp:
            faiss.write_index(self.faiss, os.path.join(tmp, "index.faiss"))
            np.save(os.path.join(tmp, "labels.npy"), self.labels)
            with open(os.path.join(tmp, "ids.json"), "w") as fh:
                json.dump({"ids": self.ids, "class_names": None if self.class_names is None
                           else list(self.class_names)}, fh)
            if self.images is not None:
                np.save(os.path.join(tmp, "images.npy"), self.images)
            self.meta.files = {f: sha256_file(f"{tmp}/{f}") for f in sorted(os.listdir(tmp))}
            self.meta.index_id = self.meta.content_id()
            with open(os.path.join(tmp, "meta.json"), "w") as fh:
                json.dump(asdict(self.meta), fh, indent=1)
        self.dir = os.path.abspath(out)
        return self

    @classmethod
    def load(cls, path: str) -> "Index":
        """Load and verify ``path``. Raises ValueError naming the file: a missing
        directory or file, meta.json that is not valid or not of :class:`IndexMeta`'s
        types, a file whose sha256 differs (corrupt or edited), an ``index_id`` other than
        :meth:`IndexMeta.content_id` (the files or the model edited), a count, width, kind
        or input that does not match the files."""
        import faiss
        if not os.path.isdir(path):
            raise ValueError(f"index directory {path} does not exist (build one with "
                             "python -m dist_triplet.index)")
        meta_path = os.path.join(path, "meta.json")
        try:
            with open(meta_path) as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"{meta_path} is missing: {path} is not an index directory") from None
        except ValueError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc}): corrupt index") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else doc
            raise ValueError(f"{meta_path}: format {found!r} is not {FORMAT!r}; rebuild "
                             "the index with python -m dist_triplet.index")
        meta = IndexMeta.from_json(doc, meta_path)
        for name, digest in meta.files.items():
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise ValueError(f"{fpath} is missing: incomplete index directory")
            if sha256_file(fpath) != digest:
                raise ValueError(f"{fpath}: sha256 differs from meta.json's: the file is "
                                 "corrupt or was changed after the index was built")
        if meta.index_id != meta.content_id():    # the model: search embeds queries with it
            raise ValueError(f"{meta_path}: key 'index_id' is not the sha256 of "
                             f"{', '.join(_CONTENT)} and key 'model.params_sha256': edited "
                             "index; rebuild it with python -m dist_triplet.index")
        try:
            index = faiss.read_index(os.path.join(path, "index.faiss"))
            labels = np.load(os.path.join(path, "labels.npy"), allow_pickle=False)
            with open(os.path.join(path, "ids.json")) as fh:
                ids = json.load(fh)
            images = (np.load(os.path.join(path, "images.npy"), mmap_mode="r")
                      if "images.npy" in meta.files else None)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ValueError(f"{path}: cannot read the index: "
                             f"{str(exc).splitlines()[0]}") from None
        n = int(index.ntotal)
        if (meta.count, meta.dim) != (n, int(index.d)) or labels.shape != (n,) \
                or len(ids.get("ids", [])) != n:
            raise ValueError(f"{meta_path}: count {meta.count} and dim {meta.dim}, but "
                             f"index.faiss holds {n} x {index.d}, labels.npy "
                             f"{labels.shape[0]}, ids.json {len(ids.get('ids', []))}: "
                             "corrupt or edited index; rebuild it")
        want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVF}
        if not isinstance(index, want.get(meta.kind, ())):
            raise ValueError(f"{meta_path}: kind {meta.kind!r}, but index.faiss holds a "
                             f"{type(index).__name__}: corrupt or edited index; rebuild it")
        if meta.input not in (None, "features" if meta.image_shape is None else "images"):
            raise ValueError(f"{meta_path}: key 'input' is {meta.input!r} but key 'image_shape' "
                             f"is {meta.image_shape}: corrupt or edited index; rebuild it")
        names = ids.get("class_names")    # efSearch and nprobe come with index.faiss
        return cls(meta, index, labels, ids["ids"], None if names is None else tuple(names),
                   images, os.path.abspath(path))

    def vectors(self) -> np.ndarray:
        """(N, D) float32 gallery vectors (reconstructed from the faiss index once)."""
        if self._vectors is None:
            if self.meta.kind == "ivf":
                self.faiss.make_direct_map()
            self._vectors = self.faiss.reconstruct_n(0, len(self))
        return self._vectors

    def search(self, queries, k: int, exclude: Optional[np.ndarray] = None,
               progress: Optional[str] = None) -> tuple:
        """Top-``k`` gallery items of ``queries`` (M, D) float32 by :func:`.neighbours.knn`
        (``exclude``, ``progress`` as there): (dist (M, k) float64 squared L2, pos (M, k)
        int64 gallery positions, -1 / inf where an approximate index found fewer).
        ValueError naming ``dir``: another width than D, or k out of range."""
        try:
            return knn(queries, self.vectors(), k, exclude=exclude, progress=progress,
                       index=None if self.meta.kind == "flat" else self.faiss)
        except ValueError as exc:
            raise ValueError(f"{self.dir}: {exc}") from None
