"""The rank-0 Recorder (dist_triplet/recorder.py): a null recorder off rank 0, never
changes the rows it is given, owns the metrics history and stores a copy of it in each
checkpoint."""
import copy
import json
import logging
import os

import pytest

import mxnet as mx

from dist_triplet import checkpoint as ckpt
from dist_triplet.config import load_config
from dist_triplet.recorder import NullRecorder, Recorder, make_recorder, timing_text


def _row(epoch):
    return {"epoch": epoch + 1, "loss": 0.5 / (epoch + 1), "triplets_per_s": 1000.0,
            "lr": 0.05}


def test_off_rank_0_nothing_is_written(tmp_path):
    run_dir = str(tmp_path / "run")
    rec = make_recorder(False, run_dir, load_config(None, ["checkpoint.keep=2"]))
    assert isinstance(rec, NullRecorder)
    rec.record_epoch(0, _row(0), "[timing")
    rec.save_checkpoint(0, None, None, steps_per_epoch=3, processes=2, devices=1)
    assert rec.write_metrics({"epoch": 1}) == {}
    rec.close()
    assert not os.path.exists(run_dir) and rec.history == []


def test_null_recorder_has_every_public_method_of_the_recorder():
    public = {n for n in dir(Recorder) if not n.startswith("_")}
    assert public <= set(dir(NullRecorder)), public - set(dir(NullRecorder))


def test_rows_are_kept_unchanged_and_copied_into_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = load_config(None, ["checkpoint.keep=2"])
    earlier = [_row(0)]
    rec = make_recorder(True, run_dir, cfg, history=earlier)
    assert isinstance(rec, Recorder)
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
    meta = ckpt.read_meta(os.path.join(run_dir, "checkpoints", "epoch-0002"))  # "epoch 2/N"
    assert (meta.epoch, meta.world_size, meta.processes, meta.devices, meta.steps_per_epoch) \
        == (1, 2, 2, 1, 3)
    assert meta.history == rec.history and meta.history is not rec.history
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        doc = json.load(fh)
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2] and doc["final"] is None
    assert earlier == [_row(0)]
    rec.close()


def test_epoch_log_line_names_its_fields(tmp_path, caplog):
    """The epoch line spells out what its numbers are (seed-acc with its triplet count,
    host-wait, throughput with thousands separators); the Recorder docstring lists them."""
    cfg = load_config(None, ["train.epochs=10", "eval.full_every=0"])
    rec = Recorder(str(tmp_path / "run"), cfg, baseline={"precision_at_1": 0.8092})
    row = dict(_row(2), triplets_per_s=24665.0313, seed_accuracy=9041 / 9990, correct=9041,
               total=9990, collapsed=False, precision_at_1=0.796, time_eval_s=0.523)
    caplog.set_level(logging.INFO, logger="dist_triplet")
    rec.record_epoch(2, row, timing_text(0.104, 3.5, 3.391, 0.0149))
    rec.record_epoch(3, dict(_row(3), triplets_per_s=1234567.8), timing_text(0, 1, 0.5, 0))
    rec.close()
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 3/10  loss 0.1667  seed-acc 0.9050 (9041/9990 triplets)  P@1 0.7960 (raw 0.8092)"
        "  R-Prec/MAP@R: last epoch  24,665 triplets/s  [sample 0.10s train 3.50s "
        "(host-wait 3.39s) allreduce 0.01s eval 0.52s]",
        "epoch 4/10  loss 0.1250  1,234,568 triplets/s  [sample 0.00s train 1.00s "
        "(host-wait 0.50s) allreduce 0.00s]"]
    # Adversarial trial: a P x K run's rows are images, and an approximate search (beyond
    # eval.exact_max_gallery) was said in metrics.json only.
    caplog.clear()
    cfg = load_config(None, ["train.epochs=10", "sampler.kind=pk"])
    rec = Recorder(str(tmp_path / "run2"), cfg, baseline={"precision_at_1": 0.8092})
    rec.record_epoch(2, dict(row, approximate=True), timing_text(0.104, 3.5, 3.391, 0.0149))
    rec.close()
    assert "P@1 0.7960 (raw 0.8092) (approximate: faiss IVF, eval.exact_max_gallery)  " \
        "R-Prec/MAP@R: last epoch  24,665 images/s" in caplog.records[0].getMessage()


def test_a_resume_from_an_older_checkpoint_drops_the_abandoned_steps(tmp_path):
    """Second trial: after a resume from epoch 1 of 3, TensorBoard showed both lines at
    steps 2 and 3 (metrics.json and the checkpoints had dropped the abandoned ones)."""
    EventAccumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator").EventAccumulator
    cfg = load_config(None, ["train.epochs=3"])
    run = str(tmp_path / "run")
    rec = Recorder(run, cfg)
    for e in range(3):
        rec.scalars(e, {"train/loss": 10.0 + e})
    rec.close()
    import time
    time.sleep(1.1)     # event files are named by the second: the resumed one sorts after
    rec = Recorder(run, cfg, history=[{"epoch": 1, "loss": 10.0}])   # resumed after epoch 1
    for e in (1, 2):
        rec.scalars(e, {"train/loss": 20.0 + e})
    rec.close()
    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [
        (1, 10.0), (2, 21.0), (3, 22.0)]
