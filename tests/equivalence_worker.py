"""The fixed problem of tests/test_equivalence.py, run in one mode.

In-process (modes ``local`` and ``kvstore``) the test imports :func:`run`; for mode
``horovod`` every rank runs this file under ``horovodrun`` and writes its parameters to
``OUT/rank{r}.npz``::

    horovodrun -np 2 -H localhost:2 --gloo python tests/equivalence_worker.py OUT

The problem: 40 samples x 16 features, 4 classes, a Dense 8 -> Dense 4 -> L2-normalise
embedding, and ``STEPS`` fixed batches of ``BATCH`` = 8 triplets. ``local`` steps on all 8; ``kvstore``
splits them over cpu(0), cpu(1) (4 each); Horovod rank r takes rows [4r, 4r + 4), the same
rows kvstore gives device r.
"""
from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 20
BATCH = 8
# name -> (optimizer, hyper-parameters); momentum and Adam both carry state across steps.
OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.01, "momentum": 0.0}),
}


def problem():
    """(pixels (40, 16) float32, labels (40,) int64, batches (STEPS, BATCH, 3) int64)."""
    from dist_triplet.triplets import create_pairs
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    pixels = rng.random((40, 16), dtype=np.float32)
    batches = np.stack([create_pairs(labels, seed=0, epoch=e)[:BATCH] for e in range(STEPS)])
    return pixels, labels, batches


def run(backend, opt: str, steps: int = STEPS, rank: int = 0, world_size: int = 1) -> dict:
    """Train from seed-1 parameters for ``steps`` steps.

    Returns ``{"params": [step][name] -> (contexts, ...) float32 array, "num_update":
    [step] -> int}``; step 0 is the initial state.
    """
    from dist_triplet.config import load_config
    from dist_triplet.model import build_embedding_net, initialize
    from dist_triplet.engine import build_step

    pixels, labels, batches = problem()
    name, hyper = OPTIMIZERS[opt]
    cfg = load_config(None, [f"optim.optimizer={name}", f"optim.lr={hyper['lr']}",
                             f"optim.momentum={hyper['momentum']}"])
    # L2-normalised output: without it the last bias has an identically zero gradient (it
    # cancels in a - p and a - n), and Adam turns the round-off in that zero into +-lr
    # steps that depend on summation order, not on the mode. Init 0.5 so one step moves
    # parameters by ~1e-2, far above the 1e-5 tolerance.
    net = build_embedding_net(pixels.shape[1], [8, 4], final_relu=False, normalize=True)
    initialize(net, 0.5, backend.contexts, seed=1)
    backend.broadcast_parameters(net.collect_params())
    stepper = build_step(cfg, backend, net, pixels, labels)
    share = BATCH // world_size

    def snapshot():
        return {name: np.stack([p.data(c).asnumpy() for c in backend.contexts])
                for name, p in net.collect_params().items()}

    out = {"params": [snapshot()], "num_update": [0]}
    for s in range(steps):
        stepper.step(batches[s][rank * share:(rank + 1) * share])
        out["params"].append(snapshot())
        out["num_update"].append(stepper.trainer.optimizer.num_update)
    return out


CONV_SHAPE = (6, 6, 1)  # the 40 x 36 rows of problem_conv as images
CONV_STEPS = 10


def conv_net(backend):
    """convnet [4, 8] (Conv-BN-ReLU, pool, Conv-BN-ReLU, global pool) -> Dense 4 -> L2,
    He-initialised from seed 1 on every context (backbone.initialize_network)."""
    from dist_triplet.backbone import build_network, initialize_network
    from dist_triplet.config import load_config
    cfg = load_config(None, ["model.backbone=convnet", "model.channels=[4, 8]",
                             "model.hidden=[4]", "model.final_relu=false",
                             "model.normalize=true"]).model
    units = int(np.prod(CONV_SHAPE))
    net = build_network(cfg, units, CONV_SHAPE)
    initialize_network(net, cfg, backend.contexts, 1, units)
    return net


def run_conv(backend, opt: str, rank: int = 0, world_size: int = 1, ghost: int = 1) -> dict:
    """:func:`run` with the small convolutional network on 6x6 images (the same values,
    problem's (40, 16) rows padded to 36 by a fixed random map), ``CONV_STEPS`` steps.

    BatchNorm normalises each worker's own rows, so one process equals W workers only
    when it normalises each worker's share separately: ``ghost`` = W runs the one
    process's step as W forward passes (one per share) in one backward and one update.

    Returns ``{"params": [step][name] -> (contexts, ...)}`` for the trainable parameters
    and ``{"aux": ...}`` for BatchNorm's running statistics (no gradient), step 0 first.
    """
    import mxnet as mx
    from dist_triplet.config import load_config
    from dist_triplet.engine import build_step

    pixels, labels, batches = problem()
    pixels = pixels @ np.random.default_rng(1).random((16, 36), dtype=np.float32) / 4
    name, hyper = OPTIMIZERS[opt]
    cfg = load_config(None, [f"optim.optimizer={name}", f"optim.lr={hyper['lr']}",
                             f"optim.momentum={hyper['momentum']}"])
    net = conv_net(backend)
    backend.broadcast_parameters(net.collect_params())
    stepper = build_step(cfg, backend, net, pixels.astype(np.float32), labels, CONV_SHAPE)
    share = BATCH // world_size
    params = net._collect_params_with_prefix()   # structural names: equal in every process
    trainable = [n for n, p in params.items() if p.grad_req != "null"]

    def snapshot(names):
        return {n: np.stack([params[n].data(c).asnumpy() for c in backend.contexts])
                for n in names}

    aux = [n for n in params if n not in trainable]
    out = {"params": [snapshot(trainable)], "aux": [snapshot(aux)]}
    for s in range(CONV_STEPS):
        batch = batches[s][rank * share:(rank + 1) * share]
        if ghost == 1:
            stepper.step(batch)
        else:
            parts = np.split(batch, ghost)
            with mx.autograd.record():
                losses = [stepper.strategy.losses(stepper.pixels, stepper.labels,
                                                  stepper.device_batches(part))[0]
                          for part in parts]
            mx.autograd.backward(losses)
            stepper.trainer.step(len(batch))
        out["params"].append(snapshot(trainable))
        out["aux"].append(snapshot(aux))
    return out


def main(out_dir: str) -> None:
    from _hvd import store_steps
    from dist_triplet import dist
    backend = dist.make_backend("horovod", device="cpu")
    arrays = {}
    for opt in OPTIMIZERS:
        res = run_conv(backend, opt, rank=backend.rank, world_size=backend.world_size)
        for key in ("params", "aux"):
            store_steps(arrays, f"conv:{opt}:{key}:", res[key])
    for opt in OPTIMIZERS:
        res = run(backend, opt, rank=backend.rank, world_size=backend.world_size)
        arrays[f"{opt}:num_update"] = np.asarray(res["num_update"])
        store_steps(arrays, f"{opt}:", res["params"])
    np.savez(os.path.join(out_dir, f"rank{backend.rank}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
