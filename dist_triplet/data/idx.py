"""Reading MNIST-format (IDX) data sets into NumPy arrays.

The IDX format is the one of LeCun's MNIST page (http://yann.lecun.com/exdb/mnist/),
used unchanged by Fashion-MNIST (Xiao et al. 2017):

    bytes 0-1  zero
    byte  2    element type (0x08 = unsigned byte, the only one accepted here)
    byte  3    number of dimensions
    then one big-endian uint32 per dimension, then the payload, row-major.

So images carry magic 2051 (0x00000803: uint8, 3 dims) and labels 2049
(0x00000801: uint8, 1 dim). Files may be gzip-compressed; compression is
detected from the content (gzip magic 1f 8b), never from the file name, because
mirrors and packagers do not agree on names.

Any rows x cols is accepted (not only 28 x 28). :func:`idx_source` streams the
images file (gzip or raw) in chunks, so reading never holds more than the data once.

This module needs only NumPy. MXNet is imported lazily, inside the one
function that lets it download MNIST, so that the data path can be tested on a
machine without MXNet.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from .source import CHUNK_BYTES, Part, Source, read_part, scatter_rows
from .split import Split

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "DATASET_NAMES",
    "FASHION_MNIST_ROOT",
    "read_idx",
    "write_idx",
    "load_dataset",
    "idx_source",
    "named_source",
]

# Class names in label order, from the Fashion-MNIST README
# (https://github.com/zalandoresearch/fashion-mnist#labels).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

# Where Debian's package `dataset-fashion-mnist` installs the files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist", "idx")

IMAGES_MAGIC = 2051  # 0x00000803: uint8 elements, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: uint8 elements, 1 dimension (N,)
_UINT8_TYPE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

# File stems as published on the MNIST page; each may also carry a ".gz" suffix.
_FILE_STEMS = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _bad_gzip(path: str, exc: BaseException) -> ValueError:
    """The one error for a corrupt or cut gzip stream, naming ``path``."""
    return ValueError(f"{path}: expected a valid gzip stream (file starts with gzip magic "
                      f"1f 8b), found a corrupt or truncated one: {exc}")


def _parse_header(data: bytes, path: str) -> tuple:
    """(dims, header length) from the first bytes of an IDX file; the header checks of
    :func:`read_idx` (``data`` may hold only the header)."""
    if len(data) < 4:
        raise ValueError(
            f"{path}: expected an IDX header of at least 4 bytes, found {len(data)} bytes")
    (magic,) = struct.unpack(">I", data[:4])
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        if zero == 0 and ndim in (1, 3) and dtype_code != _UINT8_TYPE:
            raise ValueError(
                f"{path}: expected IDX element type 0x08 (uint8), found 0x{dtype_code:02x} "
                f"(magic found = {magic})")
        raise ValueError(
            f"{path}: not an IDX file: expected magic {IMAGES_MAGIC} (images) or "
            f"{LABELS_MAGIC} (labels), magic found = {magic} (first bytes {data[:8]!r})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: expected an IDX header of {header_len} bytes for {ndim} dimensions, "
            f"found {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise ValueError(
            f"{path}: expected images of at least 1x1 pixels, found {dims[1]}x{dims[2]} "
            f"(dims {tuple(dims)})")
    return tuple(int(d) for d in dims), header_len


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one MNIST-format IDX file of unsigned bytes.

    Args:
        path: file path; gzip or raw, detected by content (magic bytes 1f 8b),
            so a ``.gz`` name holding raw bytes and a raw name holding gzip
            both load.

    Returns:
        uint8 array: (N, rows, cols) for an images file (magic 2051) or (N,)
        for a labels file (magic 2049). Format from
        http://yann.lecun.com/exdb/mnist/.

    Raises:
        ValueError: message names ``path`` and what was expected vs found, when
            the gzip stream is corrupt; the header is shorter than 4 bytes or
            than its dimension list; the magic is neither 2051 nor 2049 (e.g.
            an HTML error page saved under the data file's name); the element
            type is not 0x08 (uint8); an images file has 0 rows or 0 columns; or
            the payload length differs from the product of the dimensions
            (truncated or trailing bytes).
    """
    path = os.fspath(path)
    stream, raw = _open_stream(path)
    try:
        data = _stream_read(stream, -1, path)
    finally:
        stream.close()
        raw.close()
    dims, header_len = _parse_header(data, path)
    expected = math.prod(int(d) for d in dims)  # Python ints: a huge header cannot overflow
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes"
        raise ValueError(
            f"{path}: expected {expected} payload bytes for dims {tuple(dims)}, "
            f"found {found} ({what})")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write a uint8 array as an IDX file; used by tests and tools to make data.

    Args:
        path: destination; its name does not decide compression, ``gzip`` does.
        array: (N,) labels or (N, rows, cols) images; cast to uint8, so values
            must lie in [0, 255].
        gzip: compress the bytes with gzip when True.

    Raises:
        ValueError: when ``array`` has neither 1 nor 3 dimensions, or has values
            outside [0, 255].
    """
    array = np.asarray(array)
    if array.ndim not in (1, 3):
        raise ValueError(f"{path}: expected a 1-D (labels) or 3-D (images) array, "
                         f"found {array.ndim} dimensions")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: expected values in [0, 255], found "
                         f"[{array.min()}, {array.max()}]")
    magic = LABELS_MAGIC if array.ndim == 1 else IMAGES_MAGIC
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gzip:
        payload = _gzip_compress(payload)
    with open(path, "wb") as f:
        f.write(payload)


def _gzip_compress(payload: bytes) -> bytes:
    # The parameter `gzip` of write_idx shadows the module inside it.
    return gzip.compress(payload, mtime=0)


def _find_file(root: str, stem: str) -> str:
    """Return root/stem or root/stem.gz, whichever exists (the raw one first)."""
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(root, name)
        if os.path.isfile(candidate):
            return candidate
        if os.path.isdir(candidate):
            raise ValueError(f"{candidate}: is a directory; expected an IDX file")
    raise FileNotFoundError(
        f"{os.path.join(root, stem)}[.gz]: expected an IDX file in {root}, found neither "
        f"{stem} nor {stem}.gz")


_ANY_ROOT_HINT = ("pass data.root=DIR naming a directory with the MNIST-format files "
                  "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                  "t10k-labels-idx1-ubyte (each may end in .gz)")


def _mxnet_mnist_root(train: bool) -> str:
    """Let MXNet download MNIST (when online) and return the directory it used."""
    try:
        from mxnet.gluon.data.vision import MNIST  # lazy: MXNet is heavy and optional here
        dataset = MNIST(train=train)
    except Exception as exc:  # noqa: BLE001 - any failure means "no data": say what to do
        raise FileNotFoundError(
            f"could not get MNIST through mxnet.gluon.data.vision.MNIST "
            f"(download to ~/.mxnet/datasets/mnist failed: {exc}); {_ANY_ROOT_HINT}") from exc
    return dataset._root  # the files MXNet checked; read them again with our validating reader


def _open_stream(path: str):
    """The file as a byte stream: gunzipped when it starts with 1f 8b (by content)."""
    fh = open(path, "rb")
    head = fh.read(2)
    fh.seek(0)
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=fh, mode="rb"), fh
    return fh, fh


def _stream_read(stream, n: int, path: str) -> bytes:
    try:
        return stream.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise _bad_gzip(path, exc) from exc


def read_idx_header(path: str) -> tuple:
    """Dims of an IDX images file, from its header only: (N, rows, cols).

    Raises:
        ValueError: naming ``path``, as :func:`read_idx` for the header (bad gzip,
            short header, wrong magic, 0-pixel images) and when it is not an images
            file (magic 2051).
    """
    stream, raw = _open_stream(path)
    try:
        head = _stream_read(stream, 16, path)
    finally:
        stream.close()
        raw.close()
    dims, _ = _parse_header(head, path)
    if len(dims) != 3:
        raise ValueError(f"{path}: expected an IDX images file (magic {IMAGES_MAGIC}, 3 dims), "
                         f"found {len(dims)} dim(s): a labels file?")
    if dims[0] == 0:
        raise ValueError(f"{path}: holds 0 images; expected at least 1")
    return tuple(int(d) for d in dims)


def _idx_fill(path: str, dims: tuple):
    n, rows, cols = dims
    width = rows * cols

    def fill(targets) -> None:
        stream, raw = _open_stream(path)
        try:
            _stream_read(stream, 16, path)
            per_chunk = max(1, CHUNK_BYTES // width)
            cursors = [0] * len(targets)
            for start in range(0, n, per_chunk):
                want = min(per_chunk, n - start) * width
                buf = _stream_read(stream, want, path)
                if len(buf) != want:
                    found = start * width + len(buf)
                    raise ValueError(f"{path}: expected {n * width} payload bytes for dims "
                                     f"{dims}, found {found} (truncated)")
                chunk = np.frombuffer(buf, np.uint8).reshape(-1, width)
                scatter_rows(chunk, start, targets, cursors)
            if _stream_read(stream, 1, path):
                raise ValueError(f"{path}: expected {n * width} payload bytes for dims "
                                 f"{dims}, found more (trailing bytes)")
        finally:
            stream.close()
            raw.close()
    return fill


def _idx_part(root: str, train: bool) -> tuple:
    """The train (or t10k) part of the IDX directory ``root``: ``(Part, (images_path,
    labels_path))``, labels read, images only as far as their header. Class names are checked later.

    Raises:
        FileNotFoundError: a file is missing (message names the path tried).
        ValueError: a bad header or labels file; image and label counts differ.
    """
    images_stem, labels_stem = _FILE_STEMS[train]
    images_path = _find_file(root, images_stem)
    labels_path = _find_file(root, labels_stem)
    dims = read_idx_header(images_path)
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a labels file (magic {LABELS_MAGIC}, "
                         f"1 dim), found {labels.ndim} dims")
    if dims[0] != labels.shape[0]:
        raise ValueError(
            f"count mismatch: {images_path} holds {dims[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels")
    part = Part(labels=labels.astype(np.int64), row_shape=(dims[1], dims[2], 1),
                dtype=np.dtype(np.uint8), fill=_idx_fill(images_path, dims), where=root)
    return part, (images_path, labels_path)


def _class_names(found: dict, class_names) -> tuple:
    """``class_names`` (None = ``str(i)`` up to the largest label), checked against the
    labels of every part in ``found`` (name -> (Part, (images_path, labels_path))).

    Raises:
        ValueError: a label beyond the class names (names the labels file).
    """
    if class_names is None:
        top = max(int(part.labels.max()) for part, _ in found.values())
        class_names = tuple(str(i) for i in range(top + 1))
    class_names = tuple(class_names)
    for part, (_, labels_path) in found.values():
        if int(part.labels.max()) >= len(class_names):
            raise ValueError(
                f"{labels_path}: expected labels in [0, {len(class_names)}) for "
                f"{len(class_names)} classes, found label {int(part.labels.max())}")
    return class_names


def idx_source(root: str, class_names=None, fmt: str = "idx") -> Source:
    """Open a directory of MNIST-format files (train and t10k, each raw or ``.gz``).

    Labels are read now; images only as far as their headers (pixels stream later).

    Args:
        root: directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each may end in .gz).
        class_names: names by label; None = ``str(i)`` for i up to the largest label of
            either split.

    Raises:
        FileNotFoundError: a file is missing (message names the path tried).
        ValueError: a bad header or labels file; image and label counts differ; a label
            beyond ``class_names`` (each message names the file).
    """
    found = {"train" if train else "test": _idx_part(root, train) for train in (True, False)}
    class_names = _class_names(found, class_names)
    files = [path for _, paths in found.values() for path in paths]
    return Source(fmt=fmt, parts={name: part for name, (part, _) in found.items()},
                  class_names=class_names, image=True, files=files, where=root)


def _dataset_root(name: str, root, splits) -> tuple:
    """``(root, class_names)`` of a named data set (``data.dataset``), for the ``splits``
    (train: True, test: False) about to be read; class names None for ``idx``.

    Raises:
        ValueError: unknown ``name`` (lists the valid names); ``idx`` without ``root``.
        FileNotFoundError: the directory is missing (says how to get the data); MXNet
            could not download MNIST.
    """
    if name == "fashion_mnist":
        root = FASHION_MNIST_ROOT if root is None else root
        hint = ("install Debian's package with `apt-get install dataset-fashion-mnist` "
                "(launch/setup.sh does it), or " + _ANY_ROOT_HINT)
        classes = FASHION_MNIST_CLASSES
    elif name == "mnist":
        if root is None:
            root = [_mxnet_mnist_root(train) for train in splits][0]
        hint, classes = _ANY_ROOT_HINT, MNIST_CLASSES
    elif name == "idx":
        if root is None:
            raise ValueError(f"data set 'idx' needs an explicit directory: {_ANY_ROOT_HINT}")
        hint, classes = _ANY_ROOT_HINT, None
    else:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory {root} does not exist; {hint}")
    return root, classes


def named_source(name: str, root: str | None) -> Source:
    """The :class:`Source` of a named data set (``data.dataset``): fashion_mnist
    (default root ``/usr/share/datasets/fashion-mnist``, Debian's
    ``dataset-fashion-mnist``; classes from the Fashion-MNIST README), mnist (root any
    directory with the IDX files; None = ``mxnet.gluon.data.vision.MNIST`` downloads them
    to ~/.mxnet/datasets/mnist, as in the seed article) or idx (root required; class
    names ``str(i)``). Errors as :func:`_dataset_root` and :func:`idx_source`."""
    root, classes = _dataset_root(name, root, (True, False))
    return idx_source(root, classes, fmt=f"idx ({name})" if name != "idx" else "idx")


def load_dataset(name: str, root: str | None = None, train: bool = True) -> Split:
    """The train or test split of a named MNIST-format data set, read alone (the other
    split's files need not exist), through the same reader as :func:`named_source`.

    Returns:
        Split: images (N, rows*cols) uint8, image_shape (rows, cols, 1), labels (N,)
        int64; for ``idx`` class names ``str(i)`` up to this split's largest label.

    Raises:
        ValueError / FileNotFoundError: as :func:`named_source`; the images file holds 0
            images.
    """
    root, classes = _dataset_root(name, root, (train,))
    found = {"split": _idx_part(root, train)}
    return read_part(found["split"][0], _class_names(found, classes), image=True)


