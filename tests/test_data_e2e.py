"""Your own data end to end under ``horovodrun -np 2 --gloo`` (issue 10, "done when"):

* a 32 x 32 RGB image folder (generated here: 6 classes x 10 PNGs) trains on 2 ranks
  through the shared cache, evaluates, and exports a projector whose sprite holds the
  test images as 32 x 32 RGB thumbnails;
* a features ``.npz`` trains the same way, and its projector has no sprite.

Both ranks must end with identical parameters. Each job takes a few seconds.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from _data_util import make_images, write_folder
from _hvd import HOROVODRUN_2, ROOT, child_env, require_horovod
from dist_triplet.projector import RAW_TAG, read_tensor

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES, PER_CLASS = 6, 10


def _train(tmp, *overrides):
    run_dir = tmp / "run"
    proc = subprocess.run(
        HOROVODRUN_2 + [sys.executable, os.path.join(HERE, "horovod_train_worker.py"), str(tmp),
                        "--config", "configs/debug.yaml", "distributed.backend=horovod",
                        "data.limit_train=0", "data.limit_test=0", "train.epochs=2",
                        "train.batch_size=4", "model.hidden=[32,16]", f"output.dir={run_dir}",
                        *overrides],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _same_parameters(tmp):
    ranks = [np.load(tmp / f"params_rank{r}.npz") for r in range(2)]
    assert ranks[0].files and sorted(ranks[0].files) == sorted(ranks[1].files)
    for name in ranks[0].files:
        assert np.array_equal(ranks[0][name], ranks[1][name]), name


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    require_horovod()
    pytest.importorskip("PIL")
    tmp = tmp_path_factory.mktemp("folder_run")
    images, labels = make_images(PER_CLASS, CLASSES, 32, 32, 3)
    write_folder(tmp / "images", images, labels, [f"sku-{c}" for c in range(CLASSES)])
    run_dir = _train(tmp, f"data.path={tmp / 'images'}", "data.test_fraction=0.3",
                     f"data.cache_dir={tmp / 'cache'}")
    return tmp, run_dir, images, labels


def test_folder_ranks_agree_and_share_one_cache_entry(folder_run):
    tmp, run_dir, _, _ = folder_run
    _same_parameters(tmp)
    entries = os.listdir(tmp / "cache")
    assert len(entries) == 1 and entries[0].startswith("folder-images-")


def test_folder_run_evaluates(folder_run):
    _, run_dir, _, _ = folder_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["backend"], metrics["world_size"]) == ("horovod", 2)
    final = metrics["final"]
    # 3 of each class's 10 images are test queries: 18 queries, none excluded.
    assert final["queries"] == CLASSES * 3 and final["excluded_queries"] == 0
    assert 0.0 <= final["precision_at_1"] <= 1.0 and np.isfinite(final["loss"])
    model_meta = json.loads((run_dir / "model" / "meta.json").read_text())
    assert model_meta["input_units"] == 32 * 32 * 3  # the network's width from the data
    cfg = (run_dir / "config.yaml").read_text()
    assert "path: " + str(run_dir.parent / "images") in cfg


def test_folder_projector_has_rgb_sprite_of_test_images(folder_run):
    from PIL import Image
    _, run_dir, images, labels = folder_run
    entry = run_dir / "tensorboard" / "00000" / RAW_TAG
    header, *metadata = (entry / "metadata.tsv").read_text().splitlines()
    metadata = [line.split("\t")[1] for line in metadata]   # id<TAB>class
    n = CLASSES * 3
    assert header == "id\tclass"
    assert len(metadata) == n and sorted(set(metadata)) == [f"sku-{c}" for c in range(CLASSES)]
    tensors = read_tensor(entry)
    assert tensors.shape == (n, 32 * 32 * 3)
    sprite = np.asarray(Image.open(entry / "sprite.png").convert("RGB"))
    per_row = math.ceil(math.sqrt(n))
    assert sprite.shape == (per_row * 32, per_row * 32, 3)
    # Thumbnail i is test image i: its pixels are one of the generated images, in RGB.
    originals = {img.tobytes() for img in images}
    first = sprite[:32, :32]
    assert first.tobytes() in originals
    row = np.round(tensors[0] * 255).astype(np.uint8).reshape(32, 32, 3)
    assert np.array_equal(first, row)


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    require_horovod()
    tmp = tmp_path_factory.mktemp("features_run")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    x = 2.0 * rng.normal(size=(CLASSES, 24))[y] + rng.normal(size=(len(y), 24))
    np.savez(tmp / "feats.npz", x=x, y=y, classes=np.array([f"spk{c}" for c in range(CLASSES)]))
    return tmp, _train(tmp, f"data.path={tmp / 'feats.npz'}", "data.test_fraction=0.3"), x


def test_features_train_without_sprite(features_run):
    tmp, run_dir, x = features_run
    _same_parameters(tmp)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["queries"] == CLASSES * 3
    entry = run_dir / "tensorboard" / "00000" / RAW_TAG
    tensors = read_tensor(entry)
    assert tensors.shape == (CLASSES * 3, 24)
    # The raw points are test rows of x, as they are (features are not scaled).
    gap = np.abs(tensors[:, None, :] - x.astype(np.float32)[None]).max(axis=2).min(axis=1)
    assert gap.max() < 1e-6
    assert not (entry / "sprite.png").exists()
    rows = (entry / "metadata.tsv").read_text().splitlines()[1:]   # after the header
    assert sorted({line.split("\t")[1] for line in rows}) == [
        f"spk{c}" for c in range(CLASSES)]
