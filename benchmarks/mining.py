"""The online-mining recipe's training speed on 4 Horovod ranks, in images per second.

    python -m benchmarks.mining [--quick] [--epochs 3] [--data-root DIR] [--out FILE]

Runs ``launch/horovod.sh 4 -- --config configs/fashion_mnist_mining.yaml`` (P x K 10 x 8
semi-hard batches per rank, Adam, cosine) for ``--epochs`` epochs with evaluation only
after the last, no projector and no checkpoints, and reads the images/s of each epoch
from its metrics.json (``triplets_per_s``: for P x K batches, the images of all ranks'
batches per second of training). The first epoch is left out of the median (graph
compilation). Target: >= 1.5 x the PyTorch + pytorch-metric-learning figure of issue 12
(semi-hard, P x K 10 x 8, one process: 25,500 images/s). Fewer epochs than the recipe's 30
change the cosine schedule, not the cost of a step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import List, Optional, Sequence

from . import common
from .end_to_end import timed

PYTORCH_PML = 25500.0        # images/s, issue 12 (PyTorch + pytorch-metric-learning)
TARGETS = {"vs_pytorch_pml": 1.5}


def measure(args) -> dict:
    work = tempfile.mkdtemp(prefix="bench-mining-", dir=args.workdir)
    run_dir = os.path.join(work, "run")
    np_ = 2 if args.quick else 4
    epochs = 2 if args.quick else args.epochs
    overrides = [f"output.dir={run_dir}", f"train.epochs={epochs}", f"eval.every={epochs}",
                 "eval.projector=false", "checkpoint.keep=0"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.quick:
        overrides += ["data.limit_train=600", "data.limit_test=300", "sampler.p=4",
                      "sampler.k=4"]
    env = common.child_env()
    env.pop("OMP_NUM_THREADS", None)
    wall = timed(["bash", "launch/horovod.sh", str(np_), "--", "--config",
                  "configs/fashion_mnist_mining.yaml", *overrides], env, 1800,
                 log=os.path.join(work, "mining.log"))
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        rows = json.load(fh)["epochs"]
    rates = [r["triplets_per_s"] for r in rows]
    steady = rates[1:] or rates
    return {"processes": np_, "epochs": epochs, "wall_s": wall, "images_per_s_by_epoch": rates,
            "images_per_s": statistics.median(steady),
            "pytorch_pml_issue": PYTORCH_PML,
            "vs_pytorch_pml": statistics.median(steady) / PYTORCH_PML}


def rows(doc: dict) -> List[common.Row]:
    return [
        common.Row("mining", f"P x K semi-hard recipe, {doc['processes']} ranks, "
                             f"{doc['epochs']} epochs", f"{doc['images_per_s']:,.0f} images/s "
                             "(median of epochs 2..; "
                             + ", ".join(f"{x:,.0f}" for x in doc["images_per_s_by_epoch"]) + ")"),
        common.target_row("mining", "recipe / PyTorch + pytorch-metric-learning, reference figure "
                                    f"({doc['pytorch_pml_issue']:,.0f} images/s)",
                          doc["vs_pytorch_pml"], TARGETS["vs_pytorch_pml"], "{:.2f}x"),
    ]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = common.driver_parser("mining", __doc__, "tiny data, 2 ranks: the smoke test")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data-root", help="Fashion-MNIST-format IDX directory")
    p.add_argument("--workdir", help="where the run writes (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_driver("mining", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
