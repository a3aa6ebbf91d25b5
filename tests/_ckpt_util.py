"""Shared helpers for the checkpoint, bad-input and fault tests: a tiny synthetic IDX data
set and the command-line overrides of a run that takes well under a second per epoch.

Data: 4 classes x 21 training images of 4 x 4 pixels (84 rows -> 80 triplets per epoch at
world size 1, 40 per rank at 2), 4 x 10 test images. Class c's pixels are noise + 40 c, so
training has something to learn, but no test depends on how well it does.
"""
import hashlib
import os

import numpy as np

from dist_triplet.data import write_idx

from _hvd import ROOT, child_env

FAULT_TRAIN = os.path.join(ROOT, "tests", "_fault_train.py")


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
