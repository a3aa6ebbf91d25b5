"""Open-set thresholds (dist_triplet.retrieval.calibrate and the calibrate command)."""
import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="index and search embed with an MXNet export")
faiss = pytest.importorskip("faiss", reason="the index is a faiss index")

# setup: a fixture
from _search_util import (CAL, CAL_LABELS, GALLERY, GALLERY_LABELS, S, error_line, export_identity,
                         read_jsonl, setup, write_split)  # noqa: E402,F401

from dist_triplet import calibrate as calibrate_cli  # noqa: E402
from dist_triplet import index as index_cli  # noqa: E402
from dist_triplet import search as search_cli  # noqa: E402
from dist_triplet.retrieval.calibrate import choose_threshold, curve  # noqa: E402


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


def test_a_query_without_a_neighbour_never_makes_the_threshold_infinite():
    """Adversarial trial: on an ivf index a query could get no neighbour (position -1,
    distance inf); it was read as right (the last gallery item's label) and best F1 chose
    the infinite threshold, written as null and refused by search."""
    d = np.array([10, 40, 20, 50, 30, 60, 45], float)
    right = np.array([1, 0, 1, 0, 1, 0, 1], bool)
    assert choose_threshold(np.r_[d, np.inf], np.r_[right, False], best_f1=True) == 45
    assert choose_threshold(np.r_[d, np.inf], np.r_[right, True], best_f1=True) == 45
    with pytest.raises(ValueError, match="no calibration query has a neighbour"):
        choose_threshold(np.full(3, np.inf), np.ones(3, bool), best_f1=True)


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
    # Options that would do nothing were ignored: --holdout-labels without --holdout, and
    # --holdout-fraction with it.
    np.save(tmp / "hold_labels.npy", np.zeros(3, np.int64))
    for extra in (["--holdout-labels", str(tmp / "hold_labels.npy")],
                  ["--holdout", str(hold), "--holdout-labels", str(tmp / "hold_labels.npy"),
                   "--holdout-fraction", "0.3"]):
        assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test"] + extra) == 2
        assert "--holdout-labels goes with --holdout" in error_line(capsys)


# ----------------------------------------------------------------------------- issue 17

def test_degenerate_and_under_supported_thresholds_warn(setup, capsys):
    """Issue 17 (2): calibration items copying gallery items under other ids gave threshold
    0 with precision = recall = 1.0, and a threshold on 4 accepted queries, or one whose
    held-out precision missed the target, got no warning."""
    tmp, model, data, index_dir = setup
    copies = tmp / "copies"
    write_split(copies, "t10k", GALLERY * 3, GALLERY_LABELS * 3)     # other ids, distance 0
    write_split(copies, "train", GALLERY[:1], GALLERY_LABELS[:1])
    capsys.readouterr()
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{copies}:test",
                               "--target-precision", "0.9"]) == 0
    err = capsys.readouterr().err
    doc = json.load(open(os.path.join(index_dir, "threshold.json")))
    assert doc["threshold"] == 0.0
    assert "warning: 12 of 12 calibration queries copy gallery items (distance 0, other " \
        "ids): threshold 0 says little" in err
    assert "rests on 6 accepted calibration queries" in err      # 6 of 12 chose, all at 0
    assert doc["warnings"] == [line for line in err.splitlines() if line.startswith("warning")]
    # Held-out precision below the target: the hand-made split of test_calibrate_finds_...
    hold = tmp / "hold"
    write_split(hold, "t10k", [(0, 0, 5, 0), (0, 0, 15, 0), (0, 0, 25, 0), (0, 0, 35, 0)],
                [0, 2, 0, 0])
    write_split(hold, "train", [(0, 0, 0, 0)], [0])
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{data}:test", "--force",
                               "--target-precision", "0.9", "--holdout", f"{hold}:test"]) == 0
    err = capsys.readouterr().err
    assert "warning: held-out precision 0.6667 is below the target 0.9" in err
    assert "copy gallery items" not in err
    # Second trial: copies are named whatever the threshold (RUN:all against an index of
    # RUN:train: 80% of the queries were the gallery's rows under other ids, no warning).
    write_split(copies, "t10k", np.concatenate([GALLERY, CAL]),
                np.concatenate([GALLERY_LABELS, CAL_LABELS]))
    assert calibrate_cli.main(["--index", index_dir, "--data", f"{copies}:test", "--force",
                               "--best-f1"]) == 0
    assert f"warning: {len(GALLERY)} of {len(GALLERY) + len(CAL)} calibration queries copy " \
        "gallery items" in capsys.readouterr().err


def test_calibrate_compares_two_spellings_by_class_id(tmp_path, capsys):
    """Issue 17 (1): calibrate on labels "0".."2" against "apple".."cat" said "no threshold
    reaches precision 0.9: the highest is 0.0000"."""
    from test_search import two_spellings
    two_spellings(tmp_path)
    model = export_identity(tmp_path / "model")
    assert index_cli.main(["--model", model, "--data", f"{tmp_path / 'named.npz'}:all",
                           "--out", str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    assert calibrate_cli.main(["--index", str(tmp_path / "ix"), "--data",
                               f"{tmp_path / 'idx'}:test", "--best-f1"]) == 0
    err = capsys.readouterr().err
    doc = json.load(open(tmp_path / "ix" / "threshold.json"))
    assert "compared by class id" in err and doc["calibration"]["precision"] == 1.0


def test_api_calibrate_and_search_refuse_another_model(setup, tmp_path):
    """The Python API's calibrate took any model and returned a threshold, exit 0; the
    command line refused the same pairing. Both now go through the same check, which also
    says when the index's own model directory was exported again (a resumed run)."""
    import shutil
    from dist_triplet.export import export_model
    from dist_triplet.model import build_embedding_net, initialize
    from dist_triplet.retrieval import Index, Model, calibrate, read_items
    from dist_triplet.retrieval.search import search_items
    tmp, model, data, index_dir = setup
    net = build_embedding_net(4, [4], final_relu=False)
    initialize(net, 0.1, mx.cpu(), seed=0)
    net[0].weight.set_data(mx.nd.array(2 * np.eye(4)))        # another model, same shapes
    net[0].bias.set_data(mx.nd.zeros(4))
    other = Model(export_model(net, str(tmp_path / "other"), mx.cpu(), 4))
    index = Index.load(index_dir)
    items = read_items(f"{data}:test", other.input)
    with pytest.raises(ValueError, match=r"is not the one .* was built with \(.*model, 4-wide"):
        calibrate(index, other, items, best_f1=True)
    with pytest.raises(ValueError, match="rebuild the index"):
        search_items(index, other, items, 1)
    # The index's own model directory with new parameters (a resumed run): said so.
    shutil.copy(os.path.join(other.dir, "embed-0000.params"),
                os.path.join(model, "embed-0000.params"))
    with pytest.raises(ValueError, match="its parameters changed since, e.g. a resumed run"):
        calibrate(index, Model(model), items, best_f1=True)
    assert calibrate(index, Model(export_identity(tmp_path / "same")), items,
                     best_f1=True)["threshold"] >= 0        # the same parameters elsewhere: fine
