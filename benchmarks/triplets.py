"""Triplet generation: the seed article's loop against the vectorised sampler.

    python -m benchmarks.triplets [--quick] [--synthetic] [--out FILE]

The seed's ``create_pairs`` loop (kept as ``triplets.seed_create_pairs``, the reference,
timed once) against the vectorised ``triplets.create_pairs`` on the training labels (the
class index built inside the call, as the loop builds its own); also one rank's shard at
world size 4 against the full set, both from a prebuilt ``ClassIndex`` as training does
every epoch (about 1/4 expected). Target: speed-up >= 200x.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from typing import List, Optional, Sequence

from . import common

TARGETS = {"speedup": 200.0}


def measure(args) -> dict:
    from dist_triplet.triplets import ClassIndex, create_pairs, seed_create_pairs

    _, labels, source = common.load_data(args.synthetic, args.train_size)
    reps = 3 if args.quick else 7

    def timed(fn):
        return common.median_time(fn, reps)

    t0 = time.perf_counter()
    ref = seed_create_pairs(labels, random.Random(0))
    t_seed = time.perf_counter() - t0
    vec = create_pairs(labels, seed=0)
    t_vec = timed(lambda: create_pairs(labels, seed=0))
    index = ClassIndex(labels)
    t_full = timed(lambda: create_pairs(index, seed=0, epoch=1))
    t_shard = common.median([timed(lambda r=r: create_pairs(index, seed=0, epoch=1, rank=r,
                                                            world_size=4)) for r in range(4)])
    return {"data": source, "labels": int(len(labels)), "triplets_seed": int(len(ref)),
            "triplets_vectorised": int(len(vec)), "seed_loop_s": t_seed, "vectorised_s": t_vec,
            "speedup": t_seed / t_vec, "full_epoch_s": t_full, "shard_w4_s": t_shard,
            "shard_w4_fraction": t_shard / t_full}


def rows(doc: dict) -> List[common.Row]:
    R = common.Row
    return [
        R("triplets", f"seed loop (reference), {doc['labels']:,} labels", f"{doc['seed_loop_s']:.2f} s"),
        R("triplets", "vectorised create_pairs", f"{1e3 * doc['vectorised_s']:.1f} ms"),
        common.target_row("triplets", "speed-up", doc["speedup"], TARGETS["speedup"], "{:,.0f}x"),
        R("triplets", "rank shard at W=4 / full set", f"{doc['shard_w4_fraction']:.2f} (~0.25 expected)"),
    ]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = common.driver_parser("triplets", __doc__)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--train-size", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_driver("triplets", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
