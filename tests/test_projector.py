"""Projector export: files per tag, one metadata line per point, and a second export (a
resumed run) that replaces the first instead of appending to projector_config.pbtxt."""
import numpy as np
import pytest

from dist_triplet.projector import export_projector, read_tensor


def _export(log_dir, n=9, images=True):
    rng = np.random.default_rng(0)
    pixels = rng.random((n, 16), dtype=np.float32)          # 4 x 4 images in [0, 1]
    emb = rng.standard_normal((n, 3)).astype(np.float32)
    labels = np.arange(n) % 3
    return export_projector(str(log_dir), {"origin": pixels, "triplet": emb}, labels,
                            ("cat", "dog", "bird"), images=pixels if images else None), emb


def test_projector_files_and_metadata(tmp_path):
    written, emb = _export(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["origin", "triplet"]
    meta = (tmp_path / "00000" / "triplet" / "metadata.tsv").read_text().splitlines()
    # A header row (two tab-separated columns), then the item id and class of each point.
    assert meta == ["id\tclass"] + [f"test/{i}\t{name}" for i, name in
                                     enumerate(["cat", "dog", "bird"] * 3)]
    tensors = read_tensor(tmp_path / "00000" / "triplet")
    np.testing.assert_allclose(tensors, emb, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "00000" / "origin" / "sprite.png").is_file()
    assert read_tensor(tmp_path / "00000" / "origin").shape == (9, 16)


def test_second_export_replaces_the_first(tmp_path):
    _export(tmp_path)
    _export(tmp_path, n=6, images=False)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2
    assert len((tmp_path / "00000" / "origin" / "metadata.tsv").read_text().splitlines()) == 7
    assert not (tmp_path / "00000" / "origin" / "sprite.png").exists()


def test_metadata_ids_are_given_or_test_rows_and_cells_hold_no_tabs():
    from dist_triplet.projector import metadata_tsv
    text = metadata_tsv(np.array([1, 0]), ("a\tb", "c\nd"), ids=["x/1.png", "y\t2"])
    assert text == "id\tclass\nx/1.png\tc d\ny 2\ta b\n"
    assert metadata_tsv(np.array([0]), ("a",)) == "id\tclass\ntest/0\ta\n"
    with pytest.raises(ValueError, match="1 ids but 2 labels"):
        metadata_tsv(np.array([0, 0]), ("a",), ids=["one"])


def test_row_count_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'triplet': 2 rows but 3 labels"):
        export_projector(str(tmp_path), {"triplet": np.zeros((2, 2), np.float32)},
                         np.arange(3), ("a", "b", "c"))


# ----------------------------------------------------------------------------- sprite

from dist_triplet.projector import PAD_RGB, make_sprite  # noqa: E402


def reference_sprite(images, side, per_row):
    """Plain loops over every sprite pixel: image i centred in cell (i // G, i % G)."""
    n, h, w, _ = images.shape
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((per_row * side, per_row * side, 3), np.uint8)
    for y in range(per_row * side):
        for x in range(per_row * side):
            i = (y // side) * per_row + x // side
            yy, xx = y % side - top, x % side - left
            if i < n and 0 <= yy < h and 0 <= xx < w:
                out[y, x] = images[i, yy, xx]
            else:
                out[y, x] = PAD_RGB
    return out


@pytest.mark.parametrize("n, h, w", [(5, 2, 3), (7, 4, 4), (10, 5, 2), (1, 3, 3), (4, 3, 3)])
def test_sprite_cells_and_padding_rgb(n, h, w):
    images = np.random.default_rng(n).integers(1, 256, (n, h, w, 3)).astype(np.uint8)
    sprite, side = make_sprite(images)
    per_row = int(np.ceil(np.sqrt(n)))
    assert side == max(h, w) and sprite.shape == (per_row * side, per_row * side, 3)
    assert sprite.dtype == np.uint8
    np.testing.assert_array_equal(sprite, reference_sprite(images, side, per_row))
    # The empty cells (after the last image) are the pad colour, every pixel of them.
    for i in range(n, per_row * per_row):
        r, c = divmod(i, per_row)
        cell = sprite[r * side:(r + 1) * side, c * side:(c + 1) * side]
        assert (cell == PAD_RGB).all(), i


def test_sprite_grey_floats_and_flat_rows():
    """Floats in [0, 1] scale by 255 and round; grey repeats into R, G and B; flat rows
    take image_shape (or square by default)."""
    grey = np.array([[[0.0, 0.2], [0.5, 1.0]], [[1.0, 1.0], [0.0, 0.0]]], np.float32)
    expect = np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=3)
    sprite, side = make_sprite(grey)
    np.testing.assert_array_equal(sprite, reference_sprite(expect, 2, 2))
    assert sprite[0, 1].tolist() == [51, 51, 51] and sprite[1, 0].tolist() == [128, 128, 128]
    np.testing.assert_array_equal(make_sprite(grey.reshape(2, 4))[0], sprite)
    wide = np.arange(12, dtype=np.uint8).reshape(2, 6)                 # 2 images of 2 x 3
    np.testing.assert_array_equal(make_sprite(wide, image_shape=(2, 3))[0],
                                  make_sprite(wide.reshape(2, 2, 3))[0])
    with pytest.raises(ValueError, match="rows of 6 values are not square images"):
        make_sprite(wide)
    with pytest.raises(ValueError, match=r"C = 1 \(grey\) or 3 \(RGB\)"):
        make_sprite(np.zeros((2, 3, 3, 2), np.uint8))


def test_exported_sprite_and_config(tmp_path):
    """sprite.png is make_sprite's array exactly (empty cells included), the same on every
    export, and projector_config.pbtxt names it with its cell size, as TensorBoard reads it."""
    from PIL import Image
    rng = np.random.default_rng(1)
    # 5 images of 3 x 3 in a 3 x 3 grid: the last row is empty, where tensorboardX 2.6.5
    # leaves uninitialised memory.
    pixels = rng.random((5, 9), dtype=np.float32)
    labels = np.arange(5) % 3
    export_projector(str(tmp_path), {"origin": pixels, "triplet": pixels[:, :2]}, labels,
                     ("a", "b", "c"), images=pixels)
    expect, side = make_sprite(pixels)
    path = tmp_path / "00000" / "origin" / "sprite.png"
    with Image.open(path) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), expect)
    first = path.read_bytes()
    with Image.open(path) as im:
        arr = np.asarray(im)
    assert (arr[3:6, 6:] == PAD_RGB).all() and (arr[6:] == PAD_RGB).all()  # cells 5 to 8
    export_projector(str(tmp_path), {"origin": pixels, "triplet": pixels[:, :2]}, labels,
                     ("a", "b", "c"), images=pixels)
    assert path.read_bytes() == first

    pb2 = pytest.importorskip("tensorboard.plugins.projector.projector_config_pb2")
    from google.protobuf import text_format
    config = text_format.Parse((tmp_path / "projector_config.pbtxt").read_text(),
                               pb2.ProjectorConfig())
    assert [e.tensor_path for e in config.embeddings] == ["00000/origin/tensors.bytes",
                                                          "00000/triplet/tensors.bytes"]
    for e, tag in zip(config.embeddings, ("origin", "triplet")):
        assert e.metadata_path == f"00000/{tag}/metadata.tsv"
        assert e.sprite.image_path == f"00000/{tag}/sprite.png"
        assert list(e.sprite.single_image_dim) == [side, side] == [3, 3]


def test_tensor_file_is_what_tensorboard_reads(tmp_path):
    """Binary float32 rows with the shape in the config, read back bit for bit the way
    TensorBoard's projector plugin does (text first; binary when the bytes are not UTF-8);
    a matrix whose bytes are valid UTF-8 (all zeros) goes to tensors.tsv instead."""
    emb = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32)
    export_projector(str(tmp_path), {"triplet": emb, "zeros": np.zeros((7, 3), np.float32)},
                     np.arange(7) % 2, ("a", "b"))
    raw = (tmp_path / "00000" / "triplet" / "tensors.bytes").read_bytes()
    assert len(raw) == 7 * 5 * 4
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(7, 5), emb)
    np.testing.assert_array_equal(read_tensor(tmp_path / "00000" / "triplet"), emb)
    assert not (tmp_path / "00000" / "zeros" / "tensors.bytes").exists()
    assert np.loadtxt(tmp_path / "00000" / "zeros" / "tensors.tsv", ndmin=2).shape == (7, 3)
    plugin = pytest.importorskip("tensorboard.plugins.projector.projector_plugin")
    pb2 = pytest.importorskip("tensorboard.plugins.projector.projector_config_pb2")
    from google.protobuf import text_format
    config = text_format.Parse((tmp_path / "projector_config.pbtxt").read_text(),
                               pb2.ProjectorConfig())
    entry = config.embeddings[0]
    assert list(entry.tensor_shape) == [7, 5]
    with pytest.raises(UnicodeDecodeError):
        plugin._read_tensor_tsv_file(str(tmp_path / entry.tensor_path))
    np.testing.assert_array_equal(plugin._read_tensor_binary_file(
        str(tmp_path / entry.tensor_path), entry.tensor_shape), emb)
