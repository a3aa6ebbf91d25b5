"""Index, search and calibrate (dist_triplet.retrieval: index, search, calibrate, cli) on tiny
generated data.

The model in most tests is an identity network (Dense 4 -> 4, weight I, bias 0, no ReLU)
exported like a trained one, so embeddings are the pixels / 255 and every expected
neighbour and distance can be computed by hand or by a plain loop.
"""
import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="index and search embed with an MXNet export")
faiss = pytest.importorskip("faiss", reason="the index is a faiss index")

from dist_triplet import calibrate as calibrate_cli  # noqa: E402
from dist_triplet import index as index_cli  # noqa: E402
from dist_triplet import search as search_cli  # noqa: E402
from dist_triplet.data import write_idx  # noqa: E402
from dist_triplet.export import export_model  # noqa: E402
from dist_triplet.retrieval.calibrate import choose_threshold, curve  # noqa: E402
from dist_triplet.retrieval.index import Index  # noqa: E402
from dist_triplet.retrieval.metrics import retrieval_metrics  # noqa: E402
from dist_triplet.retrieval.neighbours import build_faiss, recall_at_k  # noqa: E402
from dist_triplet.model import build_embedding_net, initialize  # noqa: E402

S = 255.0 ** 2  # squared distances: pixel units / 255^2 = embedding units


def export_identity(path, width=4, out=None):
    """An exported Dense(width -> out) with weight I (or its first rows), bias 0."""
    out = out or width
    net = build_embedding_net(width, [out], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    net[0].weight.set_data(mx.nd.array(np.eye(out, width)))
    net[0].bias.set_data(mx.nd.zeros(out))
    export_model(net, str(path), mx.cpu(), width)
    return str(path)


def write_split(root, stem, pixels, labels):
    """(N, 4) pixel rows as 2x2 IDX images + labels under root (stem train or t10k)."""
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{stem}-images-idx3-ubyte",
              np.asarray(pixels, np.uint8).reshape(-1, 2, 2))
    write_idx(root / f"{stem}-labels-idx1-ubyte", np.asarray(labels, np.uint8))


# Gallery: class 0 at the origin, class 1 and class 2 far away on other axes.
GALLERY = [(0, 0, 0, 0), (200, 0, 0, 0), (0, 200, 0, 0), (0, 0, 0, 3)]
GALLERY_LABELS = [0, 1, 2, 0]
# Calibration queries, all nearest to the origin item; offset on axis 2 (pixels).
# right (label 0): 10, 20, 30, 45; wrong: 40 (label 1), 50 (label 3: a class the gallery
# lacks), 60 (label 2). Sorted: 10r 20r 30r 40w 45r 50w 60w.
CAL = [(0, 0, 10, 0), (0, 0, 40, 0), (0, 0, 20, 0), (0, 0, 50, 0), (0, 0, 30, 0),
       (0, 0, 60, 0), (0, 0, 45, 0)]
CAL_LABELS = [0, 1, 0, 3, 0, 2, 0]


@pytest.fixture
def setup(tmp_path):
    model = export_identity(tmp_path / "model")
    data = tmp_path / "data"
    write_split(data, "train", GALLERY, GALLERY_LABELS)
    write_split(data, "t10k", CAL, CAL_LABELS)
    index_dir = tmp_path / "index"
    assert index_cli.main(["--model", model, "--data", f"{data}:train",
                           "--out", str(index_dir)]) == 0
    return tmp_path, model, data, str(index_dir)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


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


def plain_nearest_other(x, i):
    """Reference: the nearest other row by exact squared distance, ties by lower index."""
    best, best_j = None, None
    for j in range(len(x)):
        if j == i:
            continue
        d = sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j]))
        if best is None or d < best:
            best, best_j = d, j
    return best_j


def flat_index(tmp_path, emb, labels, name="ix"):
    Index.build(emb, labels, [f"r{i}" for i in range(len(emb))],
                [str(c) for c in range(int(labels.max()) + 1)]).save(str(tmp_path / name))
    return Index.load(str(tmp_path / name))


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


def test_threshold_choice_by_hand():
    # Sorted: 10r 20r 30r 40w 45r 50w 60w; precision at each: 1 1 1 .75 .8 .667 .571
    d = np.array([10, 40, 20, 50, 30, 60, 45], float)
    right = np.array([1, 0, 1, 0, 1, 0, 1], bool)
    t, p, r, f1 = curve(d, right)
    np.testing.assert_allclose(p, [1, 1, 1, .75, .8, 4 / 6, 4 / 7])
    np.testing.assert_allclose(r, [.25, .5, .75, .75, 1, 1, 1])
    assert choose_threshold(d, right, 0.9) == 30
    assert choose_threshold(d, right, 0.8) == 45
    assert choose_threshold(d, right, best_f1=True) == 45      # F1 .889 beats .857 at 30
    with pytest.raises(ValueError, match="highest is 1.0000"):
        choose_threshold(d, np.zeros(7, bool) | (d == 10), 1.01)


def test_calibrate_finds_the_known_threshold_and_search_rejects_beyond_it(setup, capsys):
    tmp, model, data, index_dir = setup
    hold = tmp / "hold"
    # Held-out: right at 5, 25, 35; wrong at 15 -> at t = 30^2: accepted {5r, 15w, 25r}.
    write_split(hold, "t10k", [(0, 0, 5, 0), (0, 0, 15, 0), (0, 0, 25, 0), (0, 0, 35, 0)],
                [0, 2, 0, 0])
    write_split(hold, "train", [(0, 0, 0, 0)], [0])  # load_dataset wants both splits' files
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                               "--target-precision", "0.9", "--holdout", f"{hold}:test"]) == 0
    doc = json.load(open(os.path.join(index_dir, "threshold.json")))
    assert doc["threshold"] == pytest.approx(900 / S, rel=1e-6)
    assert doc["calibration"]["precision"] == 1.0 and doc["calibration"]["recall"] == 0.75
    assert doc["holdout"]["precision"] == pytest.approx(2 / 3)
    assert doc["holdout"]["recall"] == pytest.approx(2 / 3)
    assert doc["index_id"] == json.load(open(os.path.join(index_dir, "meta.json")))["index_id"]
    out = tmp / "r.jsonl"
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(out)]) == 0
    recs = read_jsonl(out)
    # Offsets 10 20 30 are within 30^2; 40 45 50 60 are not.
    assert [r["no_match"] for r in recs] == [False, True, False, True, False, True, True]
    assert [r["prediction"] for r in recs][:3] == ["0", None, "0"]

    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test", "--best-f1",
                               "--holdout", f"{hold}:test", "--force"]) == 0
    assert json.load(open(os.path.join(index_dir, "threshold.json")))["threshold"] == \
        pytest.approx(2025 / S, rel=1e-6)


def test_calibrate_split_is_deterministic(setup):
    tmp, model, data, index_dir = setup
    docs = []
    for _ in range(2):
        assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                                   "--target-precision", "0.5", "--seed", "3", "--force"]) == 0
        docs.append(json.load(open(os.path.join(index_dir, "threshold.json"))))
    assert docs[0] == docs[1]
    # The same split by hand: permutation(7) with seed 3, 4 (round(3.5)) held out.
    perm = np.random.default_rng(3).permutation(7)
    cal = sorted(perm[4:])
    d = np.array([100, 1600, 400, 2500, 900, 3600, 2025], float)
    right = np.array([1, 0, 1, 0, 1, 0, 1], bool)
    assert docs[0]["threshold"] == pytest.approx(
        choose_threshold(d[cal], right[cal], 0.5) / S, rel=1e-6)
    assert docs[0]["holdout"]["queries"] == 4 and docs[0]["calibration"]["queries"] == 3


# ----------------------------------------------------------------------------- bad input

def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


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


def test_k_larger_than_the_gallery_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "5",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert "--k 5" in line and "(4 items" in line and index_dir in line
    assert not (tmp / "r.jsonl").exists()


def test_threshold_of_another_index_is_refused(setup, capsys):
    tmp, model, data, index_dir = setup
    other = tmp / "index2"
    write_split(tmp / "data2", "train", GALLERY[:3], GALLERY_LABELS[:3])
    write_split(tmp / "data2", "t10k", CAL, CAL_LABELS)
    assert index_cli.main(["--model", model, "--data", f"{tmp / 'data2'}:train",
                           "--out", str(other)]) == 0
    assert calibrate_cli.main(["--index", str(other), "--data", f"{data}:test",
                               "--target-precision", "0.5"]) == 0
    capsys.readouterr()
    thr = os.path.join(other, "threshold.json")
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2",
                            "--threshold", thr,
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert thr in line and "calibrated for index" in line
    # A copied threshold file is refused the same way.
    import shutil
    shutil.copy(thr, os.path.join(index_dir, "threshold.json"))
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "2",
                            "--out", str(tmp / "r.jsonl")]) == 2
    assert "calibrated for index" in error_line(capsys)
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


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-1.0"])
def test_non_finite_or_negative_threshold_is_refused(setup, capsys, value):
    """adv1 finding: "threshold": NaN in threshold.json was accepted (every query then
    'no match')."""
    tmp, model, data, index_dir = setup
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                               "--target-precision", "0.5"]) == 0
    thr = os.path.join(index_dir, "threshold.json")
    with open(thr) as fh:
        text = fh.read()
    doc = json.loads(text)
    with open(thr, "w") as fh:
        fh.write(text.replace(json.dumps(doc["threshold"]), value, 1))
    assert json.load(open(thr))["threshold"] != doc["threshold"]
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", f"{data}:test", "--k", "1",
                            "--out", str(tmp / "r.jsonl")]) == 2
    line = error_line(capsys)
    assert thr in line and "threshold" in line
    assert not (tmp / "r.jsonl").exists()


def test_huge_float_queries_are_refused_not_an_empty_neighbour_list(setup, capsys):
    """adv1 finding: queries of 1e30 (floats not scaled to [0, 1]) gave squared distances
    that overflow float32 in faiss: every query printed "neighbours": [] with exit 0."""
    tmp, model, data, index_dir = setup
    q = tmp / "big.npy"
    np.save(q, np.full((2, 4), 1e30, np.float32))
    capsys.readouterr()
    assert search_cli.main(["--index", index_dir, "--query", str(q), "--k", "2",
                            "--out", str(tmp / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # embed's "values > 1" warning, then
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    line = err[-1]
    assert str(q) in line and "2 of 2" in line and "overflow float32" in line
    assert not (tmp / "r.jsonl").exists()
    # 1e10 is large but its squared distances (~4e20) fit: searched, all neighbours there.
    np.save(q, np.full((2, 4), 1e10, np.float32))
    assert search_cli.main(["--index", index_dir, "--query", str(q), "--k", "2",
                            "--out", str(tmp / "r.jsonl")]) == 0
    assert [len(r["neighbours"]) for r in read_jsonl(tmp / "r.jsonl")] == [2, 2]


def test_embed_refuses_non_finite_embeddings_naming_the_input(tmp_path, capsys):
    """Finite inputs whose embeddings overflow (weights of ones: 4 x 3e38 = inf) are an
    error naming the input, not a .npy of inf (embed only warned about values > 1)."""
    from dist_triplet import embed as embed_cli
    net = build_embedding_net(4, [4], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    net[0].weight.set_data(mx.nd.ones((4, 4)))
    net[0].bias.set_data(mx.nd.zeros(4))
    export_model(net, str(tmp_path / "model"), mx.cpu(), 4)
    inp, out = tmp_path / "x.npy", tmp_path / "e.npy"
    np.save(inp, np.full((3, 4), 3e38, np.float32))
    capsys.readouterr()
    assert embed_cli.main(["--model", str(tmp_path / "model"), "--input", str(inp),
                           "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and str(inp) in err[0] and "12 non-finite" in err[0], err
    assert not out.exists()


def test_unlabelled_holdout_file_names_holdout_labels(setup, capsys):
    """adv1 cosmetic: a --holdout file without labels said "pass --labels"."""
    tmp, model, data, index_dir = setup
    hold = tmp / "hold.npy"
    np.save(hold, np.zeros((3, 4), np.float32))
    capsys.readouterr()
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test",
                               "--holdout", str(hold)]) == 2
    line = error_line(capsys)
    assert str(hold) in line and "--holdout-labels" in line


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
