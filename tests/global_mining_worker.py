"""The fixed problem of tests/test_global_mining.py, run in one mode.

In-process (``local`` on the concatenated batch, ``kvstore`` on 2 CPU devices) the test
imports :func:`run`; for Horovod every rank runs this file under ``horovodrun`` and
writes what it saw to ``OUT/rank{r}.npz``::

    horovodrun -np 2 -H localhost:2 --gloo python tests/global_mining_worker.py OUT

The problem: 40 samples x 16 features around 4 class centres, tests/equivalence_worker.py's
Dense 8 -> Dense 4 -> L2-normalise network, and P x K batches: P = 3 classes, K = 2 images
per class per worker, W = 2 workers, so the global batch is 3 classes x 4 images = 12 rows.
The global mode steps each worker on its own 6 rows; the reference steps one process on
the 12 rows concatenated in worker order (``sampler.k = W x K``, local scope).

Conditioning: uniform-noise pixels without class structure let batch-hard collapse the
embedding within a few steps (distances ~1e-8 apart), where float round-off (~1e-7
between a 6-row and a 12-row forward pass) flips near-tied negatives and the runs part
ways. Class centres, margin 0.2 and SGD lr 0.02 keep 20 steps away from such ties while
the first step still moves the parameters by > 2e-3.
"""
from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 20
P, K, WORKERS = 3, 2, 2
MARGIN = 0.2
# name -> (optimizer, hyper-parameters); momentum and Adam both carry state across steps.
OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.02, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.01, "momentum": 0.0}),
}
MINERS = ("batch_hard", "semi_hard")


def problem():
    """(pixels (40, 16) float32, labels (40,) int64): 10 samples around each of 4 centres."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    centres = rng.random((4, 16), dtype=np.float32)
    pixels = centres[labels] + 0.5 * rng.random((40, 16), dtype=np.float32)
    return pixels.astype(np.float32), labels


def global_batches(labels) -> np.ndarray:
    """(STEPS, WORKERS, P*K) int64: step s is epoch s // steps_per_epoch's batch."""
    from dist_triplet.triplets import pk_global_batches, pk_steps_per_epoch
    per_epoch = pk_steps_per_epoch(labels, P, K, WORKERS)
    epochs = [pk_global_batches(labels, p=P, k=K, steps=per_epoch, seed=3, epoch=e,
                                workers=WORKERS) for e in range(-(-STEPS // per_epoch))]
    return np.concatenate(epochs)[:STEPS]


MEMORY = 2  # global batches in the cross-batch memory of the memory runs (24 rows)


def config(opt: str, miner: str, scope: str, k: int = 0, memory: int = 0,
           workers: int = WORKERS):
    """The test's config; ``k`` 0: K per worker (global), or the reference's W K (local,
    or a one-worker memory run: it mines the concatenation as one P x (W K) batch).
    ``memory``: the cross-batch memory's global batches (scope 'global')."""
    from dist_triplet.config import load_config
    name, hyper = OPTIMIZERS[opt]
    k = k or (K if scope == "global" and workers > 1 else K * WORKERS)
    return load_config(None, [
        f"optim.optimizer={name}", f"optim.lr={hyper['lr']}", f"optim.momentum={hyper['momentum']}",
        "sampler.kind=pk", f"sampler.p={P}", f"sampler.miner={miner}", f"sampler.scope={scope}",
        f"sampler.k={k}", f"loss.margin={MARGIN}", f"sampler.memory={memory}"])


def mined(emb, labels, miner: str, rows) -> list:
    """Sorted (anchor, positive, negative) data-set row ids of the valid triplets the
    miner picks in ``emb`` (G, D) NDArray with ``labels`` (G,) NDArray; ``rows`` (G,) are
    the data-set rows of the G batch rows."""
    import mxnet as mx
    from dist_triplet import mining
    if miner == "batch_hard":
        a, p, n, w = mining.batch_hard(mx.nd, emb, labels)
    else:
        a, p, n, w = mining.semi_hard(mx.nd, emb, labels, MARGIN, positives=K * WORKERS - 1)
    a, p, n, w = (x.asnumpy() for x in (a, p, n, w))
    keep = w > 0
    trip = np.stack([rows[a[keep].astype(int)], rows[p[keep].astype(int)],
                     rows[n[keep].astype(int)]], axis=1)
    return sorted(map(tuple, trip.tolist()))


def run(backend, opt: str, miner: str, scope: str, steps: int = STEPS, memory: int = 0) -> dict:
    """Train from seed-1 parameters for ``steps`` steps on :func:`global_batches`.

    ``scope='global'``: this process's workers (``backend.rank`` x devices onwards) take
    their own rows. ``scope='local'``: the reference, one device given every worker's rows
    concatenated. Returns ``{"params": [step][name] -> (contexts, ...) float32 array,
    "loss": [step] float, "triplets": [step] sorted triplet list, "emb": [step] (G, D) the
    global batch's embeddings in worker order}``; params step 0 is the initial state; loss,
    triplets and emb are those of step s's forward pass (before its update).

    ``memory`` > 0: the cross-batch memory (scope 'global'); a one-worker backend is then
    the reference, stepping on the concatenated batch with the same memory. Triplets and
    embeddings are not recorded (the memory's rows take part in the mining).
    """
    import mxnet as mx
    from dist_triplet.model import build_embedding_net, initialize
    from dist_triplet.engine import build_step

    pixels, labels = problem()
    batches = global_batches(labels)
    reference = memory and backend.num_workers == 1
    cfg = config(opt, miner, scope, memory=memory, workers=backend.num_workers)
    net = build_embedding_net(pixels.shape[1], [8, 4], final_relu=False, normalize=True)
    initialize(net, 0.5, backend.contexts, seed=1)
    backend.broadcast_parameters(net.collect_params())
    stepper = build_step(cfg, backend, net, pixels, labels)
    devices = len(backend.contexts)
    first = backend.rank * devices

    def snapshot():
        return {name: np.stack([p.data(c).asnumpy() for c in backend.contexts])
                for name, p in net.collect_params().items()}

    out = {"params": [snapshot()], "loss": [], "triplets": [], "emb": []}
    for s in range(steps):
        everyone = batches[s].reshape(-1)                              # (G,) worker order
        if memory:
            rows = everyone[None, :] if reference else batches[s][first:first + devices]
        elif scope == "global":
            rows = batches[s][first:first + devices]                   # (devices, P*K)
            gs = stepper.strategy.block
            idx = stepper.device_batches(rows)
            own = gs.forward_own(stepper.pixels, stepper.labels, idx)
            emb = gs.gather([o[1] for o in own])                      # collective
            out["triplets"].append(mined(emb[0], own[0][2], miner, everyone))
            out["emb"].append(emb[0].asnumpy())
        else:
            rows = everyone[None, :]                                   # (1, G)
            emb = net(mx.nd.array(pixels[everyone], ctx=backend.contexts[0]))
            out["triplets"].append(mined(emb, mx.nd.array(labels[everyone]), miner, everyone))
            out["emb"].append(emb.asnumpy())
        sums, terms = stepper.step(rows)
        out["loss"].append(float(sum(x.asscalar() for x in sums)) / terms)
        out["params"].append(snapshot())
    return out


def main(out_dir: str) -> None:
    from _hvd import store_steps
    from dist_triplet import dist
    backend = dist.make_backend("horovod", device="cpu")
    arrays = {}
    for opt in OPTIMIZERS:
        for miner in MINERS:
            res = run(backend, opt, miner, "global")
            arrays[f"{opt}:{miner}:loss"] = np.asarray(res["loss"])
            arrays[f"{opt}:{miner}:emb"] = np.asarray(res["emb"])
            # (steps, T, 3): a full P x K batch gives every step the same triplet count.
            arrays[f"{opt}:{miner}:triplets"] = np.asarray(res["triplets"], dtype=np.int64)
            store_steps(arrays, f"{opt}:{miner}:", res["params"])
            res = run(backend, opt, miner, "global", memory=MEMORY)
            arrays[f"mem:{opt}:{miner}:loss"] = np.asarray(res["loss"])
            store_steps(arrays, f"mem:{opt}:{miner}:", res["params"])
    np.savez(os.path.join(out_dir, f"rank{backend.rank}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
