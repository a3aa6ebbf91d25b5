"""The run report (dist_triplet.report), its page in a real browser, and TensorBoard's projector
served by launch/board.sh (HTTP to 127.0.0.1 only)."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the report's pictures are drawn with matplotlib")

from dist_triplet import report as report_mod  # noqa: E402
from dist_triplet.report import (REPORT_FILES, neighbour_queries, pca_2d,  # noqa: E402
                                 write_report)

from _hvd import ROOT, child_env  # noqa: E402

CLASSES = ("zero", "one", "two")


def small_run(tmp_path, n_per_class=20):
    """Labels, (N, 64) images in [0, 1] (8x8, a bright band per class), embeddings, doc."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per_class)
    imgs = rng.uniform(0, 0.2, size=(len(labels), 8, 8)).astype(np.float32)
    for i, c in enumerate(labels):
        imgs[i, 2 * c:2 * c + 3, :] = 1.0
    emb = (np.eye(3)[labels] * 2 + rng.normal(0, 0.1, size=(len(labels), 3))).astype(np.float32)
    doc = {"run_dir": str(tmp_path),
           "epochs": [{"epoch": e, "loss": 1.0 / e, "seed_accuracy": 0.5 + 0.1 * e,
                       "precision_at_1": 0.4 + 0.1 * e, "r_precision": 0.3 + 0.1 * e,
                       "map_at_r": 0.2 + 0.1 * e} for e in (1, 2, 3)],
           "final": {"loss": 1 / 3, "seed_accuracy": 0.8, "precision_at_1": 0.7,
                     "r_precision": 0.6, "map_at_r": 0.5},
           "raw_pixels": {"precision_at_1": 0.55, "r_precision": 0.35, "map_at_r": 0.25}}
    return labels, imgs.reshape(len(labels), -1), emb, doc


def test_pca_is_the_top_two_principal_axes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) * np.array([5.0, 0.1, 3.0, 0.1, 0.1])
    coords, rows = pca_2d(x, points=200, seed=0)
    assert rows.tolist() == sorted(np.random.default_rng(0).choice(300, 200, replace=False))
    sub = x[rows] - x[rows].mean(axis=0)
    vals, vecs = np.linalg.eigh(np.cov(sub.T))            # reference: covariance eigenvectors
    top = vecs[:, np.argsort(vals)[::-1][:2]]
    for a in range(2):                                      # the largest loading is positive
        top[:, a] *= np.sign(top[np.abs(top[:, a]).argmax(), a])
    np.testing.assert_allclose(coords, sub @ top, atol=1e-8)
    assert np.var(coords[:, 0]) > np.var(coords[:, 1]) > 1.0  # axes 0 and 2 of x


def test_pca_of_rows_wider_than_tall_matches_the_svd():
    """More columns than rows (large images): the Gram-matrix path gives the same axes as
    the thin SVD's top right singular vectors."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 300)) + np.outer(rng.normal(size=40) * 6, rng.normal(size=300))
    coords, rows = pca_2d(x, points=2000, seed=0)
    assert rows.tolist() == list(range(40))
    sub = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(sub, full_matrices=False)      # reference
    top = vt[:2].T.copy()
    for a in range(2):
        top[:, a] *= np.sign(top[np.abs(top[:, a]).argmax(), a])
    np.testing.assert_allclose(coords, sub @ top, atol=1e-8)
    flat = np.ones((5, 50))                                  # no spread: zeros, no NaN
    assert np.array_equal(pca_2d(flat)[0], np.zeros((5, 2)))


def test_write_report_writes_five_files_and_replaces_an_old_report(tmp_path):
    labels, raw, emb, doc = small_run(tmp_path)
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    assert out == str(tmp_path / "report")
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)
    page = open(os.path.join(out, "report.html")).read()
    assert re.findall(r'<img src="([^"]+)"', page) == list(REPORT_FILES[:4])
    # The metrics table: learned and raw-pixel P@1 side by side.
    assert "<td>Precision@1</td><td>0.7000</td><td>0.5500</td>" in page
    from PIL import Image
    for name in REPORT_FILES[:4]:
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    (tmp_path / "report" / "stale.txt").write_text("from an earlier report")
    write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, None)  # no thumbnails
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_neighbour_queries_take_every_class_up_to_the_cap():
    labels = np.array([2, 0, 2, 1, 0, 1])
    rows, which = neighbour_queries(labels)
    assert rows.tolist() == [0, 1, 3] and which == "first test item of each class"
    many = np.array([13 - (i % 14) for i in range(28)])   # classes 13, 12, ..., 0, 13, ...
    rows, which = neighbour_queries(many, cap=12)
    # classes 0..11 come first at rows 13, 12, ..., 2; in row order:
    assert rows.tolist() == list(range(2, 14))
    assert which == "first test item of each of the first 12 classes (of 14)"


def _ten_class_run(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.arange(50) % 10
    imgs = rng.uniform(0, 1, size=(50, 64)).astype(np.float32)
    emb = (np.eye(10)[labels] * 2 + rng.normal(0, 0.1, size=(50, 10))).astype(np.float32)
    doc = {"run_dir": str(tmp_path), "epochs": [{"epoch": 1, "loss": 0.5}],
           "final": {"precision_at_1": 0.7, "triplets_per_s": 24665.0313, "spread": 1.23456},
           "raw_pixels": {"precision_at_1": 0.55}}
    return labels, imgs, emb, doc, [f"c{i}" for i in range(10)]


def test_neighbours_png_has_a_row_per_class_and_the_table_formats_numbers(tmp_path):
    """All 10 classes are drawn (the cap was 8): 8x8 tiles make rows of 8 + 2*2 (frame) +
    18 (text) = 30 mosaic pixels, the figure is (rows * 30 + 14) * 2.2 pixels tall."""
    labels, imgs, emb, doc, names = _ten_class_run(tmp_path)
    out = write_report(str(tmp_path), doc, imgs, emb, labels, names, (8, 8))
    from PIL import Image
    with Image.open(os.path.join(out, "neighbours.png")) as im:
        assert abs(im.height - (10 * 30 + 14) * 2.2) <= 1, im.height
    page = open(os.path.join(out, "report.html")).read()
    assert "<td>triplets/s (last epoch)</td><td>24,665</td>" in page
    assert "<td>embedding spread</td><td>1.2346</td>" in page
    assert "<td>Precision@1</td><td>0.7000</td><td>0.5500</td>" in page
    assert "first test item of each class and its nearest neighbours" in page


def test_feature_runs_get_text_tiles_and_a_note(tmp_path, monkeypatch):
    """Without an image shape the grid's tiles carry test row, class and distance (the
    search grid's text tiles), and the page says why there are no pictures."""
    labels, imgs, emb, doc, names = _ten_class_run(tmp_path)
    seen = {}
    real = report_mod.neighbour_grid

    def spy(path, q_img, g_img, pos, dist, *args, **kw):
        seen.update(q_img=q_img, g_img=g_img, pos=pos, **kw)
        return real(path, q_img, g_img, pos, dist, *args, **kw)

    monkeypatch.setattr(report_mod, "neighbour_grid", spy)
    out = write_report(str(tmp_path), doc, imgs[:, :5], emb, labels, names, None)
    assert seen["q_img"] is None and seen["g_img"] is None
    assert seen["query_ids"] == [f"test #{i}" for i in range(10)]   # row i is class i
    assert seen["gallery_ids"][seen["pos"][3, 0]] == f"test #{seen['pos'][3, 0]}"
    assert labels[seen["pos"][3, 0]] == 3                            # nearest: same class
    assert seen["title"].startswith("no thumbnails (feature rows): first test item of each "
                                    "class")
    page = open(os.path.join(out, "report.html")).read()
    assert "the test data are feature rows, not images" in page


def test_write_report_refuses_mismatched_rows_and_leaves_nothing(tmp_path):
    labels, raw, emb, doc = small_run(tmp_path)
    with pytest.raises(ValueError, match="59 embeddings and 60 labels"):
        write_report(str(tmp_path), doc, raw, emb[:-1], labels, CLASSES, (8, 8))
    assert os.listdir(tmp_path) == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of report.html: after the load event, list each image's natural size.
_CHECK = """<script>window.addEventListener('load', function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.push(im.getAttribute('src') + '=' + im.naturalWidth + 'x' + im.naturalHeight);
  }
  var pre = document.createElement('pre'); pre.id = 'imgcheck';
  pre.textContent = 'IMAGES[' + out.join(';') + ']'; document.body.appendChild(pre);
});</script>"""


def test_report_page_loads_every_image_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (launch/setup.sh --test installs Debian's)")
    labels, raw, emb, doc = small_run(tmp_path)
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    page = open(os.path.join(out, "report.html")).read()
    check = os.path.join(out, "check.html")
    with open(check, "w") as fh:
        fh.write(page.replace("</body>", _CHECK + "</body>"))
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--dump-dom", "file://" + check],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="imgcheck">IMAGES\[([^\]]*)\]</pre>', proc.stdout)
    assert found, f"no image report in chromium's DOM; stderr: {proc.stderr[-2000:]}"
    sizes = dict(item.split("=") for item in found.group(1).split(";"))
    from PIL import Image
    assert sorted(sizes) == sorted(REPORT_FILES[:4])
    for name, size in sizes.items():
        assert not size.startswith("0x"), f"{name} did not load in chromium ({size})"
        with Image.open(os.path.join(out, name)) as im:
            assert size == f"{im.width}x{im.height}", (name, size)  # decoded, not broken


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def test_board_serves_both_projector_embeddings(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"tensorboard does not import ({exc}); pip install -e .[board]")
    from dist_triplet.projector import export_projector
    labels, raw, emb, _ = small_run(tmp_path)
    run = tmp_path / "run"
    export_projector(str(run / "tensorboard"), {"origin": raw, "triplet": emb}, labels,
                     CLASSES, images=raw)
    port = free_port()
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "board.sh"), str(run)],
                            env=child_env(PORT=str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/data/plugin/projector"
    try:
        deadline, runs = time.time() + 90, None
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                runs = json.loads(get(f"{base}/runs"))
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs == ["."], runs
        info = json.loads(get(f"{base}/info?run=."))
        names = sorted(e["tensorName"] for e in info["embeddings"])
        assert names == ["origin:00000", "triplet:00000"]
        shapes = {e["tensorName"]: e["tensorShape"] for e in info["embeddings"]}
        assert shapes["triplet:00000"] == ["60", "3"] or shapes["triplet:00000"] == [60, 3]
        # The tensor endpoint serves the embeddings themselves, float32 row-major.
        got = np.frombuffer(get(f"{base}/tensor?run=.&name=triplet:00000"), np.float32)
        np.testing.assert_allclose(got.reshape(60, 3), emb, rtol=1e-6)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        proc.stdout.close()


def test_neighbour_grid_draws_colour_thumbnails_as_they_are(tmp_path):
    import matplotlib.image as mpimg

    from dist_triplet.report import neighbour_grid
    blue = np.zeros((3, 6, 6, 3), np.uint8)
    blue[..., 2] = 255
    grey = np.full((3, 6, 6), 255, np.uint8)         # full ink: drawn black on white
    for imgs, colour in ((blue, (0, 0, 1)), (grey, (0, 0, 0))):
        png = tmp_path / "g.png"
        neighbour_grid(str(png), imgs[:1], imgs, np.array([[1, 2]]), np.array([[0.5, 1.0]]),
                       np.array([0]), np.array([0, 0, 1]), ("a", "b"))
        img = mpimg.imread(png)[:, :, :3]
        hits = np.all(np.abs(img - np.array(colour)) < 0.02, axis=2)
        assert hits.sum() > 3 * 6 * 6 * 4           # three tiles, scaled up >= 2x


def test_training_run_writes_the_report_unless_eval_report_is_false(tmp_path):
    """A tiny local training run (4 classes of 28x28 images, 1 epoch) ends with RUN/report/
    holding the five files, its table showing metrics.json's final P@1 and raw-pixel P@1."""
    pytest.importorskip("mxnet", reason="training runs on MXNet")
    from dist_triplet.config import load_config
    from dist_triplet.data import write_idx
    from dist_triplet.loop import train

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    for stem, per in (("train", 12), ("t10k", 5)):
        labels = np.repeat(np.arange(4), per).astype(np.uint8)
        imgs = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            imgs[i, 7 * c:7 * c + 7, :] += 150
        write_idx(root / f"{stem}-images-idx3-ubyte", imgs)
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels)

    def run(name, *extra):
        cfg = load_config(None, [
            "data.dataset=idx", f"data.root={root}", f"output.dir={tmp_path / name}",
            "distributed.backend=local", "distributed.device=cpu", "train.progress=false",
            "train.epochs=1", "sampler.kind=pk", "sampler.p=4", "sampler.k=4",
            "sampler.steps_per_epoch=3", "model.hidden=[32,16]", "eval.projector=false",
            "checkpoint.keep=0", *extra])
        train(cfg)
        return tmp_path / name

    on = run("on")
    assert sorted(os.listdir(on / "report")) == sorted(REPORT_FILES)
    doc = json.load(open(on / "metrics.json"))
    page = (on / "report" / "report.html").read_text()
    assert (f"<td>Precision@1</td><td>{doc['final']['precision_at_1']:.4f}</td>"
            f"<td>{doc['raw_pixels']['precision_at_1']:.4f}</td>") in page
    off = run("off", "eval.report=false")
    assert not (off / "report").exists() and (off / "metrics.json").exists()
