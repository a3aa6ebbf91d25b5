"""The main job's training speed against one process of the same step on the same cores.

    python -m benchmarks.main_job [--quick] [--np N] [--epochs 3] [--data-root DIR]

Two measurements, one after the other:

1. **One process**: ``benchmarks.step``'s product worker (``engine.run_epoch`` over the
   default config's step, B = 256, local backend, every core's thread), triplets/s.
2. **The main job's training**: ``launch/run.sh`` as a user runs it (the ranks and threads
   it chooses from the host and says in its log; ``--np N``: ``NP=N launch/run.sh``, N
   Horovod ranks) for ``--epochs`` epochs with evaluation after the last only, no
   projector, no checkpoints; the training throughput of the whole job per epoch from
   metrics.json (``triplets_per_s``), the median of epochs 2.. (the first compiles the
   graphs).

Target (issue 18): the main job's training >= 0.9 x the one-process step.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
from typing import List, Optional, Sequence

from . import common
from .end_to_end import run_main_job

TARGETS = {"main_vs_one": 0.9}


def measure(args) -> dict:
    threads = os.cpu_count() or 1
    sz = dict(warmup=3, windows=3, window_steps=4) if args.quick else \
        dict(warmup=40, windows=9, window_steps=60)
    batch = 16 if args.quick else 256
    one = common.run_worker(common.module_cmd(
        "step", "worker", "product", "--batch-size", str(batch), "--threads", str(threads),
        "--train-size", str(600 if args.quick else 0), "--warmup", str(sz["warmup"]),
        "--windows", str(sz["windows"]), "--window-steps", str(sz["window_steps"]),
        *(["--synthetic"] if args.quick else [])), common.child_env(threads), timeout=900)[0]
    work = tempfile.mkdtemp(prefix="bench-main-", dir=args.workdir)
    epochs = 2 if args.quick else args.epochs
    overrides = [f"train.epochs={epochs}", f"eval.every={epochs}", "eval.projector=false",
                 "checkpoint.keep=0"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.quick:
        overrides += ["data.limit_train=600", "data.limit_test=300", f"train.batch_size={batch}"]
    job = run_main_job(args.np, work, overrides)
    rates = [r["triplets_per_s"] for r in job["metrics"]["epochs"]]
    main = statistics.median(rates[1:] or rates)
    return {"one_process": one, "threads": threads, "processes": job["ranks"], "epochs": epochs,
            "main_rates": rates, "main_triplets_per_s": main, "main_wall_s": job["wall_s"],
            "launcher": job["chose"], "main_vs_one": main / one["median"]}


def rows(doc: dict) -> List[common.Row]:
    R, o = common.Row, doc["one_process"]
    return [
        R("main job", f"one process of the product step, {doc['threads']} threads",
          f"{o['median']:,.0f} triplets/s ({o['cpu_us_per_item']:.1f} CPU us/triplet)"),
        R("main job", f"main job training, {doc['processes']} rank(s) (launch/run.sh)",
          f"{doc['main_triplets_per_s']:,.0f} triplets/s (median of epochs 2..; " +
          ", ".join(f"{x:,.0f}" for x in doc["main_rates"]) + ")" +
          ("; " + " ".join(doc["launcher"])[:400] if doc["launcher"] else "")),
        common.target_row("main job", "main job training / one process", doc["main_vs_one"],
                          TARGETS["main_vs_one"], "{:.2f}x"),
    ]


def parse_args(argv: Optional[Sequence[str]]):
    p = common.driver_parser("main_job", __doc__, "tiny data: the smoke test")
    p.add_argument("--np", type=int, default=0,
                   help="NP for launch/run.sh (default 0: the ranks run.sh chooses)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data-root", help="Fashion-MNIST-format IDX directory")
    p.add_argument("--workdir", help="where the run writes (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_driver("main_job", parse_args(argv), measure, rows)


if __name__ == "__main__":
    sys.exit(main())
