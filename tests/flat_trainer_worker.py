"""One rank of tests/test_dist.py's flat-buffer trainer check, under ``horovodrun -np 2``:

    horovodrun -np 2 -H localhost:2 --gloo python tests/flat_trainer_worker.py OUT

For compression 'none' and 'fp16': the same seeded Dense 16 -> 8 -> 4 network on every
rank, one backward pass on this rank's own rows, one SGD step (lr 0.5, no momentum).
Writes ``OUT/rank{r}.npz`` with this rank's own gradients (``grad:<name>``, before the
average), the parameters before (``before:<name>``) and after each step
(``<compression>:<name>``), and whether every gradient was a view of one flat buffer.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def main(out_dir: str) -> None:
    import mxnet as mx
    from dist_triplet import dist
    from dist_triplet.model import build_embedding_net, initialize
    backend = dist.make_backend("horovod", device="cpu")
    x = mx.nd.array(np.random.default_rng(backend.rank).random((6, 16), dtype=np.float32))
    out = {}
    for compression in ("none", "fp16"):
        net = build_embedding_net(16, [8, 4])
        initialize(net, 0.5, backend.contexts, seed=1)
        params = net.collect_params()
        trainer = backend.make_trainer(params, "sgd", {"learning_rate": 0.5}, compression)
        flat = trainer._flat
        assert flat is not None, "the flat-buffer path was not taken"
        with mx.autograd.record():
            loss = (net(x) ** 2).sum()
        loss.backward()
        for name, p in params.items():
            out[f"before:{name}"] = p.data().asnumpy()
            out[f"grad:{name}"] = p.grad().asnumpy()
        # Every gradient lives in the buffer: the buffer's values are the gradients'.
        out[f"flat_matches:{compression}"] = np.array(np.array_equal(
            flat.asnumpy(), np.concatenate([p.grad().asnumpy().ravel()  # the trainer's order
                                            for p in trainer._params])))
        trainer.step(1)
        for name, p in params.items():
            out[f"{compression}:{name}"] = p.data().asnumpy()
    np.savez(os.path.join(out_dir, f"rank{backend.rank}.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
