"""Every data format through ``load_data``: IDX of any size, .npz features and images,
image folders, CSV; format detection; and the shared memory-mapped cache.

The data are generated in tmp_path; expectations are recomputed from the generated arrays.
"""
import gzip
import multiprocessing as mp
import os

import numpy as np
import pytest

from _data_util import data_cfg, make_images, write_csv, write_folder, write_png
from dist_triplet.data import (as_float, detect_format, load_data, load_rows, write_idx)

PIL = pytest.importorskip("PIL")


def _rows_match(split, x, y):
    """Every row of ``split`` is a row of ``x`` with its label ``y`` (rows are distinct)."""
    lookup = {x[i].tobytes(): int(y[i]) for i in range(len(x))}
    assert len(lookup) == len(x)
    for row, lab in zip(split.images, split.labels):
        assert lookup[np.asarray(row).tobytes()] == lab


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_idx_of_any_size(tmp_path, gz):
    images, labels = make_images(4, 3, 5, 7, 1)
    test_images, test_labels = make_images(3, 3, 5, 7, 1, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte", images[..., 0], gzip=gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gzip=gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images[..., 0], gzip=gz)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels, gzip=gz)
    assert detect_format(str(tmp_path)) == "idx"
    for kw in (dict(path=str(tmp_path)), dict(path=str(tmp_path), format="idx"),
               dict(dataset="idx", root=str(tmp_path))):
        train, test = load_data(data_cfg(**kw))
        assert train.images.dtype == np.uint8 and train.image_shape == (5, 7, 1)
        np.testing.assert_array_equal(train.images, images.reshape(12, 35))
        np.testing.assert_array_equal(test.images, test_images.reshape(9, 35))
        np.testing.assert_array_equal(train.labels, labels)
        assert train.class_names == ("0", "1", "2")


def test_idx_truncated_payload_named(tmp_path):
    images, labels = make_images(3, 2, 4, 4, 1)
    for stem, imgs in (("train", images), ("t10k", images)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", imgs[..., 0])
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError) as exc:
        load_data(data_cfg(path=str(tmp_path)))
    assert str(path) in str(exc.value) and "truncated" in str(exc.value)
    assert "expected 96 payload bytes" in str(exc.value) and "found 91" in str(exc.value)


# ----------------------------------------------------------------------------- npz

def test_npz_features_single_file_split_by_fraction(tmp_path):
    rng = np.random.default_rng(3)
    y = np.repeat([7, 3, 11], 10)                       # any integers: renumbered
    x = rng.normal(size=(30, 6))                         # float64 -> float32
    np.savez(tmp_path / "feat.npz", x=x, y=y)
    assert detect_format(str(tmp_path / "feat.npz")) == "npz"
    train, test = load_data(data_cfg(path=str(tmp_path / "feat.npz"), test_fraction=0.2))
    assert train.image_shape is None and not train.is_image
    assert train.images.dtype == np.float32 and train.width == 6
    assert train.class_names == ("3", "7", "11")       # sorted values, named str(value)
    ids = np.searchsorted([3, 7, 11], y)
    _rows_match(train, x.astype(np.float32), ids)
    _rows_match(test, x.astype(np.float32), ids)
    assert len(train) == 24 and len(test) == 6          # 2 of each class of 10
    np.testing.assert_array_equal(np.bincount(test.labels), [2, 2, 2])


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (4, 6, 3)])
def test_npz_images(tmp_path, shape):
    images, labels = make_images(5, 4, *(shape + (1,))[:2], shape[2] if len(shape) == 3 else 1)
    x = images if len(shape) == 3 else images[..., 0]
    names = np.array(["cat", "dog", "owl", "yak"])
    np.savez_compressed(tmp_path / "img.npz", x=x, y=labels, classes=names)
    train, test = load_data(data_cfg(path=str(tmp_path / "img.npz"), test_fraction=0.4))
    h, w = shape[:2]
    c = shape[2] if len(shape) == 3 else 1
    assert train.image_shape == (h, w, c) and train.images.dtype == np.uint8
    assert train.class_names == ("cat", "dog", "owl", "yak")
    flat = images.reshape(len(images), -1)
    _rows_match(train, flat, labels)
    _rows_match(test, flat, labels)
    assert len(train) + len(test) == 20 and np.bincount(test.labels).tolist() == [2, 2, 2, 2]


def test_npz_directory_with_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(6, 3))
    np.savez(tmp_path / "train.npz", x=xtr, y=np.array([0, 0, 1, 1, 2, 2, 5, 5]))
    np.savez(tmp_path / "test.npz", x=xte, y=np.array([5, 5, 9, 9, 9, 0]))
    assert detect_format(str(tmp_path)) == "npz"
    # Test class "0" has 1 sample: a query, allowed only in the by-class protocol.
    train, test = load_data(data_cfg(path=str(tmp_path), split="classes"))
    assert train.class_names == ("0", "1", "2", "5", "9")  # union, shared ids
    np.testing.assert_array_equal(train.images, xtr)
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(test.labels, [3, 3, 4, 4, 4, 0])
    np.testing.assert_array_equal(test.images, xte.astype(np.float32))


def test_npz_label_outside_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 2, 0]),
             classes=np.array(["a", "b"]))
    with pytest.raises(ValueError) as exc:
        load_data(data_cfg(path=str(tmp_path / "d.npz")))
    msg = str(exc.value)
    assert "d.npz" in msg and "'y'" in msg and "label 2" in msg and "npz" in msg


def test_npz_non_finite_feature_named(tmp_path):
    x = np.ones((8, 2))
    x[5, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.repeat([0, 1], 4))
    with pytest.raises(ValueError, match=r"d\.npz: key 'x' row 5 holds a non-finite"):
        load_data(data_cfg(path=str(tmp_path / "d.npz"), test_fraction=0.5))


# ----------------------------------------------------------------------------- folders

def test_folder_rgb_non_square(tmp_path):
    images, labels = make_images(5, 3, 6, 4, 3)
    names = ["apple", "banana", "cherry"]
    write_folder(tmp_path / "d", images, labels, names)
    assert detect_format(str(tmp_path / "d")) == "folder"
    train, test = load_data(data_cfg(path=str(tmp_path / "d"), test_fraction=0.4))
    assert train.class_names == tuple(names) and train.image_shape == (6, 4, 3)
    flat = images.reshape(15, -1)
    _rows_match(train, flat, labels)
    _rows_match(test, flat, labels)
    assert np.bincount(test.labels).tolist() == [2, 2, 2]


def test_bmp_and_csv_with_a_bom(tmp_path):
    # .bmp (torchvision's list) was skipped without a word; Excel's UTF-8 BOM hid the
    # 'path' column ("found columns \ufeffpath").
    images, labels = make_images(4, 2, 4, 4, 3)
    paths = write_folder(tmp_path / "d", images, labels, ext=".bmp")
    train, test = load_data(data_cfg(path=str(tmp_path / "d"), test_fraction=0.5))
    assert len(train) + len(test) == 8
    rows = "".join(f"{p},{lab}\n" for p, lab in zip(paths, labels))
    (tmp_path / "d.csv").write_text("\ufeffpath,label\n" + rows, encoding="utf-8")
    train, test = load_data(data_cfg(path=str(tmp_path / "d.csv"), test_fraction=0.5))
    assert len(train) + len(test) == 8 and sorted(np.r_[train.labels, test.labels]) == \
        sorted(labels)


def test_folder_mode_l_and_resize(tmp_path):
    from PIL import Image
    images, labels = make_images(4, 2, 8, 8, 3)
    paths = write_folder(tmp_path, images, labels, ext=".jpg")
    train, _ = load_data(data_cfg(path=str(tmp_path), mode="L", image_size=[4, 6],
                                  test_fraction=0.5))
    assert train.image_shape == (4, 6, 1) and train.width == 24
    # Reference: the same file decoded, converted and resized by Pillow directly.
    expected = {}
    for p, lab in zip(paths, labels):
        with Image.open(p) as im:
            ref = np.asarray(im.convert("L").resize((6, 4), Image.Resampling.BILINEAR))
        expected[ref.tobytes()] = lab
    for row, lab in zip(train.images, train.labels):
        assert expected[np.asarray(row).tobytes()] == lab


def test_folder_with_train_and_test(tmp_path):
    images, labels = make_images(2, 3, 5, 5, 3)
    write_folder(tmp_path / "train", images[:4], labels[:4], ["a", "b"])
    write_folder(tmp_path / "test", images[2:], labels[2:] - 1, ["b", "c"])
    train, test = load_data(data_cfg(path=str(tmp_path)))
    assert train.class_names == ("a", "b", "c")  # union of train and test folders
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(test.labels, [1, 1, 2, 2])
    np.testing.assert_array_equal(test.images, images[2:].reshape(4, -1))


def test_folder_limit_keeps_every_class(tmp_path):
    """Folder rows are class-major: data.limit_train keeps a seeded sample of the rows
    (data.split_seed), not the first ones (which would be one class), and load_rows names
    the same rows' files."""
    images, labels = make_images(10, 4, 5, 5, 3)
    paths = write_folder(tmp_path / "train", images, labels)
    write_folder(tmp_path / "test", images[::5], labels[::5])
    cfg = data_cfg(path=str(tmp_path), limit_train=12, limit_test=4 * 2)
    train, test = load_data(cfg)
    assert len(train) == 12 and len(test) == 8
    # The first 12 rows hold 2 classes; the limit keeps 3 of each of the 4.
    np.testing.assert_array_equal(np.bincount(train.labels), [3, 3, 3, 3])
    _rows_match(train, images.reshape(40, -1), labels)
    again, _ = load_data(cfg)                        # the same rows on every rank and run
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = load_data(data_cfg(path=str(tmp_path), limit_train=12, split_seed=1))
    assert not np.array_equal(other.images, train.images)
    rows, files = load_rows(cfg, "train")
    np.testing.assert_array_equal(rows.images, train.images)
    assert len(files) == 12
    for row, f in zip(rows.images, files):
        i = paths.index(os.path.join(str(tmp_path), f))
        np.testing.assert_array_equal(row, images[i].reshape(-1))


# ----------------------------------------------------------------------------- csv

@pytest.mark.parametrize("with_split", [True, False])
def test_csv(tmp_path, with_split):
    images, labels = make_images(4, 3, 3, 5, 3)
    os.makedirs(tmp_path / "imgs")
    rows = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        write_png(tmp_path / "imgs" / f"{i}.png", img)
        split = "validation" if i % 4 >= 2 else "train"
        rows.append((f"imgs/{i}.png", 10 * lab) + ((split,) if with_split else ()))
    write_csv(tmp_path / "data.csv", rows, "path,label,split" if with_split else "path,label")
    assert detect_format(str(tmp_path / "data.csv")) == "csv"
    train, test = load_data(data_cfg(path=str(tmp_path / "data.csv"), test_fraction=0.5))
    assert train.class_names == ("0", "10", "20") and train.image_shape == (3, 5, 3)
    flat = images.reshape(12, -1)
    if with_split:
        keep = np.arange(12) % 4 < 2
        np.testing.assert_array_equal(train.images, flat[keep])
        np.testing.assert_array_equal(test.images, flat[~keep])
        np.testing.assert_array_equal(test.labels, labels[~keep])
    else:
        _rows_match(train, flat, labels)
        _rows_match(test, flat, labels)
        assert np.bincount(test.labels).tolist() == [2, 2, 2]


def test_detect_format_ambiguous_and_unknown(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 2)), y=np.zeros(2, int))
    os.makedirs(tmp_path / "cls")
    with pytest.raises(ValueError) as exc:
        detect_format(str(tmp_path))
    assert "ambiguous" in str(exc.value) and "npz" in str(exc.value) and "folder" in str(
        exc.value) and "data.format" in str(exc.value)
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="blob.bin.*data.format"):
        detect_format(str(tmp_path / "blob.bin"))
    with pytest.raises(FileNotFoundError, match="nope"):
        detect_format(str(tmp_path / "nope"))


def test_as_float_is_division_by_255():
    v = np.arange(256, dtype=np.uint8).reshape(2, 128)
    out = as_float(v)
    assert out.dtype == np.float32
    for b in (0, 1, 51, 128, 254, 255):
        assert out.reshape(-1)[b] == np.float32(b) / np.float32(255)
    feats = np.array([[1.5, -2.0]], np.float32)
    assert as_float(feats) is feats


# ----------------------------------------------------------------------------- cache

def _npz(tmp_path, n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.arange(n) % 4
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    return x, y


def test_cache_maps_one_copy_and_matches_memory(tmp_path):
    _npz(tmp_path)
    cache = tmp_path / "cache"
    mem = load_data(data_cfg(path=str(tmp_path / "d.npz")))
    first = load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))
    again = load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))
    entries = os.listdir(cache)
    assert len(entries) == 1 and entries[0].startswith("npz-d.npz-")
    assert sorted(os.listdir(cache / entries[0])) == [
        "meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    for a, b, c in zip(mem, first, again):
        assert isinstance(b.images, np.memmap) and not b.images.flags.writeable
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.images, c.images)
        np.testing.assert_array_equal(a.labels, c.labels)
        assert a.class_names == c.class_names and a.image_shape == c.image_shape


def test_cache_key_follows_files_and_settings(tmp_path):
    _npz(tmp_path)
    cache = tmp_path / "cache"
    load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))
    load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache), split_seed=1))
    assert len(os.listdir(cache)) == 2             # another split is another entry
    x2, _ = _npz(tmp_path, seed=5)                  # same name, new content
    os.utime(tmp_path / "d.npz", ns=(1, 1))
    train, test = load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))
    assert len(os.listdir(cache)) == 3
    _rows_match(train, x2, np.arange(40) % 4)


def test_a_damaged_cache_entry_is_named(tmp_path):
    """Adversarial trial: a truncated cache file gave "mmap length is greater than file
    size", naming no file."""
    _npz(tmp_path)
    cache = tmp_path / "cache"
    load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))
    entry = cache / os.listdir(cache)[0]
    with open(entry / "train_x.npy", "r+b") as fh:
        fh.truncate(200)
    with pytest.raises(ValueError, match=f"data.cache_dir entry {entry} is damaged .*; delete "):
        load_data(data_cfg(path=str(tmp_path / "d.npz"), cache_dir=str(cache)))


def _load_in_child(args):
    path, cache = args
    train, test = load_data(data_cfg(path=path, cache_dir=cache))
    return np.asarray(train.images).sum(), isinstance(train.images, np.memmap)


def test_cache_written_once_by_concurrent_processes(tmp_path):
    x, y = _npz(tmp_path, n=400)
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(3) as pool:
        out = pool.map(_load_in_child, [(str(tmp_path / "d.npz"), cache)] * 3)
    assert all(mapped for _, mapped in out) and len({s for s, _ in out}) == 1
    assert len(os.listdir(cache)) == 1             # one entry, no temp directory left


def test_bad_source_leaves_no_cache_entry(tmp_path):
    images, labels = make_images(4, 2, 4, 4, 3)
    paths = write_folder(tmp_path / "d", images, labels)
    with open(paths[-1], "r+b") as fh:
        fh.truncate(40)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=paths[-1]):
        load_data(data_cfg(path=str(tmp_path / "d"), cache_dir=str(cache), test_fraction=0.5))
    assert not cache.exists()                      # not even the directory (issue 17 (8))


def test_gzip_idx_through_cache(tmp_path):
    images, labels = make_images(3, 3, 4, 6, 1)
    for stem in ("train", "t10k"):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images[..., 0], gzip=True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels, gzip=True)
    assert gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())[3] == 1
    train, test = load_data(data_cfg(dataset="idx", root=str(tmp_path),
                                     cache_dir=str(tmp_path / "c")))
    assert isinstance(train.images, np.memmap) and train.image_shape == (4, 6, 1)
    np.testing.assert_array_equal(train.images, images.reshape(9, -1))


def test_jpeg_folder_after_horovod_import(tmp_path):
    """A JPEG folder read by a process that imported horovod.mxnet first (as every
    Horovod rank does before it reads data): Pillow must still decode JPEGs."""
    import subprocess
    import sys
    from _hvd import child_env, require_horovod
    require_horovod()
    images, labels = make_images(4, 2, 6, 5, 3)
    write_folder(tmp_path / "d", images, labels, ext=".jpg")
    code = ("import horovod.mxnet\n"
            "from types import SimpleNamespace as S\n"
            "from dist_triplet.data import load_data\n"
            f"tr, te = load_data(S(dataset='x', root=None, path={str(tmp_path / 'd')!r}, "
            "format='auto', mode='RGB', image_size=None, split='fraction', test_fraction=0.5, "
            "split_seed=0, cache_dir=None, limit_train=0, limit_test=0))\n"
            "print(len(tr) + len(te), tr.image_shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "8 (6, 5, 3)"
