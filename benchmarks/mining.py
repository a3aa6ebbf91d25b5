"""The online-mining recipes on 4 Horovod ranks: local against global mining, and against
PyTorch + pytorch-metric-learning measured in the same run.

    python -m benchmarks.mining [--quick] [--epochs 3] [--data-root DIR] [--out FILE]

Runs ``launch/horovod.sh 4 -- --config configs/fashion_mnist_mining.yaml`` (P x K 10 x 8
semi-hard batches per rank, mined on each rank: ``sampler.scope: local``) and the same
with ``configs/fashion_mnist_global_mining.yaml`` (mined over the global batch of all 4
ranks, 320 rows), one after the other, ``--epochs`` epochs each, evaluation only after the
last, no projector and no checkpoints. Per epoch, metrics.json gives the training time
(``time_train_s``) and the images/s (``triplets_per_s``: for P x K batches, the images of
all ranks' batches per second of training); the first epoch is left out of the medians
(graph compilation). Fewer epochs than the recipes' 30 change the cosine schedule, not
the cost of a step. Then ``benchmarks/torch_pml.py`` from the peers' venv
(``benchmarks/peer.py``): the semi-hard P x K 10 x 8 recipe in pytorch-metric-learning,
one process with all cores.

Targets (issue 18): the local recipe >= 1.5 x the PyTorch + pytorch-metric-learning
images/s of the same run; global mining's training time per epoch <= 1.3 x local
mining's.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from typing import List, Optional, Sequence

from . import common, peer
from .end_to_end import timed

TARGETS = {"vs_pytorch_pml": 1.5, "global_vs_local": 1.3}
RECIPES = {"local": "configs/fashion_mnist_mining.yaml",
           "global": "configs/fashion_mnist_global_mining.yaml"}


def run_recipe(args, name: str, work: str, np_: int, epochs: int) -> dict:
    """One recipe on ``np_`` ranks through the launch script: its epochs' rates."""
    run_dir = os.path.join(work, name)
    overrides = [f"output.dir={run_dir}", f"train.epochs={epochs}", f"eval.every={epochs}",
                 "eval.projector=false", "checkpoint.keep=0"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.quick:
        overrides += ["data.limit_train=600", "data.limit_test=300", "sampler.p=4",
                      "sampler.k=4"]
    env = common.child_env()
    env.pop("OMP_NUM_THREADS", None)   # as a user runs it: the launch script chooses
    wall = timed(["bash", "launch/horovod.sh", str(np_), "--", "--config", RECIPES[name],
                  *overrides], env, 1800, log=os.path.join(work, f"{name}.log"))
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        rows = json.load(fh)["epochs"]
    steady = rows[1:] or rows
    return {"wall_s": wall, "images_per_s_by_epoch": [r["triplets_per_s"] for r in rows],
            "train_s_by_epoch": [r["time_train_s"] for r in rows],
            "images_per_s": statistics.median(r["triplets_per_s"] for r in steady),
            "train_s": statistics.median(r["time_train_s"] for r in steady)}


def measure(args) -> dict:
    work = tempfile.mkdtemp(prefix="bench-mining-", dir=args.workdir)
    np_ = 2 if args.quick else 4
    epochs = 2 if args.quick else args.epochs
    out = {"processes": np_, "epochs": epochs,
           "recipes": {name: run_recipe(args, name, work, np_, epochs) for name in RECIPES}}
    loc, glo = out["recipes"]["local"], out["recipes"]["global"]
    out["global_vs_local"] = glo["train_s"] / loc["train_s"]
    if not args.no_peer:
        try:
            p, k = (4, 4) if args.quick else (10, 8)
            out["pml"] = peer.pml_recipe(peer.peer_python(args.peer_venv), args, p, k,
                                         os.cpu_count() or 1)
            out["vs_pytorch_pml"] = loc["images_per_s"] / out["pml"]["median"]
        except RuntimeError as exc:
            out["pml_error"] = str(exc)[-500:]
    return out


def rows(doc: dict) -> List[common.Row]:
    R, T = common.Row, TARGETS
    out = []
    for name, r in doc["recipes"].items():
        out.append(R("mining", f"P x K semi-hard recipe, {name} mining, {doc['processes']} "
                               f"ranks, {doc['epochs']} epochs",
                     f"{r['images_per_s']:,.0f} images/s, {r['train_s']:.2f} s training per "
                     "epoch (median of epochs 2..; " +
                     ", ".join(f"{x:.2f}" for x in r["train_s_by_epoch"]) + " s)"))
    out.append(common.target_row("mining", "global / local mining, training time per epoch",
                                 doc["global_vs_local"], T["global_vs_local"], "{:.2f}x",
                                 higher=False))
    if "pml" in doc:
        m = doc["pml"]
        out.append(R("mining", f"PyTorch + pytorch-metric-learning {m['pml']} semi-hard "
                               f"P x K {m['p']} x {m['k']}, 1 process, {m['threads']} threads, "
                               "same run", f"{m['median']:,.0f} images/s "
                                           f"({m['cpu_us_per_item']:.1f} CPU us/image)"))
        out.append(common.target_row("mining", "local recipe / PyTorch + pytorch-metric-learning",
                                     doc["vs_pytorch_pml"], T["vs_pytorch_pml"], "{:.2f}x"))
    elif "pml_error" in doc:
        out.append(R("mining", "PyTorch + pytorch-metric-learning", "not measured: " +
                     doc["pml_error"].strip().splitlines()[-1][:120]))
    return out


def parse_args(argv: Optional[Sequence[str]]):
    p = common.driver_parser("mining", __doc__, "tiny data, 2 ranks: the smoke test")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data-root", help="Fashion-MNIST-format IDX directory")
    p.add_argument("--workdir", help="where the runs write (default: a temporary directory)")
    p.add_argument("--synthetic", action="store_true", help="synthetic data for the peer")
    p.add_argument("--train-size", type=int, default=0, help="first N rows for the peer")
    peer.add_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_driver("mining", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
