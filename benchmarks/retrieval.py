"""Seconds of the per-epoch evaluation's retrieval on the main job's shapes.

    python -m benchmarks.retrieval [--repeats 5] [--trained RUN/model]

Embeddings: the 10,000 Fashion-MNIST test images through the main job's network (the
default MLP [256, 128], final ReLU), randomly initialised with seed 0 (it has the trained
embedding's sparsity pattern), or a trained export (``--trained``). Timed, best of
``--repeats`` (wall and CPU seconds of this process, all threads): the embedding; P@1
leave-one-out (what every epoch's evaluation computes); the whole per-epoch evaluation
after embedding (``evaluate_embeddings``: P@1, triplet accuracy, collapse check); the
full set (R-Precision and MAP@R too: last epoch); the raw-pixel P@1 (784-D). The budget:
per-epoch evaluation <= 15% of that epoch's training (about 1.5-2.5 s for the main job).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval",
                                description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trained", help="an export directory (RUN/model) instead of seed 0")
    args = p.parse_args(argv)
    import mxnet as mx

    from dist_triplet.data import as_float, load_dataset
    from dist_triplet.metrics import evaluate_embeddings
    from dist_triplet.model import build_embedding_net, embed, initialize
    from dist_triplet.retrieval.metrics import retrieval_metrics
    from dist_triplet.triplets import create_pairs

    test = load_dataset("fashion_mnist", train=False)
    if args.trained:
        from dist_triplet.retrieval.model import Model
        net = Model(args.trained).block
    else:
        net = build_embedding_net(test.images.shape[1], [256, 128])
        initialize(net, 0.01, [mx.cpu()], 0)
    emb = embed(net, test.images, mx.cpu(), 2048)
    trip = create_pairs(test.labels, seed=0)
    pixels = as_float(test.images)
    runs = {
        "embed_s": lambda: embed(net, test.images, mx.cpu(), 2048),
        "precision_at_1_s": lambda: retrieval_metrics(emb, test.labels,
                                                      metrics=("precision_at_1",)),
        "evaluate_epoch_s": lambda: evaluate_embeddings(emb, test.labels, trip,
                                                        metrics=("precision_at_1",)),
        "retrieval_full_s": lambda: retrieval_metrics(emb, test.labels),
        "raw_precision_at_1_s": lambda: retrieval_metrics(pixels, test.labels,
                                                          metrics=("precision_at_1",)),
    }
    out = {"n": int(emb.shape[0]), "dim": int(emb.shape[1]), "load_1min": os.getloadavg()[0]}
    for key, fn in runs.items():
        best = None
        for _ in range(args.repeats if key != "retrieval_full_s" else 1):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            got = (time.perf_counter() - t0, time.process_time() - c0)
            best = got if best is None or got[0] < best[0] else best
        out[key] = {"wall": round(best[0], 3), "cpu": round(best[1], 3)}
        print(f"{key:22s} wall {best[0]:.3f} s  cpu {best[1]:.3f} s", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
