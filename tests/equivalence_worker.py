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


def main(out_dir: str) -> None:
    from dist_triplet import dist
    backend = dist.make_backend("horovod", device="cpu")
    arrays = {}
    for opt in OPTIMIZERS:
        res = run(backend, opt, rank=backend.rank, world_size=backend.world_size)
        arrays[f"{opt}:num_update"] = np.asarray(res["num_update"])
        for step, params in enumerate(res["params"]):
            for name, value in params.items():
                arrays[f"{opt}:{step}:{name}"] = value
    np.savez(os.path.join(out_dir, f"rank{backend.rank}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
