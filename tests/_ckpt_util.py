"""Shared helpers for the checkpoint, bad-input and fault tests: a tiny synthetic IDX data
set and the command-line overrides of a run that takes well under a second per epoch.

Data: 4 classes x 21 training images of 4 x 4 pixels (84 rows -> 80 triplets per epoch at
world size 1, 40 per rank at 2), 4 x 10 test images. Class c's pixels are noise + 40 c, so
training has something to learn, but no test depends on how well it does.
"""
import hashlib
import logging
import os

import numpy as np
import pytest

from dist_triplet.data import write_idx

from _hvd import ROOT, child_env

FAULT_TRAIN = os.path.join(ROOT, "tests", "_fault_train.py")


@pytest.fixture(autouse=True)
def _fresh_logging():
    """train() binds logging to the sys.stderr of its test (capsys closes it afterwards).
    Autouse in every test module that imports it."""
    yield
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


@pytest.fixture
def data(tmp_path):
    """The small data set of :func:`write_dataset` under ``tmp_path/data``."""
    return write_dataset(tmp_path / "data")


def write_dataset(root, per_class=21, test_per_class=10, classes=4, side=4, gz=False,
                  seed=0):
    """Write train-/t10k- images and labels IDX files into ``root``; returns ``root``."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, per in (("train", per_class), ("t10k", test_per_class)):
        labels = np.arange(per * classes) % classes
        images = np.clip(rng.integers(0, 60, (labels.size, side, side)) +
                         40 * labels[:, None, None], 0, 255)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{suffix}"), images, gzip=gz)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, gzip=gz)
    return root


def run_args(data_root, out_dir, *extra):
    """Overrides for a tiny local run: 4 epochs of 10 steps of 8 triplets."""
    return ["data.dataset=idx", f"data.root={data_root}", f"output.dir={out_dir}",
            "train.epochs=4", "train.batch_size=8", "model.hidden=[16,8]",
            "train.progress=false", "eval.projector=false", *extra]


def local_run_config(data_root, run_dir, epochs: int):
    """Config of a tiny one-process CPU run on the IDX set at ``data_root``: batch 4,
    hidden [16, 8], ``epochs`` epochs, no progress bar, projector or checkpoints."""
    from dist_triplet.config import load_config
    return load_config(None, [
        "data.dataset=idx", f"data.root={data_root}", f"output.dir={run_dir}",
        "distributed.backend=local", "distributed.device=cpu", "train.progress=false",
        f"train.epochs={epochs}", "train.batch_size=4", "model.hidden=[16,8]",
        "eval.projector=false", "checkpoint.keep=0"])


def load_params(ckpt_path):
    """{name: (shape) float32 numpy} of a checkpoint's ``params`` file."""
    import mxnet as mx
    return {k: v.asnumpy() for k, v in mx.nd.load(os.path.join(str(ckpt_path), "params")).items()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def net_params(net):
    """{name: numpy} of a Gluon block's parameters, names as in a ``params`` file."""
    return {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}


def digest_tree(path):
    """{relative file: sha256} of every file under ``path``."""
    out = {}
    for dirpath, _, files in os.walk(str(path)):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, str(path))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def subprocess_env(**extra):
    """Environment for child trainers (see _hvd.child_env)."""
    return child_env(**extra)
