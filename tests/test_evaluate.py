"""Rank-0 evaluation (dist_triplet/evaluate.py): which metrics each evaluation computes,
the gallery option, the raw-pixel baseline, and the log line and metrics.json of a run."""
import json
import math

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="evaluation embeds with MXNet")

from _ckpt_util import local_run_config  # noqa: E402
from dist_triplet.config import ConfigError, load_config  # noqa: E402
from dist_triplet.data import Split, write_idx  # noqa: E402
from dist_triplet.evaluate import Evaluator  # noqa: E402
from dist_triplet.retrieval.metrics import retrieval_metrics  # noqa: E402
from dist_triplet.model import embed  # noqa: E402


def identity_net():
    """Embeddings = the pixels themselves, so expectations can be computed by hand."""
    net = mx.gluon.nn.HybridLambda(lambda F, x: x)
    net.initialize()
    return net


def split(images, labels):
    images = np.asarray(images, np.float32)
    return Split(images, np.asarray(labels, np.int64),
                 tuple(str(i) for i in range(int(max(labels)) + 1)), "test")


def config(*overrides):
    # No raw-pixel cache: it would go beside output.root (./runs) of the test's cwd.
    return load_config(None, ["train.epochs=10", "eval.raw_cache=false", *overrides])


def test_full_evaluations_follow_full_every_and_the_last_epoch():
    test = split(np.eye(4), [0, 0, 1, 1])
    ev = Evaluator(config("eval.full_every=3"), test)
    assert [e + 1 for e in range(10) if ev.is_full(e)] == [3, 6, 9, 10]
    assert ev.is_full(None)                      # a final evaluation outside the loop
    ev0 = Evaluator(config(), test)              # default: only the last epoch
    assert [e + 1 for e in range(10) if ev0.is_full(e)] == [10]


def test_partial_evaluation_has_precision_at_1_only_and_raw_has_all_three_at_once():
    # 1-D points: class 0 at 0, 1, 5; class 1 at 4, 9, 10.
    #   nearest other: 0->1 (c0), 1->0 (c0), 5->4 (c1, wrong), 4->5 (c0, wrong),
    #   9->10 (c1), 10->9 (c1): P@1 4/6.
    pixels = np.array([[0.0], [1.0], [5.0], [4.0], [9.0], [10.0]]) / 10
    test = split(pixels, [0, 0, 0, 1, 1, 1])
    ev = Evaluator(config(), test)
    assert ev.raw["precision_at_1"] == pytest.approx(4 / 6, abs=1e-15)
    want = retrieval_metrics(test.images, test.labels)     # all three, before any epoch
    assert set(want) >= {"precision_at_1", "r_precision", "map_at_r"} and ev.raw == want
    res, emb = ev(identity_net(), mx.cpu(), epoch=0)
    assert res["full"] is False and "r_precision" not in res and "map_at_r" not in res
    assert res["precision_at_1"] == pytest.approx(4 / 6, abs=1e-15)
    np.testing.assert_array_equal(emb, test.images)
    res, _ = ev(identity_net(), mx.cpu(), epoch=9)           # identity: the raw numbers
    assert res["full"] is True
    assert {k: res[k] for k in want} == want


def test_training_set_gallery_gives_nearest_neighbour_accuracy():
    # Queries 0.1 (c0), 0.45 (c0), 0.9 (c1), 0.6 (c1) against training items 0 (c0),
    # 0.5 (c1), 1.0 (c1): nearest 0 (right), 0.5 (wrong), 1.0 (right), 0.5 (right): 3/4.
    test = split([[0.1], [0.45], [0.9], [0.6]], [0, 0, 1, 1])
    train = split([[0.0], [0.5], [1.0]], [0, 1, 1])
    cfg = config("eval.gallery=train")
    ev = Evaluator(cfg, test, train)
    res, _ = ev(identity_net(), mx.cpu())
    assert res["precision_at_1"] == pytest.approx(3 / 4, abs=1e-15)
    assert ev.raw["precision_at_1"] == pytest.approx(3 / 4, abs=1e-15)
    with pytest.raises(ValueError, match="eval.gallery=train"):
        Evaluator(cfg, test)


def test_no_query_with_a_partner_is_invalid_not_nan_and_valid():
    # The test classes are absent from the gallery: no query has a correct answer.
    test = split([[0.0], [0.1], [0.5], [0.6]], [0, 0, 1, 1])
    train = split([[0.0], [0.5], [1.0]], [2, 3, 3])
    res, _ = Evaluator(config("eval.gallery=train"), test, train)(identity_net(), mx.cpu())
    assert res["queries"] == 0 and math.isnan(res["precision_at_1"])
    assert res["collapsed"] is False and res["valid"] is False


def test_raw_pixel_baseline_is_cached_beside_the_run_directories(tmp_path, monkeypatch):
    pixels = np.array([[0.0], [1.0], [5.0], [4.0], [9.0], [10.0]]) / 10
    test = split(pixels, [0, 0, 0, 1, 1, 1])
    cfg = config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'a'}")
    ev = Evaluator(cfg, test)
    want = retrieval_metrics(test.images, test.labels)
    (path,) = (tmp_path / "runs" / ".cache").iterdir()
    assert json.loads(path.read_text()) == want
    # A second run (another run directory, same parent) reads it: no search at all.
    import dist_triplet.retrieval.metrics as metrics_mod
    monkeypatch.setattr(metrics_mod, "retrieval_metrics", None)   # would fail if called
    again = Evaluator(config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'b'}"),
                      test)
    assert again.raw == want
    # Other pixels, or a key that changes the numbers, miss the cache.
    monkeypatch.undo()
    other = Evaluator(config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'c'}",
                             "eval.max_queries=3"), test)
    assert other.raw["queries"] == 3
    assert len(list((tmp_path / "runs" / ".cache").iterdir())) == 2
    # A damaged cache file is recomputed (and rewritten), not trusted.
    path.write_text("{not json")
    fixed = Evaluator(config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'd'}"),
                      test)
    assert fixed.raw["precision_at_1"] == want["precision_at_1"]
    assert json.loads(path.read_text())["precision_at_1"] == want["precision_at_1"]


def test_undefined_raw_metrics_are_null_in_the_cache_not_bare_nan(tmp_path):
    """Issue 17 (8): the raw-pixel cache held bare NaN, which strict JSON parsers reject."""
    test = split([[0.0], [0.1], [0.5], [0.6]], [0, 0, 1, 1])
    train = split([[0.0], [0.5], [1.0]], [2, 3, 3])     # no query's class: P@1 undefined
    cfg = config("eval.raw_cache=true", "eval.gallery=train",
                 f"output.dir={tmp_path / 'runs' / 'a'}")
    ev = Evaluator(cfg, test, train)
    assert math.isnan(ev.raw["precision_at_1"])
    (path,) = (tmp_path / "runs" / ".cache").iterdir()
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["precision_at_1"] is None
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {path}"))


@pytest.mark.parametrize("override, needle", [
    ("eval.gallery=val", "eval.gallery='val' is not one of test, train"),
    ("eval.max_queries=-1", "eval.max_queries=-1 must be >= 0"),
    ("eval.full_every=-2", "eval.full_every=-2 must be >= 0"),
    ("eval.nprobe=0", "eval.nprobe=0 must be > 0"),
    ("eval.query_seed=4294967296", "eval.query_seed=4294967296 must be < 2"),
])
def test_eval_keys_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, [override])


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.RandomState(0)
    root = tmp_path / "data"
    root.mkdir()
    for stem, per_class in (("train", 12), ("t10k", 6)):
        labels = np.repeat(np.arange(3), per_class).astype(np.uint8)
        # Class-dependent brightness: learnable, so the run is not a collapse.
        pixels = rng.randint(0, 80, size=(len(labels), 28, 28)) + 60 * labels[:, None, None]
        write_idx(root / f"{stem}-images-idx3-ubyte", pixels.astype(np.uint8))
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels)
    return root


def test_run_rows_log_line_and_metrics_json(idx_dir, tmp_path, capsys):
    from dist_triplet.data import load_dataset
    from dist_triplet.loop import train
    run_dir = tmp_path / "run"
    cfg = local_run_config(idx_dir, run_dir, epochs=3)
    result = train(cfg)
    err = capsys.readouterr().err
    doc = json.loads((run_dir / "metrics.json").read_text())
    rows = doc["epochs"]
    assert [r["full"] for r in rows] == [False, False, True]
    assert all("r_precision" not in r for r in rows[:2])
    assert all(k in rows[2] for k in ("precision_at_1", "r_precision", "map_at_r"))
    lines = [line for line in err.splitlines() if "INFO epoch " in line and " P@1 " in line]
    assert len(lines) == 3
    assert all("R-Prec/MAP@R: last epoch" in line for line in lines[:2])
    assert "R-Prec 0." in lines[2] or "R-Prec 1." in lines[2]
    # The final row's numbers are the metrics of the final network's embeddings.
    test = load_dataset("idx", str(idx_dir), train=False)
    want = retrieval_metrics(embed(result.net, test.images, mx.cpu()), test.labels)
    assert {k: result.metrics[k] for k in want} == want
    assert set(doc["raw_pixels"]) >= {"precision_at_1", "r_precision", "map_at_r"}
    assert doc["raw_pixels"] == {**retrieval_metrics(test.images, test.labels)}


def test_an_undefined_baseline_is_read_back_from_the_cache(tmp_path, caplog):
    """Adversarial trial: null metrics (no query has a partner) were 'unreadable' on every
    later run, which warned and searched again."""
    test = split([[0.0], [0.1], [0.5], [0.6]], [0, 0, 1, 1])
    train = split([[0.0], [0.5], [1.0]], [2, 3, 3])
    cfg = config("eval.raw_cache=true", "eval.gallery=train",
                 f"output.dir={tmp_path / 'runs' / 'a'}")
    Evaluator(cfg, test, train)
    import dist_triplet.retrieval.metrics as metrics_mod
    caplog.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics_mod, "retrieval_metrics", None)       # would fail if called
        again = Evaluator(cfg, test, train)
    assert math.isnan(again.raw["map_at_r"]) and again.raw["queries"] == 0
    assert "unreadable" not in caplog.text


def _without_queries(doc):
    return json.dumps({k: v for k, v in doc.items() if k != "queries"})


@pytest.mark.parametrize("bad", [
    lambda doc: "[]", lambda doc: "null", lambda doc: "3",
    lambda doc: json.dumps({"precision_at_1": doc["precision_at_1"]}),
    _without_queries,
    lambda doc: json.dumps(dict(doc, precision_at_1=7.0)),
    lambda doc: json.dumps(dict(doc, precision_at_1=float("nan"))),   # a bare NaN
    lambda doc: json.dumps(dict(doc, queries=-6, excluded_queries=-3)),
    lambda doc: json.dumps(dict(doc, queries=10 ** 32)),
    lambda doc: json.dumps(dict(doc, excluded_queries=1000)),          # 6 test items
    lambda doc: json.dumps(dict(doc, queries=0)),                      # metrics of nothing
    lambda doc: "[" * 100_000 + "]" * 100_000,                         # RecursionError
], ids=["list", "null", "number", "p1-only", "no-queries", "p1-7", "bare-nan", "negative",
        "huge", "excluded-beyond", "zero-queries", "deep"])
def test_a_cache_entry_that_is_not_the_baseline_is_recomputed(bad, tmp_path, caplog):
    """Adversarial trial: a list crashed training (AttributeError), an entry without
    'queries' crashed at the log line, and P@1 7.0 or a bare NaN were taken as results."""
    pixels = np.array([[0.0], [1.0], [5.0], [4.0], [9.0], [10.0]]) / 10
    test = split(pixels, [0, 0, 0, 1, 1, 1])
    cfg = config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'a'}")
    want = Evaluator(cfg, test).raw
    (path,) = (tmp_path / "runs" / ".cache").iterdir()
    path.write_text(bad(json.loads(path.read_text())))
    caplog.clear()
    again = Evaluator(cfg, test)
    assert again.raw == want and "unreadable" in caplog.text


def test_a_cache_entry_gives_only_the_baselines_keys(tmp_path):
    """Adversarial trial: extra keys in a cache file were copied into metrics.json."""
    pixels = np.array([[0.0], [1.0], [5.0], [4.0], [9.0], [10.0]]) / 10
    test = split(pixels, [0, 0, 0, 1, 1, 1])
    cfg = config("eval.raw_cache=true", f"output.dir={tmp_path / 'runs' / 'a'}")
    want = Evaluator(cfg, test).raw
    (path,) = (tmp_path / "runs" / ".cache").iterdir()
    path.write_text(json.dumps(dict(json.loads(path.read_text()), note="injected",
                                    final={"precision_at_1": 1.0})))
    assert Evaluator(cfg, test).raw == want


def test_many_all_zero_embeddings_are_warned_of(caplog):
    """New-user trial: resnet18_v1 with the seed's final ReLU left 10 of 24 test embeddings
    all zero (P@1 0.125, below chance) and nothing said so: tie_share 0.15 is no collapse.
    A ReLU after the identity net zeroes the rows with no positive value."""
    relu = mx.gluon.nn.HybridLambda(lambda F, x: F.relu(x))
    relu.initialize()
    rows = [[1.0, 0.2], [1.1, 0.1], [0.1, 1.0], [0.2, 1.2], [-1.0, -0.5], [-0.3, -2.0],
            [2.0, 0.3], [0.3, 2.1], [1.5, 0.0], [0.0, 1.7]]
    test = split(rows, [0, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    with caplog.at_level("WARNING"):
        res, emb = Evaluator(config(), test)(relu, mx.cpu())
    assert res["collapsed"] is False and np.count_nonzero(~emb.any(axis=1)) == 2
    assert "2 of 10 test embeddings are all zero" in caplog.text
    assert "model.final_relu=false avoids it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Evaluator(config(), split(rows[:4] + rows[6:], [0, 0, 1, 1, 0, 1, 0, 1]))(relu, mx.cpu())
    assert "all zero" not in caplog.text
