"""A collapsed network is flagged, not celebrated: a real (tiny) training run whose
weights are all zero maps every input to one point, where the seed's triplet accuracy is
1.0. The run must say `collapsed`, warn, and mark the accuracy in the log line and in
metrics.json."""
import json

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="training runs on MXNet")

from _ckpt_util import local_run_config  # noqa: E402
from dist_triplet import model as model_mod  # noqa: E402  (after the importorskip)
from dist_triplet.data import write_idx  # noqa: E402
from dist_triplet.loop import train  # noqa: E402


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.RandomState(0)
    root = tmp_path / "data"
    root.mkdir()
    for stem, per_class in (("train", 10), ("t10k", 4)):
        labels = np.repeat(np.arange(3), per_class).astype(np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte",
                  rng.randint(0, 256, size=(len(labels), 28, 28)).astype(np.uint8))
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels)
    return root


def zero_initialize(net, init_scale, ctx, seed):
    """All-zero weights and biases: every output is 0, and ReLU passes no gradient (its
    derivative at 0 is 0 in MXNet), so training cannot leave the collapsed point."""
    net.initialize(mx.init.Zero(), ctx=ctx, force_reinit=True)


def test_forced_collapse_is_flagged_in_metrics_log_and_metrics_json(idx_dir, tmp_path,
                                                                   monkeypatch, capsys):
    # backbone.initialize_network initialises the MLP through model.initialize.
    monkeypatch.setattr(model_mod, "initialize", zero_initialize)
    run_dir = tmp_path / "run"
    cfg = local_run_config(idx_dir, run_dir, epochs=2)
    result = train(cfg)
    err = capsys.readouterr().err

    final = result.metrics
    assert final["collapsed"] is True and final["valid"] is False
    assert final["spread"] == 0.0
    # The seed metric's "perfect" score on a useless model -- present, but flagged.
    assert final["seed_accuracy"] == 1.0 and final["strict_accuracy"] == 0.0

    assert "embeddings collapsed" in err and "WARNING" in err
    epoch_lines = [line for line in err.splitlines() if "acc 1.0000" in line]
    assert len(epoch_lines) == 2
    assert all("COLLAPSED: not a success" in line for line in epoch_lines)

    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["final"]["collapsed"] is True and doc["final"]["valid"] is False
    assert all(row["collapsed"] is True and row["valid"] is False for row in doc["epochs"])
    # Raw pixels are not collapsed: the baseline stays beside the flagged numbers.
    assert 0.0 <= doc["raw_pixels"]["precision_at_1"] <= 1.0


def test_a_collapse_by_ties_is_named_as_ties(idx_dir, tmp_path, monkeypatch, capsys):
    """New-user trial: a partial collapse (most test triplets tie, spread 0.0134) warned
    "spread 0.0134 <= eval.collapse_eps 0.0001", which its own numbers contradict."""
    import dist_triplet.metrics as metrics_mod
    real = metrics_mod.evaluate_embeddings

    def tied(*args, **kwargs):
        out = real(*args, **kwargs)
        out.update(collapsed=True, valid=False, tie_share=0.9966)
        return out
    monkeypatch.setattr(metrics_mod, "evaluate_embeddings", tied)
    train(local_run_config(idx_dir, tmp_path / "run", epochs=1))
    err = capsys.readouterr().err
    assert "embeddings collapsed (99.7% of the test triplets tie, d(a,p) == d(a,n)" in err
    assert "<= eval.collapse_eps" not in err
