"""Tests for dist_triplet.data: IDX reading, validation and data-set lookup.

Every test writes its own tiny IDX files in tmp_path; none needs the real data.
"""
import gzip
import struct

import numpy as np
import pytest

from dist_triplet import data
from dist_triplet.data import (FASHION_MNIST_CLASSES, Split, as_float, load_dataset,
                               read_idx, subset, write_idx)


def _images(n=3, rows=2, cols=3):
    return (np.arange(n * rows * cols, dtype=np.int64) * 7 % 256).astype(np.uint8).reshape(
        n, rows, cols)


def _write_dir(root, train=True, n=4, labels=None, gz=False):
    root.mkdir(parents=True, exist_ok=True)
    prefix = "train" if train else "t10k"
    suffix = ".gz" if gz else ""
    imgs = _images(n)
    labels = np.arange(n) % 3 if labels is None else np.asarray(labels)
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gzip=gz)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip=gz)
    return imgs, labels


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, gz):
    imgs = _images()
    labels = np.array([0, 9, 255], dtype=np.uint8)
    write_idx(tmp_path / "img", imgs, gzip=gz)
    write_idx(tmp_path / "lab", labels, gzip=gz)
    assert (tmp_path / "img").read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    got = read_idx(tmp_path / "img")
    assert got.dtype == np.uint8 and got.shape == (3, 2, 3)
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)


def test_raw_header_bytes_are_the_published_format(tmp_path):
    write_idx(tmp_path / "lab", np.array([1, 2], dtype=np.uint8))
    assert (tmp_path / "lab").read_bytes() == struct.pack(">II", 2049, 2) + b"\x01\x02"


def test_compression_detected_by_content_not_name(tmp_path):
    imgs = _images()
    write_idx(tmp_path / "gzip-under-raw-name-idx3-ubyte", imgs, gzip=True)
    write_idx(tmp_path / "raw-under-gz-name.gz", imgs, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "gzip-under-raw-name-idx3-ubyte"), imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-under-gz-name.gz"), imgs)


def _assert_value_error(path, *needles):
    with pytest.raises(ValueError) as excinfo:
        read_idx(path)
    msg = str(excinfo.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(struct.pack(">II", 1234, 1) + b"\x00")
    _assert_value_error(path, "magic found = 1234", "2051", "2049")


def test_wrong_element_type(tmp_path):
    path = tmp_path / "float-labels"
    path.write_bytes(struct.pack(">II", 0x0D01, 1) + b"\x00\x00\x00\x00")  # 0x0D = float32
    _assert_value_error(path, "0x08", "0x0d")


def test_short_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08")
    _assert_value_error(path, "found 3 bytes")
    path2 = tmp_path / "short-dims"
    path2.write_bytes(struct.pack(">II", 2051, 5))  # 3 dims announced, 1 given
    _assert_value_error(path2, "16 bytes", "found 8 bytes")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    path = tmp_path / "trunc"
    payload = struct.pack(">IIII", 2051, 2, 2, 2) + bytes(7)  # 8 expected
    path.write_bytes(gzip.compress(payload) if gz else payload)
    _assert_value_error(path, "expected 8 payload bytes", "found 7", "truncated")


def test_huge_header_dims_give_the_exact_byte_count(tmp_path):
    """adv1 cosmetic: dims (2^31-1)^3 overflowed int64 in the message (a wrong, smaller
    number); the product is computed in Python ints."""
    path = tmp_path / "huge"
    big = 2 ** 31 - 1
    path.write_bytes(struct.pack(">IIII", 2051, big, big, big) + bytes(16))
    _assert_value_error(path, f"expected {big ** 3} payload bytes", "found 16", "truncated")


def test_trailing_bytes(tmp_path):
    path = tmp_path / "trail"
    path.write_bytes(struct.pack(">II", 2049, 3) + bytes(4))
    _assert_value_error(path, "expected 3 payload bytes", "found 4", "trailing")


def test_html_saved_as_gz(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>")
    msg = _assert_value_error(path, "not an IDX file", "magic found = ")
    assert f"magic found = {int.from_bytes(b'<!DO', 'big')}" in msg


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(struct.pack(">II", 2049, 100) + bytes(100))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    _assert_value_error(cut, "gzip")
    garbled = tmp_path / "garbled.gz"
    garbled.write_bytes(good[:10] + b"\xff" * 20 + good[30:])
    _assert_value_error(garbled, "gzip")


def _write_pair(root, images, labels, images_name="train-images-idx3-ubyte",
                labels_name="train-labels-idx1-ubyte"):
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / images_name, images)
    write_idx(root / labels_name, np.asarray(labels, dtype=np.uint8))
    return str(root)


def test_load_dataset_pixels_and_labels(tmp_path):
    imgs = np.zeros((2, 2, 2), dtype=np.uint8)
    imgs[0, 0, 1] = 51
    imgs[1, 1, 1] = 255
    root = _write_pair(tmp_path / "d", imgs, [1, 0])
    split = load_dataset("idx", root)
    # uint8 in memory (a quarter of float32's bytes); scaled by 1/255 where used.
    assert split.images.dtype == np.uint8 and split.images.shape == (2, 4)
    assert split.image_shape == (2, 2, 1) and split.is_image and split.width == 4
    pixels = as_float(split.images)
    assert pixels.dtype == np.float32 and pixels[0, 1] == np.float32(0.2)  # 51 / 255
    assert pixels[1, 3] == 1.0 and pixels.min() == 0.0
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, [1, 0])
    assert split.class_names == ("0", "1") and split.source == root
    assert len(split) == 2


def test_count_mismatch(tmp_path):
    root = _write_pair(tmp_path, _images(3), [0, 1])
    with pytest.raises(ValueError) as excinfo:
        load_dataset("mnist", root)
    msg = str(excinfo.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "3 images" in msg and "2 labels" in msg


def test_label_out_of_range(tmp_path):
    root = _write_pair(tmp_path, _images(3), [0, 17, 1])
    with pytest.raises(ValueError) as excinfo:
        load_dataset("mnist", root)
    msg = str(excinfo.value)
    assert str(tmp_path / "train-labels-idx1-ubyte") in msg and "label 17" in msg
    assert "10 classes" in msg


def test_images_and_labels_swapped(tmp_path):
    root = _write_pair(tmp_path, _images(3), [0, 1, 2], images_name="train-labels-idx1-ubyte",
                       labels_name="train-images-idx3-ubyte")
    with pytest.raises(ValueError) as excinfo:
        load_dataset("mnist", root)
    msg = str(excinfo.value)
    assert str(tmp_path / "train-images-idx3-ubyte") in msg and "2051" in msg


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_load_dataset_from_dir(tmp_path, gz, train):
    imgs, labels = _write_dir(tmp_path / "d", train=train, gz=gz)
    split = load_dataset("fashion_mnist", str(tmp_path / "d"), train=train)
    assert split.class_names == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    assert split.class_names[0] == "T-shirt/top" and split.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.images, imgs.reshape(len(imgs), -1))
    np.testing.assert_allclose(as_float(split.images), imgs.reshape(len(imgs), -1) / 255.0,
                               rtol=1e-6)
    assert split.source == str(tmp_path / "d")
    mnist = load_dataset("mnist", str(tmp_path / "d"), train=train)
    assert mnist.class_names == tuple("0123456789")


def test_raw_file_preferred_over_gz(tmp_path):
    _write_dir(tmp_path, labels=[0, 1, 2, 0], gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([2, 2, 2, 2]), gzip=True)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", _images(4), gzip=True)
    np.testing.assert_array_equal(load_dataset("mnist", str(tmp_path)).labels, [0, 1, 2, 0])


def test_idx_dataset_class_names_from_labels(tmp_path):
    _write_dir(tmp_path, labels=[0, 4, 2, 4])
    split = load_dataset("idx", str(tmp_path), train=True)
    assert split.class_names == ("0", "1", "2", "3", "4")
    with pytest.raises(ValueError, match="explicit directory"):
        load_dataset("idx", None)


def test_missing_directory_says_how_to_get_data(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_dataset("fashion_mnist", str(missing), train=True)
    msg = str(excinfo.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root=" in msg
    with pytest.raises(FileNotFoundError, match="data.root="):
        load_dataset("idx", str(missing))


def test_missing_file_names_the_path(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", _images(2))
    with pytest.raises(FileNotFoundError) as excinfo:
        load_dataset("mnist", str(tmp_path), train=True)
    assert str(tmp_path / "train-labels-idx1-ubyte") in str(excinfo.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        load_dataset("cifar", None)
    msg = str(excinfo.value)
    assert "cifar" in msg and all(n in msg for n in ("fashion_mnist", "mnist", "idx"))


def test_default_root_is_debian_package_path():
    assert data.FASHION_MNIST_ROOT == "/usr/share/datasets/fashion-mnist"


def test_subset_is_a_seeded_sample_in_order():
    split = Split(images=np.arange(12, dtype=np.float32).reshape(6, 2),
                  labels=np.arange(6, dtype=np.int64), class_names=tuple("012345"), source="s")
    small = subset(split, 4, seed=0)
    rows = small.labels                    # one row per class: the labels are the rows
    assert len(rows) == 4 and len(set(rows.tolist())) == 4 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(small.images, split.images[rows])
    np.testing.assert_array_equal(subset(split, 4, seed=0).labels, rows)   # reproducible
    assert any(not np.array_equal(subset(split, 4, seed=s).labels, rows) for s in range(1, 9))
    assert small.class_names == split.class_names
    assert subset(split, 0, 0) is split and len(subset(split, 100, 0)) == 6
    with pytest.raises(ValueError, match="-1"):
        subset(split, -1, 0)


def test_write_idx_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="2 dimensions"):
        write_idx(tmp_path / "x", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="256"):
        write_idx(tmp_path / "x", np.array([0, 256]))


@pytest.mark.parametrize("rows, cols", [(0, 0), (0, 3), (3, 0)])
def test_images_of_zero_pixels_are_rejected(tmp_path, rows, cols):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2051, 2, rows, cols))
    _assert_value_error(path, f"{rows}x{cols}", "at least 1x1")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="at least 1x1") as excinfo:
        load_dataset("mnist", str(tmp_path))
    assert str(path) in str(excinfo.value)


def test_images_file_with_no_images_is_rejected(tmp_path):
    _write_pair(tmp_path, np.zeros((0, 28, 28), np.uint8), [])
    with pytest.raises(ValueError, match="holds 0 images") as excinfo:
        load_dataset("mnist", str(tmp_path))
    assert str(tmp_path / "train-images-idx3-ubyte") in str(excinfo.value)
