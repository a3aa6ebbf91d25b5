"""Search (dist_triplet.retrieval.search and the search command) on tiny generated data."""
import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="index and search embed with an MXNet export")
faiss = pytest.importorskip("faiss", reason="the index is a faiss index")

# setup: a fixture
from _search_util import (S, error_line, export_identity, flat_index, plain_nearest_other,
                         read_jsonl, setup, write_split)  # noqa: E402,F401

from dist_triplet import index as index_cli  # noqa: E402
from dist_triplet import search as search_cli  # noqa: E402
from dist_triplet.retrieval.metrics import retrieval_metrics  # noqa: E402


def test_index_then_search_gives_hand_computed_neighbours(setup, capsys):
    tmp, model, data, index_dir = setup
    assert sorted(os.listdir(index_dir)) == ["ids.json", "images.npy", "index.faiss",
                                            "labels.npy", "meta.json"]
    meta = json.load(open(os.path.join(index_dir, "meta.json")))
    assert meta["kind"] == "flat" and meta["dim"] == 4 and meta["count"] == 4
    assert meta["image_shape"] == [2, 2] and meta["recall"] is None
    assert not [f for f in os.listdir(tmp) if f.startswith(".")]  # no temp dir left
    out = tmp / "res.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "3",
                            "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["query"] for r in recs] == [f"test/{i}" for i in range(7)]
    # Query test/0 = (0,0,10,0): origin (100), item 3 (0,0,0,3) (100 + 9), class 1 (40000+100).
    r0 = recs[0]
    assert [n["id"] for n in r0["neighbours"]] == ["train/0", "train/3", "train/1"]
    assert [n["label"] for n in r0["neighbours"]] == ["0", "0", "1"]
    np.testing.assert_allclose([n["sq_l2"] for n in r0["neighbours"]],
                               [100 / S, 109 / S, 40100 / S], rtol=1e-6)
    assert r0["prediction"] == "0" and r0["correct"] is True and r0["no_match"] is False
    assert recs[3]["query_label"] == "3" and recs[3]["correct"] is False
    err = capsys.readouterr().err
    assert "precision@1 0.6667" in err  # 4 right of the 6 queries whose class the gallery has

    csv_out = tmp / "res.csv"
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2",
                            "--out-format", "csv", "--out", str(csv_out)]) == 0
    lines = open(csv_out).read().splitlines()
    assert lines[0] == "query,query_label,rank,id,label,sq_l2,no_match"
    assert len(lines) == 1 + 7 * 2 and lines[1].startswith("test/0,0,1,train/0,0,")


def test_grid_frames_right_green_and_wrong_red(setup):
    tmp, model, data, index_dir = setup
    import matplotlib.image as mpimg
    png = tmp / "grid.png"
    # Query test/1 (label 1) has neighbours origin (class 0: red) ... ; test/0 all class 0 first.
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2",
                            "--grid", str(png), "--grid-rows", "2", "--out",
                            str(tmp / "r.jsonl")]) == 0
    img = mpimg.imread(png)[:, :, :3]
    green = np.all(np.abs(img - np.array([0x1a, 0x98, 0x50]) / 255) < 0.02, axis=2)
    red = np.all(np.abs(img - np.array([0xd7, 0x30, 0x27]) / 255) < 0.02, axis=2)
    # Row 0 (label 0): both neighbours class 0 -> 2 green frames; row 1 (label 1): both
    # neighbours class 0 -> 2 red frames. Equal frame sizes, so equal pixel counts.
    assert green.sum() > 0 and red.sum() > 0
    assert abs(int(green.sum()) - int(red.sum())) <= 0.02 * green.sum()


@pytest.mark.parametrize("case", ["ties", "floats", "collapsed"])
def test_leave_one_out_search_reproduces_precision_at_1(tmp_path, case):
    rng = np.random.default_rng(7)
    n = 150
    labels = rng.integers(0, 5, size=n)
    if case == "ties":      # small integers: many exactly equal distances
        emb = rng.integers(0, 3, size=(n, 3)).astype(np.float32)
    elif case == "floats":
        emb = rng.normal(size=(n, 8)).astype(np.float32)
    else:                   # every point the same: the tie rule alone decides
        emb = np.ones((n, 4), np.float32)
    ix = flat_index(tmp_path, emb, labels)
    dist, pos = ix.search(emb, 1, exclude=np.arange(n))
    want = [plain_nearest_other(emb.astype(np.float64), i) for i in range(n)]
    assert pos[:, 0].tolist() == want
    p1 = float(np.mean(labels[pos[:, 0]] == labels))
    assert p1 == retrieval_metrics(emb, labels)["precision_at_1"]
    if case == "collapsed":
        assert pos[:, 0].tolist() == [1] + [0] * (n - 1) and np.all(dist == 0)


def test_search_top_k_matches_a_plain_sort(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.integers(0, 4, size=(60, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=60)
    ix = flat_index(tmp_path, emb, labels)
    q = rng.integers(0, 4, size=(9, 2)).astype(np.float32)
    dist, pos = ix.search(q, 7)
    for i in range(len(q)):
        d = [float(((emb[j] - q[i]) ** 2).sum()) for j in range(60)]
        want = sorted(range(60), key=lambda j: (d[j], j))[:7]
        assert pos[i].tolist() == want
        assert dist[i].tolist() == [d[j] for j in want]


def test_index_built_by_another_model_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    other = export_identity(tmp / "other", 4, 3)       # 3-wide embeddings
    out = tmp / "r.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2",
                            "--model", other,
                            "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "3-wide" in line and "4-wide" in line and "other" in line
    same_width = export_identity(tmp / "same", 4, 4)  # same width, other parameters file?
    # export_identity writes identical parameters: the same model, accepted.
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2", "--model",
                            same_width, "--out", str(out)]) == 0
    assert out.exists()


def test_query_of_the_wrong_image_size_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    np.save(tmp / "q.npy", np.zeros((3, 3, 3), np.uint8))
    out = tmp / "r.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", str(tmp / "q.npy"), "--k", "2",
                            "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "q.npy" in line and "(3, 3, 3)" in line and "4" in line
    assert not out.exists()


def test_k_larger_than_the_gallery_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "5",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert "--k 5" in line and "(4 items" in line and index_dir in line
    assert not (tmp / "r.jsonl").exists()


def test_cli_leave_one_out_search_reproduces_retrieval_metrics(tmp_path, capsys):
    """index + search --exclude-self over one split: the printed Precision@1 is
    retrieval_metrics' on the same embeddings (small integer pixels: many exact ties)."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 3, size=(120, 4)) * 60      # 81 distinct points, many ties
    labels = rng.integers(0, 4, size=120)
    model = export_identity(tmp_path / "model")
    data = tmp_path / "data"
    write_split(data, "t10k", pixels, labels)
    write_split(data, "train", pixels[:1], labels[:1])
    assert index_cli.main(["--model", model, "--data", f"{data}:test",
                           "--out", str(tmp_path / "ix")]) == 0
    out = tmp_path / "self.jsonl"
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", f"{data}:test",
                            "--k", "1", "--exclude-self", "--out", str(out)]) == 0
    emb = pixels.astype(np.float32) / np.float32(255)
    want = retrieval_metrics(emb, labels)
    err = capsys.readouterr().err
    assert f"precision@1 {want['precision_at_1']:.4f}" in err
    recs = read_jsonl(out)
    nearest = [int(r["neighbours"][0]["id"].split("/")[1]) for r in recs]
    assert nearest == [plain_nearest_other(emb.astype(np.float64), i) for i in range(120)]


def test_npy_queries_with_a_labels_file(setup, capsys):
    tmp, model, data, index_dir = setup
    np.save(tmp / "q.npy", np.array([[[0, 0], [12, 0]], [[199, 0], [0, 0]]], np.uint8))
    np.save(tmp / "ql.npy", np.array([0, 0]))
    out = tmp / "r.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", str(tmp / "q.npy"), "--labels",
                            str(tmp / "ql.npy"), "--k", "1", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["query"] for r in recs] == ["q.npy#0", "q.npy#1"]
    assert [r["neighbours"][0]["id"] for r in recs] == ["train/0", "train/1"]
    assert [r["correct"] for r in recs] == [True, False]
    assert recs[1]["neighbours"][0]["sq_l2"] == pytest.approx(1 / S, rel=1e-5)


def test_huge_float_queries_get_their_neighbours_not_an_empty_list(setup, capsys):
    """adv1 finding: queries of 1e30 (floats not scaled to [0, 1]) gave squared distances
    that overflow float32 in faiss: every query printed "neighbours": [] with exit 0. The
    exact search keys them in float64: each query gets its k neighbours, at their true
    squared distance (~4e60), and the warning that floats above 1 are not pixels / 255."""
    tmp, model, data, index_dir = setup
    q = tmp / "big.npy"
    np.save(q, np.full((2, 4), 1e30, np.float32))
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", str(q), "--k", "2",
                            "--out", str(tmp / "r.jsonl")]) == 0
    assert "float values go up to 1e+30" in capsys.readouterr().err
    from dist_triplet.retrieval.index import Index
    g = Index.load(index_dir).vectors().astype(np.float64)
    want = np.sort(((g - float(np.float32(1e30))) ** 2).sum(axis=1))[:2]
    for r in read_jsonl(tmp / "r.jsonl"):
        np.testing.assert_allclose([n["sq_l2"] for n in r["neighbours"]], want, rtol=1e-12)


# ----------------------------------------------------------------------------- issue 17 / 20

def two_spellings(tmp):
    """The same 2x2 images twice: an IDX directory (class names "0", "1", "2") and a .npz
    whose classes have words for names (as fashion_mnist vs its IDX files)."""
    pixels = np.array([(0, 0, 0, 0), (0, 0, 0, 9), (200, 0, 0, 0), (200, 9, 0, 0),
                       (0, 200, 0, 0), (0, 200, 9, 0)], np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    write_split(tmp / "idx", "t10k", pixels, labels)
    write_split(tmp / "idx", "train", pixels[:1], labels[:1])
    np.savez(tmp / "named.npz", x=pixels.reshape(-1, 2, 2), y=labels,
             classes=np.array(["apple", "boat", "cat"]))
    return pixels, labels


def test_labels_in_two_spellings_are_compared_by_class_id(tmp_path, capsys):
    """Issue 17 (1): queries labelled "0".."2" against an index of the same data labelled
    "apple".."cat" printed precision@1 nan and "correct": false everywhere."""
    pixels, labels = two_spellings(tmp_path)
    model = export_identity(tmp_path / "model")
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'named.npz'}:all",
                           "--out", str(tmp_path / "ix")]) == 0
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", f"{tmp_path / 'idx'}:test",
                            "--k", "2", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    err = capsys.readouterr().err
    assert "compared by class id" in err and "precision@1 1.0000" in err
    # Each query finds itself (distance 0, other id) first: right, and said on stderr.
    assert [r["correct"] for r in recs] == [True] * 6
    assert [r["neighbours"][0]["label"] for r in recs] == ["apple", "apple", "boat", "boat",
                                                         "cat", "cat"]
    assert "6 of 6 queries are gallery items or exact copies" in err
    # A query set whose classes match the gallery neither by name nor by count: an error.
    np.save(tmp_path / "q.npy", pixels.reshape(-1, 2, 2)[:2])
    np.save(tmp_path / "ql.npy", np.array([7, 8]))
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", str(tmp_path / "q.npy"),
                            "--labels", str(tmp_path / "ql.npy"), "--k", "1",
                            "--out", str(tmp_path / "r2.jsonl")]) == 2
    line = error_line(capsys)
    assert "no query class is in the gallery" in line and "'apple'" in line and "'7'" in line
    from dist_triplet import calibrate as calibrate_cli
    # Adversarial trial: the same images under other class ids (0 <-> 2) were compared by
    # id all the same: P@1 0.3333 though every query found itself. The copies disprove it.
    np.savez(tmp_path / "perm.npz", x=pixels.reshape(-1, 2, 2), y=2 - labels)
    for main, argv in ((search_cli.main, ["--query", f"{tmp_path / 'perm.npz'}:all", "--k", "1",
                                          "--out", str(tmp_path / "r3.jsonl")]),
                       (calibrate_cli.main, ["--data", f"{tmp_path / 'perm.npz'}:all"])):
        assert main(["--index", str(tmp_path / "ix")] + argv) == 2
        line = error_line(capsys)
        assert "compared by class id; but most queries that are gallery items have another " \
            "class id there" in line, line
    assert not (tmp_path / "r3.jsonl").exists()
    assert not (tmp_path / "ix" / "threshold.json").exists()


def test_self_search_without_exclude_self_says_so(setup, capsys):
    """Issue 17 (3): a gallery searched with its own data printed precision@1 1.0000 and
    said nothing."""
    tmp, model, data, index_dir = setup
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:train", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "4 of 4 queries are gallery items" in err and "--exclude-self" in err
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:train", "--k", "1",
                            "--exclude-self", "--out", str(tmp / "r2.jsonl")]) == 0
    assert "gallery items" not in capsys.readouterr().err


def test_out_and_grid_follow_the_force_rule_and_make_missing_directories(setup, capsys):
    """Issue 17 (5): search --out overwrote silently and refused missing directories."""
    tmp, model, data, index_dir = setup
    out = tmp / "new" / "dir" / "r.jsonl"
    args = ["--index", index_dir, "--query", f"{data}:test", "--k", "1", "--out", str(out)]
    assert search_cli.main(args) == 0 and out.exists()
    out.write_text("keep me")
    capsys.readouterr()
    assert search_cli.main(args) == 2
    assert "already exists; pass --force" in error_line(capsys) and out.read_text() == "keep me"
    assert search_cli.main(args + ["--force"]) == 0 and out.read_text() != "keep me"
    (tmp / "g.png").write_text("x")
    assert search_cli.main(args + ["--force", "--grid", str(tmp / "g.png")]) == 0
    assert search_cli.main(args + ["--grid", str(tmp / "g.png")]) == 2


def test_out_format_and_the_deprecated_format_alias(setup, capsys):
    """Issue 20: one spelling per meaning; the old --format still works, with one line."""
    tmp, model, data, index_dir = setup
    base = ["--index", index_dir, "--query", f"{data}:test", "--k", "1"]
    assert search_cli.main(base + ["--out-format", "csv", "--out", str(tmp / "a.csv")]) == 0
    capsys.readouterr()
    assert search_cli.main(base + ["--format", "csv", "--out", str(tmp / "b.csv")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err.count("warning: --format is deprecated; use --out-format") == 1
    assert (tmp / "a.csv").read_text() == (tmp / "b.csv").read_text()
    assert index_cli.main(["--model", model, "--data", f"{data}:train", "--format", "idx",
                           "--out", str(tmp / "ix2")]) == 0
    assert "warning: --format is deprecated; use --data-format" in capsys.readouterr().err


def test_grid_draws_queries_from_every_class():
    """Issue 20: --grid showed only the first class's queries (rows are class-major)."""
    from dist_triplet.retrieval.search import grid_queries
    codes = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, -2])
    assert grid_queries(codes, 10, 5).tolist() == [9, 0, 4, 7, 1]   # each class once first
    assert grid_queries(None, 10, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["index", "search", "calibrate", "embed"])
def test_usage_names_the_command_as_invoked(name, monkeypatch, capsys):
    """Issue 20: console scripts printed ``usage: python -m dist_triplet.X``."""
    import importlib
    import subprocess
    import sys
    main = importlib.import_module(f"dist_triplet.{name}").main
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/dist-triplet-{name}"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: dist-triplet-{name} ")
    if name == "search":
        got = subprocess.run([sys.executable, "-m", f"dist_triplet.{name}", "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert got.startswith(f"usage: python -m dist_triplet.{name} ")


def test_limited_run_rows_do_not_pass_for_the_full_datas_ids(setup, capsys):
    """data.limit_train keeps a seeded sample: its row i is not row i of the full split.
    Its ids say so, so --exclude-self against the full data matches nothing (exit 2)
    instead of leaving out other images and keeping the real copies (exit 0)."""
    tmp, model, data, _ = setup
    cfg = tmp / "limited.yaml"
    cfg.write_text(f"data:\n  path: {data}\n  format: idx\n  limit_train: 3\n")
    from dist_triplet.retrieval import Model, read_items
    items = read_items(f"{cfg}:train", Model(model).input)
    assert items.ids == [f"train[limit 3, seed 0]/{i}" for i in range(3)]
    ix = tmp / "limited_ix"
    assert index_cli.main(["--model", model, "--data", f"{cfg}:train", "--out", str(ix)]) == 0
    capsys.readouterr()
    assert search_cli.main(["--index", str(ix), "--query", f"{data}:train", "--exclude-self",
                            "--k", "1", "--out", str(tmp / "x.jsonl")]) == 2
    assert "exclude-self" in error_line(capsys)
    # The same spelling on both sides still leaves each query out.
    assert search_cli.main(["--index", str(ix), "--query", f"{cfg}:train", "--exclude-self",
                            "--k", "1", "--out", str(tmp / "y.jsonl")]) == 0
    assert all(r["neighbours"][0]["id"] != r["query"] for r in read_jsonl(tmp / "y.jsonl"))


def test_precision_at_1_counts_a_query_without_a_neighbour_as_a_miss():
    """Adversarial trial: position -1 (an approximate index found nothing) read the last
    gallery item's label, so such a query counted as right: P@1 1.0000 while the jsonl
    said 99 of 100."""
    from dist_triplet.retrieval.index import Index
    from dist_triplet.retrieval.search import precision_at_1
    ix = Index.build(np.eye(3, dtype=np.float32), labels=[0, 0, 1])
    p1, counted = precision_at_1(ix, np.array([0, 1, 1]), np.array([1, -1, 2]),
                                 np.full(3, -1))
    assert (p1, counted) == (2 / 3, 3)


def test_csv_records_keep_a_query_without_neighbours():
    """Adversarial trial: a query an approximate index returned nothing for had no CSV row
    (8 of 10,000 queries vanished; jsonl kept them)."""
    from dist_triplet.retrieval.search import format_records
    recs = [{"query": "q0", "query_label": None, "no_match": False, "neighbours": []},
            {"query": "q1", "query_label": "a", "no_match": True,
             "neighbours": [{"rank": 1, "id": "g7", "label": "a", "sq_l2": 0.1 + 0.2}]}]
    assert format_records(recs, "csv").splitlines() == [
        "query,query_label,rank,id,label,sq_l2,no_match", "q0,,,,,,0",
        "q1,a,1,g7,a,0.30000000000000004,1"]
