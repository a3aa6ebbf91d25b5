"""index / search / embed on the data the trainer reads (issue 11 x issue 10).

Two tiny runs trained in-process on generated data (a 16 x 16 RGB image folder of 3
classes, and a features .npz), then: the gallery from ``RUN:train``, queries from
``RUN:test`` with the image files' paths as ids, the thumbnails equal to the PNGs,
neighbours equal to a plain loop over the embeddings, and the leave-one-out Precision@1 of
``RUN:test`` equal to the run's metrics.json. Plus explicit data-path specs (folder, CSV,
``:all``, ``--set``) and the shape checks against the model's meta.json.
"""
import json
import os

import numpy as np
import pytest
import yaml

mx = pytest.importorskip("mxnet", reason="training and embedding run on MXNet")
pytest.importorskip("faiss", reason="the index is a faiss index")
pytest.importorskip("PIL", reason="image folders are read with Pillow")

from _data_util import make_images, write_csv, write_folder  # noqa: E402
from _search_util import error_line, export_identity  # noqa: E402

from dist_triplet import embed as embed_cli  # noqa: E402
from dist_triplet import index as index_cli  # noqa: E402
from dist_triplet import search as search_cli  # noqa: E402
from dist_triplet.data.images import read_image  # noqa: E402
from dist_triplet.retrieval.index import Index  # noqa: E402

CLASSES, PER_CLASS, SIDE = 3, 10, 16
NAMES = ["apple", "boat", "cat"]


def _train(tmp, name, *data_keys):
    from dist_triplet.config import load_config
    from dist_triplet.loop import train
    run = tmp / name
    cfg = load_config(None, [
        *data_keys, f"output.dir={run}", "distributed.backend=local",
        "distributed.device=cpu", "train.progress=false", "train.epochs=1", "sampler.kind=pk",
        f"sampler.p={CLASSES}", "sampler.k=4", "sampler.steps_per_epoch=3",
        "model.hidden=[32,16]", "eval.projector=false", "eval.report=false",
        "checkpoint.keep=0"])
    train(cfg)
    return run


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rgb")
    images, labels = make_images(PER_CLASS, CLASSES, SIDE, SIDE, 3, seed=1)
    paths = write_folder(tmp / "shots", images, labels, NAMES)
    run = _train(tmp, "run", f"data.path={tmp / 'shots'}")
    return tmp, run, paths


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    x = (rng.normal(size=(CLASSES, 8))[labels] + 0.7 * rng.normal(size=(len(labels), 8)))
    np.savez(tmp / "feats.npz", x=x.astype(np.float32), y=labels * 10 + 5)  # labels 5, 15, 25
    run = _train(tmp, "run", f"data.path={tmp / 'feats.npz'}")
    return tmp, run, x.astype(np.float32)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def nearest_by_loop(q, g, exclude=None):
    """Plain loop: the gallery row nearest to each query (float64, ties: lower row)."""
    out = []
    for i, v in enumerate(q.astype(np.float64)):
        best, best_j = None, None
        for j, w in enumerate(g.astype(np.float64)):
            if exclude is not None and exclude[i] == j:
                continue
            d = float(((v - w) ** 2).sum())
            if best is None or d < best:
                best, best_j = d, j
        out.append(best_j)
    return out


def colourful_pixels(png):
    """Pixels that are neither grey (text, white, black) nor a frame colour."""
    import matplotlib.image as mpimg
    img = mpimg.imread(png)[:, :, :3]
    spread = img.max(axis=2) - img.min(axis=2)
    frames = [np.array(c) / 255 for c in ((0x1a, 0x98, 0x50), (0xd7, 0x30, 0x27))]
    near_frame = np.zeros(img.shape[:2], bool)
    for c in frames:
        near_frame |= np.all(np.abs(img - c) < 0.08, axis=2)
    return int(np.count_nonzero((spread > 0.15) & ~near_frame))


def test_folder_run_gallery_and_queries_by_path(folder_run, tmp_path, capsys):
    tmp, run, paths = folder_run
    ix_dir = tmp_path / "ix"
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{run}:train",
                           "--out", str(ix_dir)]) == 0
    ix = Index.load(str(ix_dir))
    meta = json.load(open(ix_dir / "meta.json"))
    assert meta["image_shape"] == [SIDE, SIDE, 3] and meta["input"] == "images"
    rel = sorted(os.path.relpath(p, tmp / "shots") for p in paths)
    # ids: the files relative to the folder; each id's folder is its class; the
    # thumbnail is that PNG's pixels.
    assert len(ix) == 24 and set(ix.ids) < set(rel)
    for i, item in enumerate(ix.ids):
        assert item.split("/")[0] == ix.class_names[ix.labels[i]]
        assert np.array_equal(ix.images[i], read_image(str(tmp / "shots" / item), "RGB", None))
    out = tmp_path / "r.jsonl"
    png = tmp_path / "grid.png"
    assert search_cli.main(["--index", str(ix_dir), "--query", f"{run}:test", "--k", "3",
                            "--out", str(out), "--grid", str(png)]) == 0
    recs = read_jsonl(out)
    queries = [r["query"] for r in recs]
    assert len(queries) == 6 and sorted(set(queries) | set(ix.ids)) == rel
    assert all(r["query"].split("/")[0] == r["query_label"] for r in recs)
    # Neighbours: a plain loop over the index's vectors and embed's query embeddings.
    emb = tmp_path / "q.npy"
    assert embed_cli.main(["--model", str(run), "--input", f"{run}:test", "--out",
                           str(emb), "--batch-size", "2048"]) == 0
    want = nearest_by_loop(np.load(emb), ix.vectors())
    assert [r["neighbours"][0]["id"] for r in recs] == [ix.ids[j] for j in want]
    assert colourful_pixels(png) > 6 * 4 * SIDE * SIDE // 2   # RGB thumbnails drawn


def test_folder_leave_one_out_reproduces_the_runs_precision_at_1(folder_run, tmp_path, capsys):
    tmp, run, _ = folder_run
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{run}:test",
                           "--out", str(tmp_path / "ix")]) == 0
    out = tmp_path / "self.jsonl"
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--data", f"{run}:test",
                            "--k", "1", "--exclude-self", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert all(r["neighbours"][0]["id"] != r["query"] for r in recs)
    p1 = float(np.mean([r["correct"] for r in recs]))
    final = json.load(open(run / "metrics.json"))["final"]["precision_at_1"]
    assert p1 == final
    assert f"precision@1 {final:.4f}" in capsys.readouterr().err


def test_explicit_folder_and_csv_specs(folder_run, tmp_path, capsys):
    tmp, run, paths = folder_run
    model = str(run / "model")
    # The folder with the trainer's defaults splits as the run did.
    assert index_cli.main(["--model", model, "--data", f"{tmp / 'shots'}:test",
                           "--out", str(tmp_path / "a")]) == 0
    assert index_cli.main(["--model", model, "--data", f"{run}:test",
                           "--out", str(tmp_path / "b")]) == 0
    assert Index.load(str(tmp_path / "a")).ids == Index.load(str(tmp_path / "b")).ids
    # :all = every file, in class-folder order; --set split=classes changes nothing there.
    assert index_cli.main(["--model", model, "--data", f"{tmp / 'shots'}:all", "--data-format",
                           "folder", "--mode", "RGB", "--set", "split=classes",
                           "--out", str(tmp_path / "c")]) == 0
    ix = Index.load(str(tmp_path / "c"))
    assert ix.ids == [os.path.relpath(p, tmp / "shots") for p in paths]
    # A CSV of the same files, paths relative to the CSV: those paths are the ids. Its
    # ids differ from the folder's: each query's nearest item is its own file, at
    # distance 0, and stderr says so (issue 17 (3)); --exclude-self, which would leave
    # nothing out, is an error naming both id forms (issue 17 (1)).
    rows = [(os.path.relpath(p, tmp), lab) for p, lab in
            zip(paths, np.repeat(np.arange(CLASSES), PER_CLASS))]
    write_csv(tmp / "list.csv", rows)
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    assert search_cli.main(["--index", str(tmp_path / "c"), "--query",
                            f"{tmp / 'list.csv'}:all", "--k", "1", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["query"] for r in recs] == [p for p, _ in rows]
    assert [r["neighbours"][0]["id"] for r in recs] == [p[len("shots/"):] for p, _ in rows]
    assert all(r["neighbours"][0]["sq_l2"] == 0.0 for r in recs)
    assert "30 of 30 queries are gallery items or exact copies" in capsys.readouterr().err
    assert search_cli.main(["--index", str(tmp_path / "c"), "--query",
                            f"{tmp / 'list.csv'}:all", "--k", "1", "--exclude-self",
                            "--out", str(tmp_path / "r2.jsonl")]) == 2
    line = error_line(capsys)
    assert "--exclude-self" in line and repr(rows[0][0]) in line
    assert not (tmp_path / "r2.jsonl").exists()


def test_namesakes_in_another_folder_are_not_left_out(folder_run, tmp_path, capsys):
    """Adversarial trial: two folders of one layout give their images the same ids, so
    searching one against an index of the other said every query 'finds itself' (not so:
    nearest distances > 0), and --exclude-self left out a different image of each query's
    name, changing Precision@1 with exit 0. A query is its gallery item only when its
    embedding is that item's too."""
    tmp, run, paths = folder_run
    model = str(run / "model")
    images, labels = make_images(PER_CLASS, CLASSES, SIDE, SIDE, 3, seed=7)   # other images
    write_folder(tmp_path / "other", images, labels, NAMES)
    assert index_cli.main(["--model", model, "--data", f"{tmp / 'shots'}:all",
                           "--out", str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    args = ["--index", str(tmp_path / "ix"), "--query", f"{tmp_path / 'other'}:all", "--k", "2"]
    assert search_cli.main(args + ["--out", str(tmp_path / "r.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "30 of 30 queries have the id of a gallery item" in err, err
    assert "finds itself" not in err
    recs = read_jsonl(tmp_path / "r.jsonl")
    assert min(r["neighbours"][0]["sq_l2"] for r in recs) > 0
    # --exclude-self would leave out nothing that is the query: an error, nothing written.
    assert search_cli.main(args + ["--exclude-self", "--out", str(tmp_path / "r2.jsonl")]) == 2
    line = error_line(capsys)
    assert "--exclude-self: no query of" in line and "the 30 ids they share name other" in line
    assert not (tmp_path / "r2.jsonl").exists()


def test_features_run(features_run, tmp_path, capsys):
    tmp, run, x = features_run
    model = str(run / "model")
    assert index_cli.main(["--model", model, "--data", f"{run}:train",
                           "--out", str(tmp_path / "ix")]) == 0
    meta = json.load(open(tmp_path / "ix" / "meta.json"))
    assert meta["input"] == "features" and meta["image_shape"] is None
    assert "images.npy" not in os.listdir(tmp_path / "ix")
    ix = Index.load(str(tmp_path / "ix"))
    assert ix.class_names == ("5", "15", "25") and ix.ids[0].startswith("train/")
    out, png = tmp_path / "r.jsonl", tmp_path / "grid.png"
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", f"{run}:test",
                            "--k", "2", "--out", str(out), "--grid", str(png)]) == 0
    assert [r["query"] for r in read_jsonl(out)] == [f"test/{i}" for i in range(6)]
    assert png.exists() and colourful_pixels(png) == 0      # no thumbnails for features
    # Leave-one-out over the test features: the run's Precision@1, exactly.
    assert index_cli.main(["--model", model, "--data", f"{run}:test",
                           "--out", str(tmp_path / "t")]) == 0
    assert search_cli.main(["--index", str(tmp_path / "t"), "--query", f"{run}:test",
                            "--k", "1", "--exclude-self", "--out", str(out), "--force"]) == 0
    recs = read_jsonl(out)
    final = json.load(open(run / "metrics.json"))["final"]["precision_at_1"]
    assert float(np.mean([r["correct"] for r in recs])) == final
    # A .npy of (N, D) features embeds like the run's rows.
    np.save(tmp_path / "f.npy", x[:5])
    assert embed_cli.main(["--model", model, "--input", str(tmp_path / "f.npy"), "--out",
                           str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (5, ix.dim)


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_query_shapes_are_checked_against_the_models_meta(folder_run, features_run, tmp_path,
                                                          capsys):
    tmp, run, _ = folder_run
    model = str(run / "model")
    meta = os.path.join(model, "meta.json")
    # Same width (768 values), other image shape: 16 x 16 x 3 vs 32 x 8 x 3.
    np.save(tmp_path / "q.npy", np.zeros((2, 32, 8, 3), np.uint8))
    assert index_cli.main(["--model", model, "--data", str(tmp_path / "q.npy"),
                           "--out", str(tmp_path / "ix")]) == 2
    line = error_line(capsys)
    assert "q.npy" in line and meta in line and "16x16x3" in line and "32x8x3" in line
    # The right shape, as (N, H, W, C) and as flat (N, F) rows, is accepted.
    np.save(tmp_path / "ok.npy", np.zeros((2, SIDE, SIDE, 3), np.uint8))
    np.save(tmp_path / "flat.npy", np.zeros((2, SIDE * SIDE * 3), np.uint8))
    for name in ("ok.npy", "flat.npy"):
        assert embed_cli.main(["--model", model, "--input", str(tmp_path / name),
                               "--out", str(tmp_path / f"e-{name}")]) == 0
    # The run's own folder resized: the model's images are 16 x 16.
    assert embed_cli.main(["--model", model, "--input", f"{tmp / 'shots'}:all",
                           "--image-size", "8", "--out", str(tmp_path / "e2.npy")]) == 2
    line = error_line(capsys)
    assert "8x8x3" in line and "16x16x3" in line and "shots" in line
    assert not (tmp_path / "e2.npy").exists()
    # Images for a features model: same width (8 = 2 x 4 x 1) but not features.
    ftmp, frun, _ = features_run
    np.save(tmp_path / "img8.npy", np.zeros((3, 2, 4), np.uint8))
    assert embed_cli.main(["--model", str(frun / "model"), "--input",
                           str(tmp_path / "img8.npy"), "--out",
                           str(tmp_path / "e3.npy")]) == 2
    line = error_line(capsys)
    assert "img8.npy" in line and "8-D features" in line and "2x4x1 images" in line
    # A bad split name is named.
    assert index_cli.main(["--model", model, "--data", f"{run}:validation",
                           "--out", str(tmp_path / "ix")]) == 2
    assert "unknown split 'validation'" in error_line(capsys)
    assert not (tmp_path / "ix").exists()


def test_by_class_run_grey_images(tmp_path, capsys):
    """data.split=classes, data.mode=L: RUN:train and RUN:test hold disjoint classes (the
    last two of five folders are test classes), and the leave-one-out P@1 of RUN:test is
    the run's."""
    images, labels = make_images(6, 5, 12, 12, 3, seed=4)
    names = [f"c{c}" for c in range(5)]
    write_folder(tmp_path / "shots", images, labels, names)
    run = _train(tmp_path, "run", f"data.path={tmp_path / 'shots'}", "data.split=classes",
                 "data.test_fraction=0.4", "data.mode=L")
    model = str(run / "model")
    for split in ("train", "test"):
        assert index_cli.main(["--model", model, "--data", f"{run}:{split}",
                               "--out", str(tmp_path / split)]) == 0
    train, test = Index.load(str(tmp_path / "train")), Index.load(str(tmp_path / "test"))
    assert {i.split("/")[0] for i in train.ids} == {"c0", "c1", "c2"}
    assert {i.split("/")[0] for i in test.ids} == {"c3", "c4"} and len(test) == 12
    assert test.images.shape == (12, 12, 12)                 # grey thumbnails (H, W)
    out = tmp_path / "r.jsonl"
    assert search_cli.main(["--index", str(tmp_path / "test"), "--query", f"{run}:test",
                            "--k", "1", "--exclude-self", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    final = json.load(open(run / "metrics.json"))["final"]["precision_at_1"]
    assert float(np.mean([r["correct"] for r in recs])) == final
    # Issue 17 (6): the folder itself, without --mode L: the model's meta.json says 1 channel.
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'shots'}:all",
                           "--out", str(tmp_path / "folder")]) == 0
    assert Index.load(str(tmp_path / "folder")).images.shape == (30, 12, 12)


def test_data_options_need_a_data_path_and_a_moved_run_names_its_config(folder_run, tmp_path,
                                                                        capsys):
    tmp, run, _ = folder_run
    model = str(run / "model")
    assert index_cli.main(["--model", model, "--data", "fashion_mnist:test", "--mode", "L",
                           "--out", str(tmp_path / "ix")]) == 2
    assert "describe a data path" in error_line(capsys)
    # A run whose data moved: the error names the config and the path.
    cfg = (run / "config.yaml").read_text()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.yaml").write_text(cfg.replace(str(tmp / "shots"), str(tmp / "gone")))
    assert index_cli.main(["--model", model, "--data", f"{moved}:test",
                           "--out", str(tmp_path / "ix")]) == 2
    line = error_line(capsys)
    assert str(moved / "config.yaml") in line and "gone" in line
    # --set path=... reads other files with the run's settings.
    assert index_cli.main(["--model", model, "--data", f"{moved}:all",
                           "--set", f"path={tmp / 'shots'}", "--out", str(tmp_path / "ix")]) == 0
    assert len(Index.load(str(tmp_path / "ix"))) == CLASSES * PER_CLASS


def test_set_and_its_own_option_for_one_key_is_an_error(folder_run, tmp_path, capsys):
    # --set image_size=8 used to win silently over --image-size 12 (it came later).
    tmp, run, _ = folder_run
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{tmp / 'shots'}:all",
                           "--image-size", "12", "--set", "image_size=8",
                           "--out", str(tmp_path / "ix")]) == 2
    line = error_line(capsys)
    assert "--image-size 12" in line and "data.image_size" in line and "image_size=8" in line
    assert not (tmp_path / "ix").exists()
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{tmp / 'shots'}:all",
                           "--data-format", "folder", "--set", "format=folder",
                           "--out", str(tmp_path / "ix")]) == 2
    assert "and --data-format folder both set data.format" in error_line(capsys)
    # A key given twice by --set: the last one used to win silently.
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{tmp / 'shots'}:all",
                           "--set", "split=classes", "--set", "data.split=random",
                           "--out", str(tmp_path / "ix")]) == 2
    assert ("'data.split=random' and --set split=classes both set data.split"
            in error_line(capsys))
    assert not (tmp_path / "ix").exists()


def test_runs_relative_data_path_is_read_from_any_directory(tmp_path, monkeypatch, capsys):
    # Adversarial trial: a run trained with data.path=feats.npz (relative) read, as
    # RUN:test, whatever feats.npz the current directory held, with exit 0.
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    mine, other = (rng.normal(size=(len(labels), 8)).astype(np.float32) for _ in range(2))
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "feats.npz", x=mine, y=labels)
    np.savez(tmp_path / "other" / "feats.npz", x=other, y=labels)
    monkeypatch.chdir(tmp_path)
    run = _train(tmp_path, "run", "data.path=feats.npz")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "feats.npz")
    assert saved["output"]["dir"] == str(run)           # --config RUN/config.yaml resumes it
    monkeypatch.chdir(tmp_path / "other")
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{run}:all",
                           "--out", str(tmp_path / "ix")]) == 0
    from dist_triplet.retrieval.model import Model
    want = Model(str(run / "model")).embed(mine)
    np.testing.assert_allclose(Index.load(str(tmp_path / "ix")).vectors(), want, rtol=1e-6)


def test_inputs_that_do_not_fit_together_are_refused(folder_run, features_run, tmp_path,
                                                     capsys):
    """Adversarial trial: each of these ran with exit 0 and a wrong or misleading answer."""
    tmp, run, _ = folder_run
    model, out = str(run / "model"), str(tmp_path / "o")
    # --labels on a run's data replaced its labels but kept its class names.
    np.save(tmp_path / "lab.npy", np.arange(CLASSES * PER_CLASS) % 2)
    assert index_cli.main(["--model", model, "--data", f"{run}:all", "--labels",
                           str(tmp_path / "lab.npy"), "--out", out]) == 2
    assert "carries its own labels" in error_line(capsys) and not os.path.exists(out)
    # --set path= beside a data path: the path read was the --set one, the one named the spec.
    assert index_cli.main(["--model", model, "--data", f"{tmp / 'shots'}:all", "--set",
                           f"path={tmp_path}", "--out", out]) == 2
    assert "--set path=" in error_line(capsys) and not os.path.exists(out)
    # A features model and uint8 rows: they were divided by 255 as if pixels.
    _, frun, x = features_run
    np.save(tmp_path / "u8.npy", np.clip(np.rint(x), 0, 255).astype(np.uint8))
    assert embed_cli.main(["--model", str(frun / "model"), "--input",
                           str(tmp_path / "u8.npy"), "--out", out]) == 2
    line = error_line(capsys)
    assert "u8.npy" in line and "uint8" in line and "float features" in line
    assert not os.path.exists(out)
    # Float features above 1 are features: no warning about pixels / 255.
    np.save(tmp_path / "f.npy", x * 10)
    assert embed_cli.main(["--model", str(frun / "model"), "--input",
                           str(tmp_path / "f.npy"), "--out", out]) == 0
    assert "255" not in capsys.readouterr().err
    # embed --out into the model's own directory (with --force) replaced its files.
    params = next(f for f in os.listdir(run / "model") if f.endswith(".params"))
    before = (run / "model" / params).read_bytes()
    assert embed_cli.main(["--model", model, "--input", f"{run}:test", "--force",
                           "--out", str(run / "model" / params)]) == 2
    assert "which this command reads" in error_line(capsys)
    # ... also through a symlink to the model, and search / calibrate into the model or index.
    os.symlink(run / "model", tmp_path / "mlink")
    assert embed_cli.main(["--model", str(tmp_path / "mlink"), "--input", f"{run}:test",
                           "--force", "--out", str(run / "model" / params)]) == 2
    assert "which this command reads" in error_line(capsys)
    assert index_cli.main(["--model", model, "--data", f"{run}:all", "--out",
                           str(tmp_path / "ix1")]) == 0
    capsys.readouterr()
    ix1 = tmp_path / "ix1"
    for argv in (["--out", str(run / "model" / params)], ["--out", str(ix1 / "labels.npy")],
                 ["--grid", str(ix1 / "grid.png")]):
        assert search_cli.main(["--index", str(ix1), "--query", f"{run}:test", "--force"]
                               + argv) == 2
        assert "which this command reads" in error_line(capsys)
    from dist_triplet import calibrate as calibrate_cli
    assert calibrate_cli.main(["--index", str(ix1), "--data", f"{run}:test", "--force",
                               "--out", str(ix1 / "meta.json")]) == 2
    assert "which this command reads" in error_line(capsys)
    # threshold.json is the index's own output, not the model's (second trial: it was let in).
    assert calibrate_cli.main(["--index", str(ix1), "--data", f"{run}:test", "--force",
                               "--out", str(run / "model" / "threshold.json")]) == 2
    assert "which this command reads" in error_line(capsys)
    assert not (run / "model" / "threshold.json").exists()
    assert (run / "model" / params).read_bytes() == before
    assert Index.load(str(ix1)) is not None
    # A 5-D array is not an image batch.
    np.save(tmp_path / "q5.npy", np.zeros((2, SIDE, SIDE, 3, 1), np.uint8))
    assert embed_cli.main(["--model", model, "--input", str(tmp_path / "q5.npy"), "--out",
                           str(tmp_path / "e5.npy")]) == 2
    assert "(2, 16, 16, 3, 1)" in error_line(capsys)
    # search --out and --grid on one file: the picture was overwritten by the records.
    assert index_cli.main(["--model", model, "--data", f"{run}:all", "--out",
                           str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    same = str(tmp_path / "r.png")
    assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", f"{run}:test",
                            "--out", same, "--grid", same]) == 2
    assert "--out and --grid" in error_line(capsys) and not os.path.exists(same)
    # A grid named .jpg used to fail in matplotlib after the whole search; .pdf was written
    # as a PDF: refused before any work, nothing written.
    for name in ("g.jpgx", "g.pdf"):
        assert search_cli.main(["--index", str(tmp_path / "ix"), "--query", f"{run}:test",
                                "--grid", str(tmp_path / name)]) == 2
        assert f"{name}: the grid is a PNG" in error_line(capsys)
        assert not os.path.exists(tmp_path / name)


def test_no_output_replaces_an_input_even_with_force(features_run, tmp_path, capsys):
    """Adversarial trial: with --force, an output naming the very file the command read
    (the queries, their labels, the calibration data) replaced it with the results."""
    from dist_triplet import calibrate as calibrate_cli
    _, run, x = features_run
    model, ix = str(run / "model"), str(tmp_path / "ix")
    assert index_cli.main(["--model", model, "--data", f"{run}:all", "--out", ix]) == 0
    q, lab = tmp_path / "q.npy", tmp_path / "lab.npy"
    np.save(q, x)
    np.save(lab, np.repeat(np.arange(CLASSES), PER_CLASS) * 10 + 5)
    os.symlink(lab, tmp_path / "lablink.npy")
    before = q.read_bytes(), lab.read_bytes()
    for main, argv in (
            (embed_cli.main, ["--model", model, "--input", str(q), "--out", str(q)]),
            (search_cli.main, ["--index", ix, "--query", str(q), "--out", str(q)]),
            (search_cli.main, ["--index", ix, "--query", str(q), "--labels", str(lab),
                               "--out", str(tmp_path / "lablink.npy")]),
            (calibrate_cli.main, ["--index", ix, "--data", str(q), "--labels", str(lab),
                                  "--out", str(lab)])):
        capsys.readouterr()
        assert main(argv + ["--force"]) == 2
        line = error_line(capsys)
        assert "which this command reads" in line and str(tmp_path) in line, argv
    assert (q.read_bytes(), lab.read_bytes()) == before
    # Second trial: what a run spec reads (the run's config.yaml, its data.path) and the
    # images of a folder spec were replaced too; an index went inside the image folder.
    run_data = run.parent / "feats.npz"
    kept = run_data.read_bytes(), (run / "config.yaml").read_bytes()
    for main, argv in (
            (embed_cli.main, ["--model", model, "--input", f"{run}:test", "--out", str(run_data)]),
            (search_cli.main, ["--index", ix, "--query", f"{run}:test",
                               "--out", str(run / "config.yaml")])):
        capsys.readouterr()
        assert main(argv + ["--force"]) == 2
        assert "which this command reads" in error_line(capsys), argv
    assert (run_data.read_bytes(), (run / "config.yaml").read_bytes()) == kept
    # Outputs beside the inputs are fine: the same search writes results.jsonl.
    assert search_cli.main(["--index", ix, "--query", str(q), "--labels", str(lab),
                            "--out", str(tmp_path / "results.jsonl")]) == 0


def test_report_refuses_an_index_or_metrics_it_cannot_use(folder_run, features_run, tmp_path,
                                                         capsys):
    """Adversarial trial: report --index with a typo drew no threshold, exit 0; a
    calibrated index of another model had its threshold drawn on this run's distances; a
    metrics.json that is not an object was a traceback."""
    import shutil
    from dist_triplet import calibrate as calibrate_cli
    from dist_triplet import report as report_mod
    _, frun, _ = features_run
    _, grun, _ = folder_run
    run = tmp_path / "run"
    shutil.copytree(frun, run)
    assert report_mod.main([str(run), "--index", str(tmp_path / "typo")]) == 2
    assert "typo" in error_line(capsys)
    other = str(tmp_path / "other")
    assert index_cli.main(["--model", str(grun / "model"), "--data", f"{grun}:all",
                           "--out", other]) == 0
    assert calibrate_cli.main(["--index", other, "--data", f"{grun}:all", "--best-f1"]) == 0
    capsys.readouterr()
    assert report_mod.main([str(run), "--index", other]) == 2
    assert "is not the one" in error_line(capsys)
    mine = str(tmp_path / "mine")
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{run}:all",
                           "--out", mine]) == 0
    capsys.readouterr()
    assert report_mod.main([str(run), "--index", mine]) == 2
    assert "holds no threshold.json: calibrate it first" in error_line(capsys)
    assert calibrate_cli.main(["--index", mine, "--data", f"{run}:test", "--best-f1"]) == 0
    assert report_mod.main([str(run), "--index", mine]) == 0
    (run / "metrics.json").write_text("[]")
    capsys.readouterr()
    assert report_mod.main([str(run)]) == 2
    assert "not a run's metrics" in error_line(capsys)


def test_a_data_set_name_means_the_data_set_even_beside_a_directory_of_that_name(
        tmp_path, monkeypatch, capsys):
    """Adversarial trial: with a directory ./fashion_mnist here, 'fashion_mnist:test' read
    Debian's data set while meta.json named the local directory (an IDX one), or read the
    directory (an image folder). The bare name is the data set; ./fashion_mnist the folder."""
    from dist_triplet.data import FASHION_MNIST_ROOT
    if not os.path.isdir(FASHION_MNIST_ROOT):
        pytest.skip(f"{FASHION_MNIST_ROOT} absent (launch/setup.sh installs it)")
    images, labels = make_images(3, 2, SIDE, SIDE, 1)
    write_folder(tmp_path / "fashion_mnist", images, labels)
    monkeypatch.chdir(tmp_path)
    model = export_identity(tmp_path / "model")         # 4 values a row: both are refused,
    for spec, source in (("fashion_mnist:test", "fashion_mnist:test"),   # each by its name
                         ("./fashion_mnist:all", f"{tmp_path / 'fashion_mnist'}:all")):
        assert embed_cli.main(["--model", model, "--input", spec, "--out", "e.npy"]) == 2
        line = error_line(capsys)
        assert line.startswith(f"error: {source}: the model takes 4 values"), line


def test_run_set_path_reads_other_files_as_the_model_takes_them(tmp_path, capsys):
    """Adversarial trial: an npz run's config.yaml holds data.mode: RGB (the default; npz
    ignores it) while its model takes grey images, so RUN:all --set path=<grey folder>
    read RGB and was refused; the same folder as a plain spec was read fine."""
    images, labels = make_images(PER_CLASS, CLASSES, 12, 12, 1, seed=5)
    np.savez(tmp_path / "grey.npz", x=images[..., 0], y=labels)
    run = _train(tmp_path, "run", f"data.path={tmp_path / 'grey.npz'}")
    write_folder(tmp_path / "other", images, labels, NAMES)
    model = str(run / "model")
    assert embed_cli.main(["--model", model, "--input", f"{run}:all", "--set",
                           f"path={tmp_path / 'other'}", "--out", str(tmp_path / "a.npy")]) == 0
    assert embed_cli.main(["--model", model, "--input", f"{tmp_path / 'other'}:all",
                           "--out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_an_index_built_by_the_python_api_serves_the_commands(folder_run, tmp_path, capsys):
    """New-user trial: docs/search.md's API snippet saved an index of an image model that
    search refused as "edited" (no image_shape in its meta.json)."""
    from dist_triplet.retrieval import Model, read_items
    from dist_triplet.retrieval.index import ModelRef
    _, run, _ = folder_run
    model = Model(str(run / "model"))
    gallery = read_items(f"{run}:train", model.input)
    ix = Index.build(model.embed(gallery.x), gallery.labels, gallery.ids, gallery.class_names,
                     model=ModelRef(model.dir, model.params_sha256, model.input.units))
    ix.save(str(tmp_path / "api"))
    assert index_cli.main(["--model", str(run / "model"), "--data", f"{run}:train",
                           "--out", str(tmp_path / "cli")]) == 0
    args = ["--query", f"{run}:test", "--k", "1", "--out"]
    assert search_cli.main(["--index", str(tmp_path / "api")] + args + [str(tmp_path / "a")]) == 0
    assert search_cli.main(["--index", str(tmp_path / "cli")] + args + [str(tmp_path / "b")]) == 0
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text()


def test_no_output_lands_in_the_image_folder_or_on_an_image_read(folder_run, tmp_path,
                                                                 capsys):
    """Second adversarial trial: with --force, --grid / --out replaced an image of the query
    folder (or one a CSV lists); index --out inside the folder left a class folder without
    images, and every later read of the folder failed."""
    tmp, run, paths = folder_run
    model, shots = str(run / "model"), tmp / "shots"
    ix = str(tmp_path / "ix")
    assert index_cli.main(["--model", model, "--data", f"{shots}:all", "--out", ix]) == 0
    write_csv(tmp_path / "list.csv", [(p, 0) for p in paths[:4]])
    before = [open(p, "rb").read() for p in paths]
    for main, argv in (
            (search_cli.main, ["--index", ix, "--query", f"{shots}:all", "--grid", paths[0]]),
            (search_cli.main, ["--index", ix, "--query", f"{tmp_path / 'list.csv'}:all",
                               "--out", paths[1]]),
            (index_cli.main, ["--model", model, "--data", f"{shots}:all",
                              "--out", str(shots / "ix")])):
        capsys.readouterr()
        assert main(argv + ["--force"]) == 2
        assert "which this command reads" in error_line(capsys), argv
    assert [open(p, "rb").read() for p in paths] == before and not (shots / "ix").exists()


def test_image_options_on_data_that_are_not_image_files_are_refused(features_run, tmp_path,
                                                                    capsys):
    """Second trial: --image-size / --mode on an npz or IDX data path did nothing, exit 0;
    --model RUN of an unfinished run (no model/ yet) looked for the export in RUN itself."""
    tmp, run, _ = features_run
    for option in (["--image-size", "8"], ["--mode", "L"], ["--set", "image_size=8"]):
        assert embed_cli.main(["--model", str(run / "model"), "--input",
                               f"{tmp / 'feats.npz'}:all", "--out", str(tmp_path / "e.npy")]
                              + option) == 2
        line = error_line(capsys)
        assert "--mode / --image-size apply to image files" in line and "feats.npz" in line
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert embed_cli.main(["--model", str(unfinished), "--input", f"{run}:test",
                           "--out", str(tmp_path / "e.npy")]) == 2
    assert f"model directory {unfinished / 'model'} does not exist" in error_line(capsys)
