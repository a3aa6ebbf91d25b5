"""Every benchmark section in one run: one table with each target and its status, one JSON.

    python -m benchmarks.run [--quick] [--out DIR] [--only step,scaling,...]

Sections, each also runnable alone as ``python -m benchmarks.<section>``:

    triplets     the seed's create_pairs loop vs the vectorised sampler
    step         one process: product step, GEMM roofline, PyTorch
    scaling      Horovod 1 vs 2 ranks vs two independent processes
    main_job     the main job's training (launch/run.sh) against one process of the step
    end_to_end   set-up check, main job vs the seed article's program, training share,
                 per-epoch evaluation, end-of-run work
    mining       the P x K mining recipes on 4 ranks: local vs global mining, vs
                 PyTorch + pytorch-metric-learning
    conv_step    one process: the convolutional recipe's step beside the MLP's, against
                 the convolutional layers' roofline

The peers (PyTorch's seed recipe in ``step``, pytorch-metric-learning's semi-hard recipe
in ``mining``) run from their own venv (``benchmarks/peer.py``, made on first use) inside
the section whose ratio they divide, minutes from the product's number.

Every section records how many cores *other* processes used while it ran (/proc/stat
minus this process tree's CPU): the machines here are shared, and a number measured
beside someone else's job says so in the header line. Results go to ``DIR/bench.json``
(default ``runs/bench-YYYYmmdd-HHMMSS``); the printed table is the README's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from . import common, conv_step, end_to_end, main_job, mining, peer, scaling, step, triplets

SECTIONS = {"triplets": triplets, "step": step, "scaling": scaling, "main_job": main_job,
            "end_to_end": end_to_end, "mining": mining, "conv_step": conv_step}
NEEDS_IDX = ("main_job", "end_to_end", "mining")   # run the real programs, which read IDX files


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few steps and tiny jobs: for development and the smoke test")
    p.add_argument("--out", help="directory for bench.json (default runs/bench-<timestamp>)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="triplets per step (per rank)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of the one-process step (default: the number of cores)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic data for triplets/step/scaling even when Fashion-MNIST is here")
    p.add_argument("--train-size", type=int, default=0, help="first N training rows (0 = all)")
    p.add_argument("--data-root", help="Fashion-MNIST-format IDX directory for the programs "
                                       "that end_to_end and mining run")
    peer.add_args(p)
    p.add_argument("--np", type=int, default=0, help="NP for launch/run.sh in main_job and "
                   "end_to_end (default 0: the ranks run.sh chooses from the host)")
    p.add_argument("--timeline", help="also record a Horovod timeline of 2 ranks here")
    p.add_argument("--cycle-times", default="",
                   help="extra 2-rank runs at these HOROVOD_CYCLE_TIME values (ms)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the mining recipes and of the main job (main_job)")
    p.add_argument("--rounds", type=int, default=3, help="scaling rounds (median round)")
    p.add_argument("--workdir", help="where main_job, end_to_end and mining write their runs")
    args = p.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = args.out or os.path.join("runs", f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    t_start, run_load = time.perf_counter(), common.ForeignLoad()
    doc = {"meta": dict(common.machine_info(), quick=args.quick, batch_size=args.batch_size,
                        threads=args.threads, sections=args.sections)}
    have_idx = bool(args.data_root) or (not args.synthetic and os.path.isdir(common.FASHION_MNIST_ROOT))
    rows, foreign, skipped = [], {}, {}
    for name in args.sections:
        if name in NEEDS_IDX and not have_idx:
            skipped[name] = "needs Fashion-MNIST IDX files (--data-root)"
            continue
        module = SECTIONS[name]
        t, load = time.perf_counter(), common.ForeignLoad()
        doc[name] = module.measure(args)
        foreign[name] = doc[name]["foreign_cores"] = load.cores()
        rows += module.rows(doc[name])
        print(f"[bench] {name}: {time.perf_counter() - t:.1f} s, other processes "
              f"{foreign[name]:.2f} cores", file=sys.stderr, flush=True)
        common.write_json(os.path.join(out_dir, "bench.json"), doc)  # partial results survive
    meta = doc["meta"]
    meta.update(wall_s=time.perf_counter() - t_start, foreign_cores=run_load.cores(),
                foreign_cores_by_section=foreign, skipped=skipped,
                loadavg_end=list(os.getloadavg()))
    path = os.path.join(out_dir, "bench.json")
    common.write_json(path, doc)
    print(f"dist_triplet benchmarks, {meta['date']}, {meta['cpu']} x {meta['nproc']}, "
          f"{meta['wall_s']:.0f} s{', --quick' if args.quick else ''}; other processes used "
          f"{meta['foreign_cores']:.2f} cores on average ("
          + ", ".join(f"{k} {v:.2f}" for k, v in foreign.items()) + ")"
          + "".join(f"; {k} skipped: {v}" for k, v in skipped.items()) + "\n")
    print(common.table(rows))
    print(f"\n{os.path.abspath(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
