"""The rank-0 Recorder (dist_triplet/rundir.py): a no-op off rank 0, never changes the
rows it is given, owns the metrics history and stores a copy of it in each checkpoint."""
import copy
import json
import os

import mxnet as mx

from dist_triplet import checkpoint as ckpt
from dist_triplet.config import load_config
from dist_triplet.rundir import Recorder


def _row(epoch):
    return {"epoch": epoch + 1, "loss": 0.5 / (epoch + 1), "triplets_per_s": 1000.0,
            "lr": 0.05}


def test_off_rank_0_nothing_is_written(tmp_path):
    run_dir = str(tmp_path / "run")
    rec = Recorder(False, run_dir, load_config(None, ["checkpoint.keep=2"]))
    rec.record_epoch(0, _row(0), "[timing")
    rec.save_checkpoint(0, None, None, steps_per_epoch=3, processes=2, devices=1)
    assert rec.finish({"epoch": 1}, None, None, None, None, {}) == {}
    assert not os.path.exists(run_dir) and rec.history == []


def test_rows_are_kept_unchanged_and_copied_into_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = load_config(None, ["checkpoint.keep=2"])
    earlier = [_row(0)]
    rec = Recorder(True, run_dir, cfg, history=earlier)
    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    row = _row(1)
    before = copy.deepcopy(row)
    rec.record_epoch(1, row, "[timing")
    assert row == before                                  # the caller's row is untouched
    row["loss"] = -1.0                                    # ... and not shared with the history
    assert [r["loss"] for r in rec.history] == [0.5, 0.25]
    rec.save_checkpoint(1, net, trainer, steps_per_epoch=3, processes=2, devices=1)
    meta = ckpt.read_meta(os.path.join(run_dir, "checkpoints", "epoch-0001"))
    assert (meta.epoch, meta.world_size, meta.processes, meta.devices, meta.steps_per_epoch) \
        == (1, 2, 2, 1, 3)
    assert meta.history == rec.history and meta.history is not rec.history
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        doc = json.load(fh)
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2] and doc["final"] is None
    assert earlier == [_row(0)]
    rec.close()
