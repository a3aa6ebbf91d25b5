"""The saved index (dist_triplet.retrieval.index and the index command) on tiny generated data."""
import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="index and search embed with an MXNet export")
faiss = pytest.importorskip("faiss", reason="the index is a faiss index")

# setup: a fixture
from _search_util import (CAL, CAL_LABELS, GALLERY, GALLERY_LABELS, error_line, export_identity,
                         setup, write_split)  # noqa: E402,F401

from dist_triplet import calibrate as calibrate_cli  # noqa: E402
from dist_triplet import embed as embed_cli  # noqa: E402
from dist_triplet import index as index_cli  # noqa: E402
from dist_triplet import search as search_cli  # noqa: E402
from dist_triplet.retrieval.index import Index  # noqa: E402
from dist_triplet.retrieval.neighbours import build_faiss, recall_at_k  # noqa: E402


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_reports_its_measured_recall(tmp_path, kind, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2000, 4))
    model = export_identity(tmp_path / "model")
    data = tmp_path / "data"
    write_split(data, "train", pixels, rng.integers(0, 10, size=2000))
    out = tmp_path / kind
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--out", str(out),
                           "--kind", kind, "--nprobe", "2", "--ef-search", "8"]) == 0
    meta = json.load(open(out / "meta.json"))
    rec = meta["recall"]
    assert rec["k"] == 10 and rec["queries"] == 1000 and 0.2 < rec["recall_at_k"] <= 1.0
    assert f"recall@10 {rec['recall_at_k']:.4f}" in capsys.readouterr().out
    # The same figure from the stored index and the gallery's embeddings (pixels / 255).
    ix = Index.load(str(out))
    emb = pixels.astype(np.float32) / np.float32(255)   # as data.load_split
    assert recall_at_k(ix.faiss, emb) == rec
    flat, _ = build_faiss(emb, "flat")
    assert recall_at_k(flat, emb)["recall_at_k"] == 1.0


def test_missing_or_corrupt_index_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    args = ["--query", f"{data}:test", "--out", str(tmp / "r.jsonl")]
    assert search_cli.main(["--index", str(tmp / "nope")] + args) == 2
    assert "nope does not exist" in error_line(capsys)
    lab = os.path.join(index_dir, "labels.npy")
    raw = bytearray(open(lab, "rb").read())
    raw[-1] ^= 1
    open(lab, "wb").write(bytes(raw))
    assert search_cli.main(["--index", index_dir] + args) == 2
    assert "labels.npy: sha256 differs" in error_line(capsys)
    open(os.path.join(index_dir, "meta.json"), "w").write("{not json")
    assert search_cli.main(["--index", index_dir] + args) == 2
    assert "meta.json: not valid JSON" in error_line(capsys)
    assert not (tmp / "r.jsonl").exists()


def test_index_out_exists_or_bad_data_writes_nothing(setup, capsys):
    tmp, model, data, index_dir = setup
    before = {f: open(os.path.join(index_dir, f), "rb").read() for f in os.listdir(index_dir)}
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--out", index_dir]) == 2
    assert "already exists" in error_line(capsys)
    np.save(tmp / "bad.npy", np.zeros((2, 5), np.uint8))
    assert index_cli.main(["--model", model, "--data", str(tmp / "bad.npy"), "--out", index_dir,
                           "--force"]) == 2
    assert "bad.npy" in error_line(capsys)
    after = {f: open(os.path.join(index_dir, f), "rb").read() for f in os.listdir(index_dir)}
    assert after == before
    assert not [f for f in os.listdir(tmp) if f.startswith(".")]
    # --force with good data replaces the index (new id: other content).
    assert index_cli.main(["--model", model, "--data", f"{data}:test", "--out", index_dir,
                           "--force"]) == 0
    assert json.load(open(os.path.join(index_dir, "meta.json")))["count"] == 7


@pytest.mark.parametrize("edit, key", [
    (lambda m: {k: v for k, v in m.items() if k != "model"}, "'model'"),
    (lambda m: dict(m, files="abc"), "'files'"),
    (lambda m: dict(m, model=dict(m["model"], params_sha256=None)), "'model.params_sha256'"),
    (lambda m: dict(m, kind=3), "'kind'"),
])
def test_edited_meta_json_is_exit_2_naming_meta_json_and_the_key(setup, capsys, edit, key):
    """adv1 finding: an index whose meta.json lost "model" or has "files": "abc" gave
    KeyError / AttributeError tracebacks in search and calibrate."""
    tmp, model, data, index_dir = setup
    meta_path = os.path.join(index_dir, "meta.json")
    with open(meta_path) as fh:
        meta = json.load(fh)
    with open(meta_path, "w") as fh:
        json.dump(edit(meta), fh)
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert meta_path in line and key in line
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                               "--target-precision", "0.5"]) == 2
    line = error_line(capsys)
    assert meta_path in line and key in line


@pytest.mark.parametrize("where", ["inside_a_file", "proc"])
def test_index_out_and_embed_output_that_cannot_be_written_name_the_option(setup, capsys,
                                                                           where):
    """adv1 cosmetics: ``index --out`` under a file or on /proc named the hidden temp
    directory; ``embed --output`` inside a file gave "[Errno 17] File exists"."""
    from dist_triplet import embed as embed_cli
    tmp, model, data, index_dir = setup
    if where == "proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc here")
        base = "/proc/dist_triplet_test"
    else:
        (tmp / "afile").write_text("x")
        base = str(tmp / "afile")
    capsys.readouterr()
    out = f"{base}/ix"
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--out", out]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --out {out}: cannot write there: ") and ".tmp" not in line
    emb = f"{base}/e.npy"
    assert embed_cli.main(["--model", model, "--input", str(data / "t10k-images-idx3-ubyte"),
                           "--out", emb]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: --out {emb}: cannot write there: "), line


# ----------------------------------------------------------------------------- issue 17

def test_hand_edited_count_is_refused(setup, capsys):
    """Issue 17 (5): meta.json's count edited by hand was accepted."""
    tmp, model, data, index_dir = setup
    meta_path = os.path.join(index_dir, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, count=3), open(meta_path, "w"))
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert meta_path in line and "count 3" in line and "holds 4" in line


def test_meta_is_a_typed_dataclass_round_trip(setup):
    from dist_triplet.retrieval.index import IndexMeta
    tmp, model, data, index_dir = setup
    doc = json.load(open(os.path.join(index_dir, "meta.json")))
    meta = IndexMeta.from_json(doc, "meta.json")
    assert (meta.kind, meta.dim, meta.count, meta.model.input_units) == ("flat", 4, 4, 4)
    with pytest.raises(ValueError, match="key 'dim' is '4', expected <class 'int'>"):
        IndexMeta.from_json(dict(doc, dim="4"), "meta.json")


def test_thumbnails_are_small_or_off(tmp_path, capsys):
    """Issue 17 (7): index copied every full-size input into images.npy, with no way out."""
    from dist_triplet.retrieval.index import THUMB, thumbnails
    rng = np.random.default_rng(0)
    x = rng.random((3, 70 * 40 * 3)).astype(np.float32)
    th = thumbnails(x, (70, 40, 3))
    assert th.shape == (3, 23, 13, 3) and max(th.shape[1:3]) <= THUMB       # f = 3
    want = x.reshape(3, 70, 40, 3)[0, :3, :3].mean(axis=(0, 1))
    np.testing.assert_array_equal(th[0, 0, 0], np.rint(want * 255).astype(np.uint8))
    assert thumbnails(x[:, :28 * 28], (28, 28)).shape == (3, 28, 28)     # small: as they are
    # Adversarial trial: 40 x 1 images got (20, 0) thumbnails, and empty grid tiles.
    np.testing.assert_array_equal(thumbnails(x[:, :40], (40, 1))[..., 0],
                                  np.rint(x[:, :40] * 255).astype(np.uint8))
    model = export_identity(tmp_path / "model")
    write_split(tmp_path / "d", "train", GALLERY, GALLERY_LABELS)
    write_split(tmp_path / "d", "t10k", CAL, CAL_LABELS)
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'd'}:train",
                           "--no-thumbnails", "--out", str(tmp_path / "ix")]) == 0
    assert "images.npy" not in os.listdir(tmp_path / "ix")
    png = tmp_path / "g.png"
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query",
                            f"{tmp_path / 'd'}:test", "--k", "1", "--grid", str(png),
                            "--out", str(tmp_path / "r.jsonl")]) == 0 and png.exists()


def test_one_class_gallery_is_allowed(tmp_path, capsys):
    """Issue 17 (4): a one-class image folder could not be indexed."""
    pytest.importorskip("PIL", reason="image folders are read with Pillow")
    from _data_util import make_images, write_folder
    images, labels = make_images(5, 1, 2, 2, 1, seed=0)
    write_folder(tmp_path / "shots", images[..., 0], labels, ["shoe"])
    model = export_identity(tmp_path / "model")
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'shots'}:all",
                           "--mode", "L", "--out", str(tmp_path / "ix")]) == 0
    ix = Index.load(str(tmp_path / "ix"))
    assert len(ix) == 5 and ix.class_names == ("shoe",)
    # The same for a CSV of one label (its reader refused it: "triplets need 2 classes").
    from _data_util import write_csv
    write_csv(tmp_path / "shots.csv", [(f"shots/shoe/{f}", 7) for f in
                                       sorted(os.listdir(tmp_path / "shots" / "shoe"))])
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'shots.csv'}:all",
                           "--mode", "L", "--out", str(tmp_path / "ix_csv")]) == 0
    ix = Index.load(str(tmp_path / "ix_csv"))
    assert len(ix) == 5 and ix.class_names == ("7",)


def test_image_folder_of_mixed_sizes_takes_the_models_image_size(tmp_path, capsys):
    """Adversarial trial: a folder of 2x2 and 4x4 images was refused, naming the trainer's
    data.image_size, though the model's meta.json says 2x2x1. Now they are read at the
    model's size (as at its mode); a model without an image shape still needs a size,
    and the message names this command's --image-size too."""
    pytest.importorskip("PIL", reason="image folders are read with Pillow")
    from _data_util import write_png
    from dist_triplet.data.images import read_image
    rng = np.random.default_rng(0)
    for i, side in enumerate([2, 4, 4, 2]):
        os.makedirs(tmp_path / "shots" / f"c{i % 2}", exist_ok=True)
        write_png(tmp_path / "shots" / f"c{i % 2}" / f"{i}.png",
                  rng.integers(0, 256, size=(side, side), dtype=np.uint8))
    shots = f"{tmp_path / 'shots'}:all"
    bare = export_identity(tmp_path / "bare")          # meta.json: no image shape
    sized = export_identity(tmp_path / "sized")
    meta_path = os.path.join(sized, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, image_shape=[2, 2, 1]), open(meta_path, "w"))
    assert index_cli.main(["--model", sized, "--data", shots, "--out", str(tmp_path / "ix")]) == 0
    assert len(Index.load(str(tmp_path / "ix"))) == 4
    out = tmp_path / "e.npy"
    assert embed_cli.main(["--model", sized, "--input", shots, "--out", str(out)]) == 0
    files = sorted((tmp_path / "shots").glob("*/*.png"))   # class folders, then names
    want = [read_image(str(f), "L", (2, 2)).ravel() / np.float32(255) for f in files]
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6)   # identity model: the pixels
    assert index_cli.main(["--model", bare, "--data", shots, "--mode", "L",
                           "--out", str(tmp_path / "ix2")]) == 2
    line = error_line(capsys)
    assert "images of mixed sizes need " in line and "--image-size H,W" in line, line
    assert not (tmp_path / "ix2").exists()
    assert index_cli.main(["--model", bare, "--data", shots, "--mode", "L", "--image-size",
                           "2", "--out", str(tmp_path / "ix2")]) == 0


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "bogus"])
def test_hand_edited_kind_is_refused(setup, capsys, kind):
    """meta.json's kind must name the index index.faiss holds (an edited 'hnsw' on a flat
    index raised AttributeError; 'bogus' was searched as if valid)."""
    tmp, model, data, index_dir = setup
    meta_path = os.path.join(index_dir, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, kind=kind), open(meta_path, "w"))
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert meta_path in line and f"kind {kind!r}" in line and "IndexFlat" in line


def _edit_meta(index_dir, **changes):
    meta_path = os.path.join(index_dir, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, **changes), open(meta_path, "w"))
    return meta_path, meta


def _search_and_calibrate_fail(tmp, data, index_dir, capsys, *needles):
    """search and calibrate both exit 2 with one line holding every needle; nothing written."""
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert all(n in line for n in needles), line
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                               "--target-precision", "0.5"]) == 2
    line = error_line(capsys)
    assert all(n in line for n in needles), line
    assert not (tmp / "r.jsonl").exists()
    assert not os.path.exists(os.path.join(index_dir, "threshold.json"))


def test_another_model_swapped_into_meta_json_is_refused(setup, capsys):
    """meta.json's model.dir and params_sha256 both swapped to another export: search
    embedded the queries with that model and answered, exit 0. index_id covers the model."""
    from dist_triplet.model import build_embedding_net, initialize
    from dist_triplet.export import export_model
    from dist_triplet.retrieval.model import sha256_file
    tmp, model, data, index_dir = setup
    net = build_embedding_net(4, [4], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=5)
    other = export_model(net, str(tmp / "other"), mx.cpu(), 4)
    meta_path, meta = _edit_meta(index_dir)
    _edit_meta(index_dir, model=dict(meta["model"], dir=other, params_sha256=sha256_file(
        os.path.join(other, "embed-0000.params"))))
    _search_and_calibrate_fail(tmp, data, index_dir, capsys, meta_path, "'index_id'",
                               "'model.params_sha256'")
    _edit_meta(index_dir, model=meta["model"], index_id="0" * 64)      # index_id alone
    _search_and_calibrate_fail(tmp, data, index_dir, capsys, meta_path, "'index_id'")
    _edit_meta(index_dir, index_id=meta["index_id"])                    # as built: works
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 0


@pytest.mark.parametrize("key, value, needles", [
    ("input", "features", ["key 'input' is 'features'", "[2, 2]"]),
    ("input", "pictures", ["key 'input' is 'pictures'"]),
    ("image_shape", None, ["key 'input' is 'images'", "'image_shape' is None"]),
    ("image_shape", [1, 4], ["'image_shape' [1, 4]", "2x2x1 images"]),
    ("model.input_units", 5, ["'model.input_units' 5", "(2x2x1 images (4 values), "]),
])
def test_hand_edited_input_and_image_shape_are_refused(setup, capsys, key, value, needles):
    """input, image_shape and model.input_units were not checked on load: an edit was
    accepted. They are checked against image_shape and against the loaded model."""
    tmp, model, data, index_dir = setup
    _edit_meta(model, image_shape=[2, 2, 1])           # as a training run's export says
    meta_path, meta = _edit_meta(index_dir)
    assert (meta["input"], meta["image_shape"], meta["model"]["input_units"]) == \
        ("images", [2, 2], 4)
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1"]) == 0
    if key.startswith("model."):
        meta_path, _ = _edit_meta(index_dir, model=dict(meta["model"], input_units=value))
    else:
        meta_path, _ = _edit_meta(index_dir, **{key: value})
    _search_and_calibrate_fail(tmp, data, index_dir, capsys, meta_path, *needles)


@pytest.mark.parametrize("command", ["search --out", "search --grid", "calibrate --out"])
def test_out_that_is_a_directory_is_one_line_naming_the_option(setup, capsys, command):
    """search --out/--grid and calibrate --out naming an existing directory gave raw errno
    text with --force ("[Errno 21] Is a directory: '.d.tmp-123' -> 'd'")."""
    tmp, model, data, index_dir = setup
    (tmp / "d").mkdir()
    name, option = command.split()
    args = (["--query", f"{data}:test", "--k", "1"] if name == "search" else
            ["--data", f"{data}:test", "--target-precision", "0.5"])
    main = search_cli.main if name == "search" else calibrate_cli.main
    if option == "--grid":
        args += ["--out", str(tmp / "r.jsonl")]
    for force in ([], ["--force"]):
        capsys.readouterr()
        assert main(["--index", index_dir] + args + [option, str(tmp / "d")] + force) == 2
        assert error_line(capsys) == f"error: {option} {tmp / 'd'} is a directory: pass a file name"
        assert sorted(os.listdir(tmp / "d")) == [] and not (tmp / "r.jsonl").exists()
        assert not os.path.exists(os.path.join(index_dir, "threshold.json"))
    # index --out names a directory: an empty one is taken with --force, a file is not.
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--out",
                           str(tmp / "d"), "--force"]) == 0
    (tmp / "f").write_text("x")
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--out",
                           str(tmp / "f"), "--force"]) == 2
    assert "is not an index directory" in error_line(capsys)


def test_file_labels_name_only_the_classes_present(tmp_path, capsys):
    """Adversarial trial: --labels [3, 5e6] named 5,000,001 classes (a 54 MB ids.json);
    [3, 2e9] ran out of memory in a traceback."""
    model = export_identity(tmp_path / "model")
    np.save(tmp_path / "x.npy", np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]])
    np.save(tmp_path / "y.npy", np.array([3, 2_000_000_000, 3, 7, 3, 7]))
    out = tmp_path / "ix"
    assert index_cli.main(["--model", model, "--data", str(tmp_path / "x.npy"), "--labels",
                           str(tmp_path / "y.npy"), "--out", str(out)]) == 0
    ix = Index.load(str(out))
    assert ix.class_names == ("3", "7", "2000000000")
    assert [ix.class_names[c] for c in ix.labels] == ["3", "2000000000", "3", "7", "3", "7"]
    # Queries labelled by the same ids find their classes by name.
    assert search_cli.main(["--index", str(out), "--query", str(tmp_path / "x.npy"),
                            "--labels", str(tmp_path / "y.npy"), "--k", "1",
                            "--exclude-self"]) == 0
    assert "precision@1 " in capsys.readouterr().err


def test_an_empty_out_never_replaces_the_current_directory(setup, tmp_path, monkeypatch,
                                                          capsys):
    """Adversarial trial: index --out "$UNSET" renamed the current directory aside, put the
    index in its place and deleted the old contents."""
    tmp, model, data, index_dir = setup
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("a week of work")
    monkeypatch.chdir(work)
    for main, argv in (
            (index_cli.main, ["--model", model, "--data", f"{data}:train"]),
            (search_cli.main, ["--index", str(index_dir), "--query", f"{data}:test"]),
            (calibrate_cli.main, ["--index", str(index_dir), "--data", f"{data}:test"]),
            (embed_cli.main, ["--model", model, "--input", f"{data}:test"])):
        for force in ([], ["--force"]):
            assert main(argv + ["--out", ""] + force) == 2
            assert "--out is empty" in error_line(capsys)
    assert os.listdir(work) == ["precious.txt"] and os.getcwd() == str(work)
    assert (work / "precious.txt").read_text() == "a week of work"


def test_a_failed_command_leaves_no_directory_it_made(setup, tmp_path, capsys):
    """Adversarial trial: the --out parents made before any work stayed after the error."""
    tmp, model, data, index_dir = setup
    out = tmp_path / "new" / "a" / "b" / "r.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", str(tmp_path / "missing.npy"),
                            "--k", "1", "--out", str(out),
                            "--grid", str(tmp_path / "g" / "x.png")]) == 2
    assert "missing.npy" in error_line(capsys)
    assert not (tmp_path / "new").exists() and not (tmp_path / "g").exists()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(out)]) == 0
    assert out.is_file()



def test_build_refuses_images_that_are_not_thumbnails(setup):
    """Index.build(images=<the float rows>) saved, and a later search --grid failed with
    "cannot reshape array of size 5760 into shape (20,24)": refused at build."""
    emb = np.eye(4, dtype=np.float32)
    for images in (emb, np.zeros((4, 2, 2), np.float32), np.zeros((3, 2, 2), np.uint8),
                   np.zeros((4, 40, 8), np.uint8), np.zeros((4, 2, 2, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"images must be \(4, h, w\[, 3\]\) uint8 "
                                             r"thumbnails \(h, w <= 32\), found"):
            Index.build(emb, images=images)
    assert Index.build(emb, images=np.zeros((4, 2, 2), np.uint8)).images.shape == (4, 2, 2)
