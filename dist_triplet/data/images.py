"""Image files: a folder per class, or a CSV of ``path,label[,split]``; read with Pillow.

* **Folder** (``data.format: folder``): ``ROOT/<class>/*`` with an ``IMAGE_EXTENSIONS``
  suffix (any case), class names from the folder names, class ids in sorted name order
  (as torchvision's ``ImageFolder``). When ``ROOT`` holds exactly the folders ``train``
  and ``test`` (each with class folders), those are the splits; class ids then cover both.
* **CSV** (``data.format: csv``): the open-metric-learning convention
  (https://open-metric-learning.readthedocs.io, "Dataset format"): a header with columns
  ``path`` and ``label`` (integer), optional ``split`` (``train``, or ``validation`` /
  ``test``). Paths are relative to the CSV's directory unless absolute. Other columns are
  ignored.

Every image is turned upright by its EXIF Orientation (as a viewer shows it), converted to
``data.mode`` (``L``: 1 channel, ``RGB``: 3) and, with
``data.image_size`` (H, W), resized with Pillow's bilinear filter; without it every image
must have the first image's size. Rows are uint8 (H, W, C), row-major.
"""
from __future__ import annotations

import csv
import os
import re
import stat
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .source import CHUNK_BYTES, Part, Source, scatter_rows

__all__ = ["IMAGE_EXTENSIONS", "MODES", "folder_source", "csv_source", "read_image", "pillow"]

# torchvision's ImageFolder list (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MODES = {"L": 1, "RGB": 3}


def pillow():
    """Pillow's ``Image`` module, its C core bound to Pillow's own libjpeg.

    Horovod loads its MXNet extension with ``RTLD_GLOBAL``, which exports the libjpeg 8
    bundled in libmxnet to every library loaded afterwards. Pillow's core, if first
    loaded after that, binds its JPEG calls to it and every JPEG fails ("Wrong JPEG
    library version: library is 80, caller expects 62"). Loading the core with
    ``RTLD_DEEPBIND`` makes it use its own libraries first, whatever was loaded before.
    (Already loaded: nothing changes; :func:`read_image` then names the problem.)

    Raises:
        ValueError: Pillow is not installed.
    """
    try:
        if "PIL._imaging" not in sys.modules and hasattr(os, "RTLD_DEEPBIND"):
            flags = sys.getdlopenflags()
            sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
            try:
                from PIL import Image
            finally:
                sys.setdlopenflags(flags)
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ValueError(f"reading image files needs Pillow (pip install Pillow): {exc}") \
            from None
    return Image



def _jpeg_works() -> bool:
    """Whether Pillow can encode and decode a JPEG in this process (see :func:`pillow`)."""
    import io
    Image = pillow()
    try:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="JPEG")
        buf.seek(0)
        Image.open(buf).load()
        return True
    except OSError:
        return False


def read_image(path: str, mode: str, size: Optional[Tuple[int, int]]) -> np.ndarray:
    """One image as (H, W, C) uint8 in ``mode``, resized to ``size`` (H, W) if given.

    Raises:
        ValueError: naming ``path`` when Pillow cannot identify or fully decode it
            (truncated, corrupt, not an image), or its pixels are 16-bit or float
            (converting them to ``mode`` would clip every value above 255).
    """
    Image = pillow()
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, named
            wide = im.mode in ("I", "F") or im.mode.startswith("I;16")   # convert() clips
            if not wide:
                im = _upright(im).convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow raises UnidentifiedImageError (an OSError) for non-images, OSError
        # ("image file is truncated") or SyntaxError (broken PNG chunks) for bad data.
        if path.lower().endswith((".jpg", ".jpeg")) and not _jpeg_works():
            raise ValueError(
                f"{path}: Pillow cannot decode any JPEG in this process: its core was loaded "
                "after horovod.mxnet and bound to MXNet's libjpeg; load images through "
                "dist_triplet.data (or import PIL.Image) before importing Horovod") from None
        raise _unreadable(path, exc) from None
    if wide:
        raise ValueError(f"{path}: {im.mode} image (16-bit or float pixels), read as 8-bit "
                         "images only: convert it to 8 bits first")
    return arr.reshape(arr.shape[0], arr.shape[1], MODES[mode])


def _upright(im):
    """``im`` as a viewer shows it: rotated / mirrored by its EXIF Orientation (phones
    store photos sideways with that tag)."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(im)


def _first_size(path: str) -> Tuple[int, int]:
    """(H, W) of ``path`` as :func:`read_image` reads it (EXIF Orientation 5-8: turned)."""
    Image = pillow()
    try:
        with Image.open(path) as im:
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
            return (im.size[0], im.size[1]) if turned else (im.size[1], im.size[0])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: str, exc: BaseException) -> ValueError:
    if isinstance(exc, pillow().DecompressionBombError):    # a valid image, but huge
        return ValueError(f"{path}: {str(exc).split(',')[0]}: above Pillow's decompression-"
                          "bomb guard (PIL.Image.MAX_IMAGE_PIXELS); shrink it first")
    return ValueError(f"{path}: unreadable or truncated image: {exc}")


def _image_part(files: Sequence[str], labels: np.ndarray, mode: str,
                image_size: Optional[Sequence[int]], where: str) -> Part:
    if mode not in MODES:
        raise ValueError(f"data.mode={mode!r} is not one of {', '.join(MODES)}")
    size = tuple(int(v) for v in image_size) if image_size else None
    hw = size if size is not None else _first_size(files[0])
    row_shape = (hw[0], hw[1], MODES[mode])
    width = int(np.prod(row_shape))

    def fill(targets) -> None:
        # Only the rows some target wants are decoded, in chunks of consecutive rows.
        wanted = np.zeros(len(files), bool)
        for _, rows in targets:
            wanted[rows] = True
        per_chunk = max(1, CHUNK_BYTES // width)
        cursors = [0] * len(targets)
        for lo in range(0, len(files), per_chunk):
            chunk = np.zeros((min(per_chunk, len(files) - lo), width), np.uint8)
            for r in np.flatnonzero(wanted[lo:lo + len(chunk)]) + lo:
                arr = read_image(files[r], mode, size)
                if arr.shape != row_shape:
                    raise ValueError(
                        f"{files[r]}: image is {arr.shape[0]}x{arr.shape[1]} but {files[0]} is "
                        f"{row_shape[0]}x{row_shape[1]}: images of mixed sizes need "
                        "data.image_size=[H, W] or one int (index / search / embed: "
                        "--image-size H,W) to resize them to")
                chunk[r - lo] = arr.reshape(-1)
            scatter_rows(chunk, lo, targets, cursors)
    return Part(labels=np.asarray(labels, np.int64), row_shape=row_shape,
                dtype=np.dtype(np.uint8), fill=fill, where=where, files=list(files))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(root: str) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _stat(path: str) -> os.stat_result:
    """``os.stat(path)``; ValueError naming a symbolic link to nothing."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: a symbolic link to nothing; remove it or mend it") from None


def _scan_classes(root: str, seen: dict) -> dict:
    """{class name: sorted image paths} of ``root``'s class folders. ValueError: a link to
    nothing, or a file met before (``seen``: (device, inode) -> path), as a CSV refuses an
    image listed twice: one image would be two items, of two classes or in both splits."""
    classes = _subdirs(root)
    for entry in os.scandir(root):
        if entry.is_symlink():
            _stat(entry.path)           # a class folder linked to nothing: named, not skipped
    if not classes:
        raise ValueError(f"{root}: image folder holds no class folders; expected "
                         f"ROOT/<class>/*.{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}}")
    out = {}
    for name in classes:
        folder, files = os.path.join(root, name), []
        for path in (os.path.join(folder, f) for f in sorted(os.listdir(folder)) if _is_image(f)):
            st = _stat(path)                            # one system call a file
            if not stat.S_ISREG(st.st_mode):
                continue
            if (first := seen.setdefault((st.st_dev, st.st_ino), path)) != path:
                raise ValueError(f"{path} is the same file as {first} (a link): one image, two "
                                 "items; keep one")
            files.append(path)
        if not files:
            raise ValueError(f"{folder}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} "
                             "files); remove it or add images")
        out[name] = files
    return out


def is_split_folder(root: str) -> bool:
    """True when ``root`` holds the folders ``train`` and ``test`` and nothing else
    (hidden entries aside), each holding class folders."""
    subs = _subdirs(root)
    return subs == ["test", "train"] and all(_subdirs(os.path.join(root, s)) for s in subs)


def folder_source(root: str, mode: str = "RGB",
                  image_size: Optional[Sequence[int]] = None) -> Source:
    """Open an image folder (see the module docstring).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders; an empty class folder; an unreadable first image
            (each message names the folder or file). One class is fine here (a gallery);
            training needs two (:func:`.split.check_training`).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: image folder does not exist")
    layout = {s: os.path.join(root, s) for s in ("train", "test")} if is_split_folder(
        root) else {"all": root}
    seen: dict = {}
    scanned = {name: _scan_classes(d, seen) for name, d in layout.items()}
    names = sorted(set().union(*[set(s) for s in scanned.values()]))
    ids = {n: i for i, n in enumerate(names)}
    parts, files_all = {}, []
    for name, classes in scanned.items():
        files = [f for c in classes.values() for f in c]
        labels = np.array([ids[c] for c, fs in classes.items() for _ in fs], np.int64)
        parts[name] = _image_part(files, labels, mode, image_size, layout[name])
        files_all += files
    return Source(fmt="folder", parts=parts, class_names=tuple(names), image=True,
                  files=files_all, where=root)


_SPLIT_VALUES = {"train": "train", "test": "test", "validation": "test", "val": "test"}


def csv_source(path: str, mode: str = "RGB",
               image_size: Optional[Sequence[int]] = None) -> Source:
    """Open a CSV of image paths and labels (see the module docstring).

    Raises:
        FileNotFoundError: the CSV or an image it names is missing (line number given).
        ValueError: no ``path`` / ``label`` column (the message lists the columns found);
            a label that is not an integer or a split value not train/validation/test
            (line and value named); an image listed twice (both lines named); no rows;
            a file that is not UTF-8.
            One class is fine here (a gallery); training needs two
            (:func:`.split.check_training`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: CSV file does not exist")
    try:
        return _csv_source(path, mode, image_size)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): save "
                         "it as UTF-8") from None


def _csv_source(path: str, mode: str, image_size) -> Source:
    """csv_source's reading (UnicodeDecodeError passes through)."""
    base = os.path.dirname(os.path.abspath(path))
    rows: List[Tuple[str, int, Optional[str]]] = []
    seen: dict = {}                         # image file -> the line that first listed it
    with open(path, newline="", encoding="utf-8-sig") as fh:    # -sig: Excel's BOM
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        missing = [c for c in ("path", "label") if c not in cols]
        if twice := sorted({c for c in cols if cols.count(c) > 1 and c in ("path", "label",
                                                                        "split")}):
            raise ValueError(f"{path}: the header names column(s) {', '.join(twice)} twice "
                             f"({','.join(cols)}): which one holds the data is unclear")
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found columns "
                             f"{', '.join(cols) or 'none'}; expected a header path,label[,split]")
        has_split = "split" in cols
        for rec in reader:
            line = reader.line_num                # the file's line (blank lines counted)
            value = (rec.get("label") or "").strip()
            if not re.fullmatch(r"-?[0-9]+", value):         # int() also takes 1_0 and \uff12
                raise ValueError(f"{path}: line {line}: label {value!r} is not an integer")
            label = int(value)
            file = (rec.get("path") or "").strip()
            if not file:
                raise ValueError(f"{path}: line {line}: empty path")
            file = os.path.normpath(file if os.path.isabs(file) else os.path.join(base, file))
            if os.path.isdir(file):
                raise ValueError(f"{path}: line {line}: {file} is a directory, not an image")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: line {line}: image {file} does not exist")
            st = os.stat(file)                    # one file, however spelt, linked or hard-linked
            first, was = seen.setdefault((st.st_dev, st.st_ino), (line, file))  # 1 id, 2 rows
            if first != line:
                raise ValueError(f"{path}: line {line}: image {file} is listed again (first "
                                 f"on line {first} as {was}: one file); list each image once")
            split = None
            if has_split:
                raw = (rec.get("split") or "").strip()
                split = _SPLIT_VALUES.get(raw.lower())
                if split is None:
                    raise ValueError(f"{path}: line {line}: split {raw!r} is not one of train, "
                                     "validation, test")
            rows.append((file, label, split))
    if not rows:
        raise ValueError(f"{path}: holds no rows after its header")
    values = np.unique([r[1] for r in rows])    # one class: a gallery (as folder_source)
    names = tuple(str(int(v)) for v in values)
    groups = {"train": [], "test": []} if has_split else {"all": []}
    for file, label, split in rows:
        groups[split or "all"].append((file, int(np.searchsorted(values, label))))
    if has_split and not (groups["train"] and groups["test"]):
        empty = "train" if not groups["train"] else "test"
        raise ValueError(f"{path}: column split has no {empty} rows; give both train and "
                         "validation/test rows, or drop the column to split by data.split")
    parts = {name: _image_part([f for f, _ in g], np.array([lab for _, lab in g], np.int64),
                               mode, image_size, f"{path} ({name} rows)" if name != "all"
                               else path)
             for name, g in groups.items()}
    return Source(fmt="csv", parts=parts, class_names=names, image=True,
                  files=[path] + [r[0] for r in rows], where=path)
