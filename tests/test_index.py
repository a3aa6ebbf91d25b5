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
