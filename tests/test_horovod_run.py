"""A real 2-rank ``horovodrun --gloo`` run of the debug config, end to end (issue 2).

The test writes a tiny MNIST-format data set (10 classes, 200 train / 100 test images of
28 x 28), trains 2 epochs on 2 Gloo ranks through ``dist_triplet.loop.train`` and checks
what the run leaves: both ranks end with the same parameters, and rank 0 wrote
config.yaml, metrics.json and the projector (one metadata line per point).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from _hvd import HOROVODRUN_2, ROOT, child_env, require_horovod
from dist_triplet.data import write_idx
from dist_triplet.projector import read_tensor

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 20, 10


def write_dataset(root) -> None:
    """30 % class prototype + 70 % noise, uint8 28 x 28: learnable, yet hard enough that
    the loss stays above 0 for 2 epochs (at 0 no rank would update anything)."""
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, size=(CLASSES, 28, 28))
    for stem, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.tile(np.arange(CLASSES), per_class)              # (N,), classes interleaved
        noise = rng.integers(0, 256, size=(len(labels), 28, 28))
        images = np.round(0.3 * protos[labels] + 0.7 * noise)
        write_idx(root / f"{stem}-images-idx3-ubyte", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels, gzip=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_horovod()
    tmp = tmp_path_factory.mktemp("hvd_run")
    data, run_dir = tmp / "data", tmp / "run"
    data.mkdir()
    write_dataset(data)
    proc = subprocess.run(
        HOROVODRUN_2 + [sys.executable, os.path.join(HERE, "horovod_train_worker.py"), str(tmp),
         "--config", "configs/debug.yaml", "distributed.backend=horovod",
         "data.dataset=idx", f"data.root={data}", "train.epochs=2", f"output.dir={run_dir}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    return proc, tmp, run_dir


def test_exit_code_zero(run):
    proc, _, _ = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ranks_end_with_identical_parameters(run):
    _, tmp, _ = run
    ranks = [np.load(tmp / f"params_rank{r}.npz") for r in range(2)]
    assert ranks[0].files and sorted(ranks[0].files) == sorted(ranks[1].files)
    for name in ranks[0].files:
        assert np.array_equal(ranks[0][name], ranks[1][name]), name


def test_run_files(run):
    _, _, run_dir = run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["distributed"]["backend"] == "horovod" and cfg["train"]["epochs"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["backend"], metrics["world_size"]) == ("horovod", 2)
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(row["loss"] > 0 for row in metrics["epochs"])  # every step had gradients
    final = metrics["final"]
    assert np.isfinite(final["loss"]) and 0.0 <= final["seed_accuracy"] <= 1.0
    # Rank 0 alone writes checkpoints: keep 1 leaves only the last epoch.
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-0001"]


@pytest.mark.parametrize("tag,dim", [("origin", 28 * 28), ("triplet", 128)])
def test_projector_one_line_per_point(run, tag, dim):
    _, _, run_dir = run
    points = CLASSES * TEST_PER_CLASS
    entry = run_dir / "tensorboard" / "00000" / tag
    metadata = (entry / "metadata.tsv").read_text().splitlines()
    assert len(metadata) == points
    assert sorted(set(metadata)) == [str(c) for c in range(CLASSES)]
    tensors = read_tensor(entry)
    assert tensors.shape == (points, dim)
    assert (entry / "sprite.png").stat().st_size > 0
