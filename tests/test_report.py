"""The run report (dist_triplet.report), its page in a real browser, and TensorBoard's projector
served by launch/board.sh (HTTP to 127.0.0.1 only)."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
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


def test_write_report_writes_its_files_and_replaces_an_old_report(tmp_path):
    labels, raw, emb, doc = small_run(tmp_path)
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    assert out == str(tmp_path / "report")
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)
    page = open(os.path.join(out, "report.html")).read()
    assert re.findall(r'<img src="([^"]+)"', page) == list(REPORT_FILES[:-1])
    # The metrics table: learned and raw-pixel P@1 side by side.
    assert "<td>Precision@1</td><td>0.7000</td><td>0.5500</td>" in page
    from PIL import Image
    for name in REPORT_FILES[:-1]:
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    (tmp_path / "report" / "stale.txt").write_text("from an earlier report")
    write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, None)  # no thumbnails
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def _confusable_run(tmp_path, learned_p1, raw_p1=0.55):
    """Three classes on a line: 'zero' and 'one' interleave (their items alternate at unit
    spacing), 'two' sits far away. Leave-one-out, every 'zero' and 'one' item's nearest
    neighbour is one of the other class (distance 1, ties to the lower index), every
    'two' item's is its own class."""
    labels = np.array([0, 1] * 10 + [2] * 10)
    x = np.concatenate([np.arange(20), 100 + 3 * np.arange(10)]).astype(np.float32)
    emb = np.stack([x, np.zeros_like(x)], 1)
    doc = {"run_dir": str(tmp_path), "epochs": [{"epoch": 1, "loss": 0.5}],
           "final": {"precision_at_1": learned_p1}, "raw_pixels": {"precision_at_1": raw_p1}}
    return labels, np.zeros((30, 4), np.float32), emb, doc


def test_report_names_the_failing_classes_worst_first(tmp_path):
    labels, raw, emb, doc = _confusable_run(tmp_path, 0.9)
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (2, 2))
    page = open(os.path.join(out, "report.html")).read()
    table = re.search(r'<table id="per-class">(.*?)</table>', page, re.S).group(1)
    cells = re.findall(r"<tr><td>([^<]*)</td><td>(\d+)</td><td>([\d.]+)</td><td>([^<]*)</td>",
                       table)
    # 'zero' and 'one' miss every query (to each other), 'two' hits all; worst first.
    assert cells == [("zero", "10", "0.0000", "one (100.0%)"),
                     ("one", "10", "0.0000", "zero (100.0%)"),
                     ("two", "10", "1.0000", "")]
    assert "Each of 30 test items searched" in page and "Precision@1 0.3333" in page
    assert 'id="worse-than-raw"' not in page          # 0.9 learned against 0.55 raw


def test_report_of_a_collapsed_embedding_says_why_there_are_no_class_statistics(tmp_path):
    labels, raw, emb, doc = small_run(tmp_path)
    doc["final"]["collapsed"] = True
    out = write_report(str(tmp_path), doc, raw, np.zeros_like(emb), labels, CLASSES, (8, 8))
    page = open(os.path.join(out, "report.html")).read()
    assert "No per-class statistics: the embedding collapsed" in page
    assert re.findall(r"<tr><td>(zero|one|two)</td>", page) == []
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)


def test_report_says_when_the_embedding_retrieves_worse_than_raw_pixels(tmp_path):
    labels, raw, emb, doc = _confusable_run(tmp_path, 0.7934, raw_p1=0.8092)
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (2, 2))
    page = open(os.path.join(out, "report.html")).read()
    sentence = re.search(r'<p class="warn" id="worse-than-raw">([^<]*)</p>', page).group(1)
    assert sentence.startswith("The learned embedding retrieves worse than the raw pixels: "
                               "Precision@1 0.7934 against 0.8092")
    assert sentence == report_mod.worse_than_raw(doc)
    assert "worse than the raw features" in report_mod.worse_than_raw(doc, "raw features")
    for learned, raw_p1 in ((0.8092, 0.8092), (0.9, 0.8), (float("nan"), 0.8)):
        assert report_mod.worse_than_raw({"final": {"precision_at_1": learned},
                                          "raw_pixels": {"precision_at_1": raw_p1}}) == ""
    assert report_mod.worse_than_raw({"final": {"precision_at_1": 0.5}}) == ""   # no raw


def test_worse_than_raw_names_what_to_try_from_the_runs_config(tmp_path):
    """The advice was generic ("train longer or with online mining"): it names the mining
    recipe unless the run mined, train.epochs doubled, and convnet unless the run had one."""
    labels, raw, emb, doc = _confusable_run(tmp_path, 0.7934, raw_p1=0.8092)
    every = report_mod.worse_than_raw(doc)
    assert every.endswith(
        "Try online mining, the recipe of configs/fashion_mnist_mining.yaml (sampler.kind: "
        "pk, semi-hard negatives, normalised embeddings), which beats the raw pixels there; "
        "more epochs (train.epochs); a convolutional backbone (model.backbone: convnet, as "
        "in configs/fashion_mnist_conv.yaml) (docs/results.md).")
    seed = {"sampler": {"kind": "offline"}, "train": {"epochs": 10}, "model": {"backbone": "mlp"}}
    assert "more epochs (train.epochs=20; this run had 10)" in report_mod.worse_than_raw(
        doc, config=seed)
    conv = report_mod.worse_than_raw(doc, "raw features", {
        "sampler": {"kind": "pk"}, "train": {"epochs": 7}, "model": {"backbone": "mlp"}})
    assert conv.endswith("Try more epochs (train.epochs=14; this run had 7) (docs/results.md).")
    # write_report reads the run's config.yaml.
    (tmp_path / "config.yaml").write_text(
        "sampler: {kind: pk}\ntrain: {epochs: 3}\nmodel: {backbone: convnet}\n")
    out = write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (2, 2))
    page = open(os.path.join(out, "report.html")).read()
    assert "Try more epochs (train.epochs=6; this run had 3) (docs/results.md)." in page


def test_confusion_colour_bar_is_in_percent_as_the_cells(tmp_path, monkeypatch):
    """The cells showed percent of the row but the colour bar ran 0-1."""
    import matplotlib.figure
    figures, real = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k)))
    report_mod._plot_confusion(str(tmp_path / "c.png"), np.array([[3, 1], [0, 4]]), ["a", "b"])
    ax, bar = figures[0].axes
    assert bar.get_ylim() == (0.0, 100.0) and bar.get_ylabel() == "% of the row"
    assert sorted(t.get_text() for t in ax.texts) == ["100", "25", "75"]
    assert ax.images[0].get_array()[0].tolist() == [75.0, 25.0]


def test_report_names_no_absolute_path_and_reads_after_a_move(tmp_path):
    labels, raw, emb, doc = small_run(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    write_report(str(tmp_path / "run"), doc, raw, emb, labels, CLASSES, (8, 8))
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert str(tmp_path) not in page
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not os.path.isabs(ref) and "://" not in ref, ref
    assert 'href="../metrics.json"' in page and 'href="../config.yaml"' in page
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    for ref in re.findall(r'<img src="([^"]+)"', page):
        assert (tmp_path / "moved" / "report" / ref).is_file()


def test_report_draws_the_index_threshold_when_the_run_has_one(tmp_path, monkeypatch):
    labels, raw, emb, doc = small_run(tmp_path)
    seen = []
    real = report_mod._plot_distances

    def spy(path, same, other, threshold, source):
        seen.append((threshold, source, len(same), len(other)))
        return real(path, same, other, threshold, source)

    monkeypatch.setattr(report_mod, "_plot_distances", spy)
    import hashlib
    write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    os.makedirs(tmp_path / "index")
    os.makedirs(tmp_path / "model")
    (tmp_path / "model" / "embed-0000.params").write_bytes(b"the run's parameters")
    sha = hashlib.sha256(b"the run's parameters").hexdigest()
    (tmp_path / "index" / "meta.json").write_text(json.dumps({"model": {"params_sha256": sha}}))
    (tmp_path / "index" / "threshold.json").write_text('{"threshold": 1.25, "rule": "best-f1"}')
    write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    # 60 test items: every one of the 1,770 pairs once (570 same-class, 1,200 other-class).
    assert seen == [(None, "", 570, 1200), (1.25, "index/threshold.json", 570, 1200)]
    page = (tmp_path / "report" / "report.html").read_text()        # said in words too
    assert "Calibrated match threshold: squared L2 1.25 (index/threshold.json" in page
    # Second trial: the run resumed and trained on, its index is the old model's: the old
    # embedding's threshold was stated and drawn on the new one's distances.
    (tmp_path / "model" / "embed-0000.params").write_bytes(b"trained on")
    write_report(str(tmp_path), doc, raw, emb, labels, CLASSES, (8, 8))
    assert seen[-1][:2] == (None, "")
    assert "Calibrated match threshold" not in (tmp_path / "report" / "report.html").read_text()
    assert report_mod.known_threshold(str(tmp_path / "nowhere")) == (None, "")
    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "threshold.json").write_text('{"threshold": "x"}')   # unreadable
    assert report_mod.known_threshold(str(tmp_path / "ix")) == (None, "")


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
    assert "the test items as queries, each searched among the other test items" in page
    # Second trial: a P x K run's throughput is images/s, and a gallery of training items
    # with sampled queries was reported as "each test item a query".
    (tmp_path / "config.yaml").write_text("sampler: {kind: pk}\n"
                                          "eval: {gallery: train, max_queries: 100}\n")
    page = open(os.path.join(write_report(str(tmp_path), dict(
        doc, final=dict(doc["final"], queries=100)), imgs, emb, labels, names, (8, 8)),
        "report.html")).read()
    assert "<td>images/s (last epoch)</td><td>24,665</td>" in page
    assert "100 test items as queries (a seeded sample), each searched in the training " \
        "set" in page


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
    assert sorted(sizes) == sorted(REPORT_FILES[:-1])
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


class _LoggingProxy:
    """A local HTTP proxy in front of TensorBoard that records every path requested: the
    projector page fetches ``/tensor?...&name=T`` for the tensor it opens on."""

    def __init__(self, upstream_port: int):
        import http.server
        import threading
        self.paths = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}{self.path}",
                                                timeout=30) as resp:
                        body, ctype, code = resp.read(), resp.headers.get("Content-Type"), 200
                except urllib.error.HTTPError as exc:
                    body, ctype, code = exc.read(), exc.headers.get("Content-Type"), exc.code
                self.send_response(code)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_board_serves_both_projector_embeddings_and_opens_on_the_learned_one(tmp_path):
    """launch/board.sh over a run's projector export: the projector lists both entries,
    serves the embedding values and id/class metadata; and TensorBoard's own projector page,
    loaded in headless chromium, fetches the learned embedding first (the one it shows)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"tensorboard does not import ({exc}); pip install -e .[board]")
    from dist_triplet.projector import LEARNED_TAG, RAW_TAG, export_projector
    labels, raw, emb, _ = small_run(tmp_path)
    run = tmp_path / "run"
    # The raw pixels first, as the seed article did: the order must not matter.
    export_projector(str(run / "tensorboard"), {RAW_TAG: raw, LEARNED_TAG: emb}, labels,
                     CLASSES, images=raw)
    port = free_port()
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "board.sh"), str(run)],
                            env=child_env(PORT=str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/data/plugin/projector"
    proxy = None
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
        learned = f"{LEARNED_TAG}:00000"
        assert names == [learned, f"{RAW_TAG}:00000"]
        shapes = {e["tensorName"]: e["tensorShape"] for e in info["embeddings"]}
        assert shapes[learned] in (["60", "3"], [60, 3])
        # The tensor endpoint serves the embeddings themselves, float32 row-major.
        got = np.frombuffer(get(f"{base}/tensor?run=.&name={learned}"), np.float32)
        np.testing.assert_allclose(got.reshape(60, 3), emb, rtol=1e-6)
        meta = get(f"{base}/metadata?run=.&name={learned}").decode().splitlines()
        assert meta[:3] == ["id\tclass", "test/0\tzero", "test/1\tzero"]
        assert len(meta) == 61 and meta[-1] == "test/59\ttwo"
        if CHROMIUM is None:
            return      # the page check below needs a browser
        proxy = _LoggingProxy(port)
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-profile'}",
             "--virtual-time-budget=20000", "--dump-dom",
             f"http://127.0.0.1:{proxy.port}/#projector"],
            capture_output=True, text=True, timeout=180)
        fetched = [re.search(r"name=([^&]+)", p).group(1) for p in proxy.paths
                   if p.startswith("/data/plugin/projector/tensor?")]
        assert fetched and fetched[0] == learned, proxy.paths
    finally:
        if proxy is not None:
            proxy.close()
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
    holding its files, its table showing metrics.json's final P@1 and raw-pixel P@1."""
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
