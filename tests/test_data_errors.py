"""Bad input of issue 10: each a one-line error naming the file, key or value, from
``load_data``; and through ``python -m dist_triplet.train``'s ``main``: exit status 2,
``error: ...`` on stderr, and nothing written (no run directory, no cache entry)."""
import logging
import os

import numpy as np
import pytest

from _data_util import data_cfg, make_images, write_csv, write_folder, write_png
from dist_triplet.data import load_data

pytest.importorskip("PIL")


def fails(cfg, exc_type=ValueError, *needles):
    with pytest.raises(exc_type) as exc:
        load_data(cfg)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ----------------------------------------------------------------------------- image files

def test_mixed_sizes_need_image_size(tmp_path):
    images, labels = make_images(4, 2, 6, 6, 3)
    paths = write_folder(tmp_path, images, labels)
    write_png(paths[5], np.zeros((7, 9, 3), np.uint8))           # one odd size
    fails(data_cfg(path=str(tmp_path), test_fraction=0.5), ValueError,
          paths[5], "7x9", paths[0], "6x6", "data.image_size")
    train, test = load_data(data_cfg(path=str(tmp_path), image_size=[6, 6], test_fraction=0.5))
    assert train.image_shape == (6, 6, 3) and len(train) + len(test) == 8


@pytest.mark.parametrize("how", ["truncated", "not_an_image"])
def test_unreadable_image_is_named(tmp_path, how):
    images, labels = make_images(4, 2, 8, 8, 3)
    paths = write_folder(tmp_path, images, labels)
    bad = paths[6]
    if how == "truncated":
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    else:
        open(bad, "w").write("<html>not a png</html>")
    fails(data_cfg(path=str(tmp_path), test_fraction=0.5), ValueError, bad,
          "unreadable or truncated image")


def test_empty_class_folder(tmp_path):
    images, labels = make_images(4, 2, 4, 4, 3)
    write_folder(tmp_path, images, labels)
    os.makedirs(tmp_path / "zz_empty")
    (tmp_path / "zz_empty" / "notes.txt").write_text("no images here")
    fails(data_cfg(path=str(tmp_path)), ValueError, str(tmp_path / "zz_empty"),
          "empty class folder", "folder")


def test_folder_with_one_class(tmp_path):
    images, labels = make_images(4, 1, 4, 4, 3)
    write_folder(tmp_path, images, labels, ["only"])
    # The folder itself may hold one class (a gallery); training data may not, and no
    # data.test_fraction helps (the message said to raise it).
    msg = fails(data_cfg(path=str(tmp_path)), ValueError, str(tmp_path),
                "triplets need at least 2 classes", "found 1: 0 ('only')")
    assert "test_fraction" not in msg


def test_folder_without_class_folders(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    fails(data_cfg(path=str(tmp_path), format="folder"), ValueError, str(tmp_path),
          "no class folders")


def test_train_and_test_of_different_sizes(tmp_path):
    a, la = make_images(2, 2, 5, 5, 3)
    b, lb = make_images(2, 2, 4, 6, 3)
    write_folder(tmp_path / "train", a, la)
    write_folder(tmp_path / "test", b, lb)
    fails(data_cfg(path=str(tmp_path)), ValueError, str(tmp_path / "train"),
          str(tmp_path / "test"), "5x5x3", "4x6x3", "one width")


# ----------------------------------------------------------------------------- npz

def test_npz_missing_key_lists_keys(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.zeros((4, 2)), y=np.arange(4))
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "missing key(s) 'x'",
          "'features', 'y'", "data.format=npz")
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 2)))
    fails(data_cfg(path=str(tmp_path / "e.npz")), ValueError, "e.npz", "missing key(s) 'y'",
          "keys: 'x'")


def test_npz_labels_not_integers(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 0.5, 1.0]))
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "key 'y'",
          "integer labels", "float64")


def test_npz_labels_not_matching_x(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.arange(5))
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "key 'y' has shape (5,)",
          "4 rows")


def test_npz_x_of_wrong_kind(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.uint8), y=np.arange(4))
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "key 'x'", "uint8",
          "(N, D) float")


def test_npz_train_and_test_of_different_widths(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 8)), y=np.array([0, 0, 1, 1]))
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 6)), y=np.array([0, 0, 1, 1]))
    fails(data_cfg(path=str(tmp_path)), ValueError, "train.npz", "test.npz", "width 8",
          "width 6")


def test_npz_classes_naming_one_class_twice(tmp_path):
    # Two ids under one name: search compared queries by name and counted hits wrongly.
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 0, 1, 1]),
             classes=np.array(["a", "a"]))
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "'classes'",
          "'a' twice")


def test_sixteen_bit_image_is_refused_not_clipped(tmp_path):
    from PIL import Image
    images, labels = make_images(4, 2, 4, 4, 1)
    paths = write_folder(tmp_path, images, labels)
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(paths[3])    # mode I;16
    with Image.open(paths[3]) as im:
        assert im.mode.startswith("I") and np.asarray(im.convert("L")).max() == 255
    fails(data_cfg(path=str(tmp_path), mode="L", test_fraction=0.5), ValueError, paths[3],
          "16-bit")


def test_npz_bytes_names_unsigned_labels_and_a_corrupt_member(tmp_path):
    x = np.zeros((8, 2), np.float32)
    np.savez(tmp_path / "b.npz", x=x, y=np.repeat([0, 1], 4), classes=np.array([b"cat", b"dog"]))
    train, test = load_data(data_cfg(path=str(tmp_path / "b.npz"), test_fraction=0.5))
    assert train.class_names == ("cat", "dog")                 # not "b'cat'"
    np.savez(tmp_path / "u.npz", x=x, y=np.repeat(np.array([0, 2 ** 63], np.uint64), 4))
    fails(data_cfg(path=str(tmp_path / "u.npz")), ValueError, "u.npz", "key 'y'", "int64")
    # A damaged member: its CRC (stored) or its deflate stream (compressed) fails.
    for save, off in ((np.savez, 300), (np.savez_compressed, 60)):
        save(tmp_path / "c.npz", x=np.arange(4000, dtype=np.float32).reshape(2000, 2),
             y=np.repeat([0, 1], 1000))
        data = bytearray((tmp_path / "c.npz").read_bytes())
        at = data.index(b"x.npy") + off
        data[at:at + 16] = bytes(16)
        (tmp_path / "c.npz").write_bytes(bytes(data))
        fails(data_cfg(path=str(tmp_path / "c.npz")), ValueError, "c.npz", "key 'x'")


def test_not_an_npz(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    fails(data_cfg(path=str(tmp_path / "d.npz")), ValueError, "d.npz", "not a NumPy .npz")


# ----------------------------------------------------------------------------- csv

def test_csv_errors(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, np.zeros((2, 2, 3), np.uint8))
    write_csv(tmp_path / "no_label.csv", [("a.png",)], "path")
    fails(data_cfg(path=str(tmp_path / "no_label.csv")), ValueError, "no_label.csv",
          "missing column(s) label", "found columns path")
    write_csv(tmp_path / "bad_label.csv", [("a.png", 0), ("a.png", "cat")])
    fails(data_cfg(path=str(tmp_path / "bad_label.csv")), ValueError, "bad_label.csv",
          "line 3", "'cat'", "not an integer")
    for odd in ("1_0", "\uff12", "1.0"):            # int() reads the first two as 10 and 2
        write_csv(tmp_path / "odd.csv", [("a.png", 0), ("b.png", odd)])
        fails(data_cfg(path=str(tmp_path / "odd.csv")), ValueError, "line 3", repr(odd),
              "not an integer")
    write_csv(tmp_path / "bad_split.csv", [("a.png", 0, "train"), ("b.png", 1, "dev")],
              "path,label,split")
    fails(data_cfg(path=str(tmp_path / "bad_split.csv")), ValueError, "line 3", "'dev'")
    write_csv(tmp_path / "missing.csv", [("a.png", 0), ("c.png", 1)])
    fails(data_cfg(path=str(tmp_path / "missing.csv")), FileNotFoundError, "line 3",
          str(tmp_path / "c.png"))
    # One image on two rows (here spelt two ways) would be one id twice, and could sit in
    # both splits.
    write_csv(tmp_path / "twice.csv", [("a.png", 0), ("b.png", 1), ("./sub/../a.png", 1)])
    fails(data_cfg(path=str(tmp_path / "twice.csv")), ValueError, "twice.csv", "line 4",
          str(tmp_path / "a.png"), "first on line 2")
    # Blank lines count (DictReader skips them: the error named line 4 for line 6); a
    # symlinked folder does not hide a second row of one image; not UTF-8 is one line.
    (tmp_path / "blank.csv").write_text("path,label\na.png,0\n\n\nb.png,x\n")
    fails(data_cfg(path=str(tmp_path / "blank.csv")), ValueError, "line 5", "'x'")
    os.symlink(tmp_path, tmp_path / "link")
    write_csv(tmp_path / "linked.csv", [("a.png", 0), ("b.png", 1), ("link/a.png", 1)])
    fails(data_cfg(path=str(tmp_path / "linked.csv")), ValueError, "line 4", "first on line 2")
    os.link(tmp_path / "a.png", tmp_path / "hard.png")       # a hard link: the same file
    write_csv(tmp_path / "hard.csv", [("a.png", 0), ("b.png", 1), ("hard.png", 1)])
    fails(data_cfg(path=str(tmp_path / "hard.csv")), ValueError, "line 4",
          f"first on line 2 as {tmp_path / 'a.png'}: one file")
    (tmp_path / "dup.csv").write_text("path,label,label\na.png,0,1\nb.png,1,0\n")
    fails(data_cfg(path=str(tmp_path / "dup.csv")), ValueError, "dup.csv",
          "names column(s) label twice (path,label,label)")
    (tmp_path / "latin.csv").write_bytes("path,label\ncaf\xe9.png,0\n".encode("latin-1"))
    fails(data_cfg(path=str(tmp_path / "latin.csv")), ValueError, "latin.csv", "not UTF-8")
    # One label: the reader takes it (a gallery); training data need two classes.
    write_csv(tmp_path / "one.csv", [("a.png", 3), ("b.png", 3)])
    fails(data_cfg(path=str(tmp_path / "one.csv")), ValueError, "one.csv",
          "triplets need at least 2 classes")


# ----------------------------------------------------------------------------- CLI

mx = pytest.importorskip("mxnet")


@pytest.fixture(autouse=True)
def _fresh_logging():
    yield
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


def _cli_fails(capsys, tmp_path, overrides, *needles, cache_ok=False):
    from dist_triplet.train import main
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    capsys.readouterr()
    code = main([f"output.dir={out}", f"data.cache_dir={cache}", "train.epochs=1",
                 "train.batch_size=2", "model.hidden=[8]", "train.progress=false",
                 "eval.projector=false", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")][-1]
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists()
    if cache_ok:  # good data, bad config: the complete entry stays, for the next run
        assert all(os.path.isfile(cache / e / "meta.json") for e in os.listdir(cache))
    else:  # a failed read creates no data.cache_dir (issue 17 (8))
        assert not cache.exists()
    return line


def test_cli_truncated_image_writes_nothing(tmp_path, capsys):
    images, labels = make_images(4, 3, 4, 4, 3)
    paths = write_folder(tmp_path / "d", images, labels)
    open(paths[2], "wb").write(open(paths[2], "rb").read()[:30])
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path / 'd'}", "data.test_fraction=0.5"],
               paths[2])


def test_cli_npz_missing_key_writes_nothing(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)))
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path / 'd.npz'}"], "missing key(s) 'y'")


def test_cli_fewer_classes_than_sampler_p(tmp_path, capsys):
    images, labels = make_images(4, 3, 4, 4, 1)
    np.savez(tmp_path / "d.npz", x=images[..., 0], y=labels)
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path / 'd.npz'}", "data.test_fraction=0.5",
                                  "sampler.kind=pk", "sampler.p=4", "sampler.k=2"],
               "sampler.p=4", "only 3 classes", cache_ok=True)


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    _cli_fails(capsys, tmp_path, ["data.format=npz"], "data.format='npz' needs data.path")
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path}", "data.root=/x"], "data.root")
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path}", "data.image_size=[1, 2, 3]"],
               "data.image_size")
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path}", "data.test_fraction=1"],
               "data.test_fraction")
    _cli_fails(capsys, tmp_path, [f"data.path={tmp_path}", "data.mode=CMYK"], "data.mode")


def test_data_config_keys_and_resume_policies():
    from dist_triplet.config import load_config, resume_policies
    cfg = load_config(None, ["data.path=x.npz", "data.image_size=32", "data.split=classes"])
    assert cfg.data.image_size == [32, 32] and cfg.data.split == "classes"
    assert cfg.output.name == "x"                     # generated run dirs named after the data
    assert load_config(None, ["data.image_size=[24, 40]"]).data.image_size == [24, 40]
    policy = resume_policies()
    # Keys that change what the network sees or which rows train are fixed on resume;
    # where the data live and where the cache lives are not.
    for key in ("data.format", "data.mode", "data.image_size", "data.split",
                "data.test_fraction", "data.split_seed"):
        assert policy[key] == "fixed", key
    assert policy["data.path"] == policy["data.root"] == policy["data.cache_dir"] == "free"


def test_a_photo_stored_sideways_is_read_upright(tmp_path):
    """Adversarial trial: a photo stored rotated with EXIF Orientation 6 (as phones save
    them) was read sideways, far from the same picture saved upright."""
    from PIL import Image
    images, labels = make_images(4, 2, 4, 6, 1)               # (N, 4, 6, 1): not square
    paths = write_folder(tmp_path, images, labels)
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90 clockwise to view"
    stored = np.rot90(images[3, :, :, 0])                     # (6, 4): the sensor's layout
    Image.fromarray(np.ascontiguousarray(stored)).save(paths[3], exif=exif)
    train, test = load_data(data_cfg(path=str(tmp_path), mode="L", test_fraction=0.5))
    rows = {tuple(r): True for r in np.concatenate([train.images, test.images]).reshape(8, -1)}
    assert tuple(images[3].ravel()) in rows                   # upright, as the others
    assert tuple(stored.ravel()) not in rows


def test_folder_links_to_one_image_or_to_nothing_are_refused(tmp_path):
    """adv finding: a class folder linked to another (a-again -> a), or an image linked into
    another class, gave one image two ids and two labels, and a dangling link was skipped
    without a word; a CSV already refused an image listed twice."""
    images, labels = make_images(6, 2, 8, 8, 3, seed=0)
    write_folder(tmp_path / "f", images, labels, names=["a", "b"])
    assert load_data(data_cfg(path=str(tmp_path / "f")))            # the folder as made
    os.symlink(tmp_path / "f" / "a", tmp_path / "f" / "a-again")
    fails(data_cfg(path=str(tmp_path / "f")), ValueError, str(tmp_path / "f" / "a-again"),
          "is the same file as", "(a link): one image, two items")
    os.remove(tmp_path / "f" / "a-again")
    first = sorted(os.listdir(tmp_path / "f" / "a"))[0]
    os.symlink(tmp_path / "f" / "a" / first, tmp_path / "f" / "b" / "from-a.png")
    fails(data_cfg(path=str(tmp_path / "f")), ValueError, "from-a.png", "same file as",
          str(tmp_path / "f" / "a" / first))
    os.remove(tmp_path / "f" / "b" / "from-a.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "f" / "b" / "dangling.png")
    fails(data_cfg(path=str(tmp_path / "f")), ValueError, "dangling.png",
          "a symbolic link to nothing")
    os.remove(tmp_path / "f" / "b" / "dangling.png")
    os.symlink(tmp_path / "gone", tmp_path / "f" / "c")      # a class folder linked to nothing
    fails(data_cfg(path=str(tmp_path / "f")), ValueError, str(tmp_path / "f" / "c"),
          "a symbolic link to nothing")


def test_messages_that_named_the_wrong_thing(tmp_path, monkeypatch):
    """adv finding: a CSV row naming a folder said "does not exist"; an image above
    Pillow's size guard said "unreadable or truncated"."""
    images, labels = make_images(2, 2, 8, 8, 3, seed=0)
    paths = write_folder(tmp_path / "f", images, labels, names=["a", "b"])
    write_csv(tmp_path / "dir.csv", [(paths[0], 0), (paths[2], 1), (tmp_path / "f" / "a", 0)])
    fails(data_cfg(path=str(tmp_path / "dir.csv")), ValueError, "line 4",
          f"{tmp_path / 'f' / 'a'} is a directory, not an image")
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)          # 8 x 8 = 64 > 2 x 20
    fails(data_cfg(path=str(tmp_path / "f")), ValueError, paths[0],
          "Image size (64 pixels) exceeds limit of 40 pixels: above Pillow's decompression-"
          "bomb guard (PIL.Image.MAX_IMAGE_PIXELS)")
