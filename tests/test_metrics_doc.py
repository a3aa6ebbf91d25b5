"""docs/metrics.md defines every key a run writes: a tiny training run's metrics.json keys
(at every level) and TensorBoard scalar tags must each have a row in its table, so the
table cannot fall behind the code."""
import json
import os
import re

import pytest

from _ckpt_util import _fresh_logging, write_dataset  # noqa: F401 (autouse fixture)
from _hvd import ROOT

DOC = os.path.join(ROOT, "docs", "metrics.md")


def documented() -> tuple:
    """(keys, scalar tags) named in the key column and the TensorBoard column of the
    table in docs/metrics.md."""
    keys, tags = set(), set()
    with open(DOC) as fh:
        for line in fh:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("| `") or len(cells) < 4:
                continue
            keys.update(re.findall(r"`([^`]+)`", cells[0]))
            tags.update(re.findall(r"`([^`]+)`", cells[2]))
    return keys, tags


def written_keys(doc: dict) -> set:
    """Every key of metrics.json: top level, per-epoch and final rows, and the keys of
    each nested section (raw_pixels, end_of_run_s, ...)."""
    keys = set(doc)
    for value in doc.values():
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if isinstance(row, dict):
                keys.update(row)
    return keys


def test_table_parser_reads_key_and_scalar_columns():
    keys, tags = documented()
    assert {"precision_at_1", "strict_accuracy", "seed_accuracy", "map_at_r"} <= keys
    assert {"eval/precision_at_1", "eval/raw_precision_at_1", "train/loss"} <= tags


def test_every_metrics_json_key_and_scalar_of_a_run_is_documented(tmp_path):
    pytest.importorskip("mxnet", reason="training runs on MXNet")
    from dist_triplet.config import load_config
    from dist_triplet.loop import train
    data = write_dataset(tmp_path / "data", classes=3, per_class=12, test_per_class=6, side=6)
    run = tmp_path / "run"
    cfg = load_config(None, [
        "data.dataset=idx", f"data.root={data}", f"output.dir={run}",
        "distributed.backend=local", "distributed.device=cpu", "train.progress=false",
        "train.epochs=2", "train.batch_size=4", "model.hidden=[8,4]", "eval.every=1",
        "checkpoint.keep=0", "eval.report=true", "eval.projector=true"])
    train(cfg)
    with open(run / "metrics.json") as fh:
        doc = json.load(fh)
    keys, tags = documented()
    missing = sorted(written_keys(doc) - keys)
    assert not missing, f"metrics.json keys not defined in docs/metrics.md: {missing}"
    # The tiny run wrote what the table's main rows promise (the parser found real keys).
    assert {"strict_accuracy", "raw_pixels", "end_of_run_s", "report_s"} <= written_keys(doc)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        pytest.skip(f"tensorboard does not import ({exc}): scalar tags not checked")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert "eval/strict_accuracy" in scalars
    missing = sorted(scalars - tags)
    assert not missing, f"TensorBoard scalars not defined in docs/metrics.md: {missing}"
