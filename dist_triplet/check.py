"""Pre-flight check: ``python -m dist_triplet.check --processes N --config FILE [section.key=value ...]``.

The launch scripts run it once, before ``horovodrun`` starts any rank, with the arguments
the ranks will get. Under horovodrun a bad config or a broken data file would otherwise be
reported by every rank, followed by horovodrun's own traceback (exit status 1); here it is
one line, ``error: ...`` naming the file, key or value, and exit status 2 (issue 14).

It checks, with the same plan step training uses (plan.py), everything that fails before a
run writes anything: the config (keys, types, ranges), both data splits (IDX headers and
payloads, labels, at least 2 classes of at least 2 samples, one image size), that a batch
fits each worker's shard at the given world size (offline and P x K samplers),
``output.dir`` / ``output.root`` not being files, for ``checkpoint.resume``, the
checkpoint it would continue from (complete, same computation, same world size), and the
network against the data (``augment`` on images only; a convolutional backbone on images
large enough for its downsampling; ``model.weights`` shapes, naming the parameter and both
shapes). It writes nothing and imports neither MXNet nor Horovod (about 0.1 s plus reading
the data) -- except for a convolutional backbone or a weights file, whose checks need
MXNet's shape inference (~1 s more). It cannot check devices (GPUs); the ranks still do,
and still validate everything again. On several hosts it sees the launching host's files only.

Exit status: 0 (one line on stderr saying what was checked), 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from .config import ConfigError, ModelConfig, load_config
from .configfile import CommandLine
from .plan import data_digest, make_plan, read_resume_meta
from .rundir import check_dir_path, check_run_config, check_unlocked, resume_for


def preflight(cfg, processes: int = 1) -> str:
    """Validate ``cfg`` and its data for a job of ``processes`` processes; write nothing.

    The checks are training's own, up to the point where it would create the run
    directory: ``plan.make_plan`` (backend, data, sampler) for a launcher of
    ``processes`` processes, and, as rank 0 would, ``rundir.check_dir_path``,
    ``rundir.resume_for`` and ``plan.read_resume_meta``.

    Returns:
        A one-line summary of what was checked.

    Raises:
        ValueError / FileNotFoundError with the message training would give
        (``ConfigError`` is a ValueError).
    """
    plan = make_plan(cfg, processes=processes)
    image_shape = plan.train.image_shape
    resume = None
    if plan.run_dir is None:
        check_dir_path(cfg.output.root)  # a new timestamped directory under it
    else:
        check_dir_path(plan.run_dir)
        check_unlocked(plan.run_dir)
        resume = resume_for(cfg, plan.run_dir)
        if resume and plan.job:
            read_resume_meta(cfg, resume, plan.job, plan.steps, plan.global_batch,
                             data_digest(plan.train))
    model = dataclasses.replace(cfg.model, weights=None) if resume else cfg.model  # as train
    if (model.backbone != "mlp" or model.weights or model.pool != "avg"
            or list(model.channels) != ModelConfig().channels):
        # The network's own checks need MXNet (shape inference, the weights file): imported
        # for convolutional backbones, weight files, model.pool and model.channels only.
        from .backbone import check_network
        check_network(model, plan.train.width, image_shape)
    return (f"check: config and data ok ({len(plan.train)} train / {len(plan.test)} test "
            f"images, {processes} process(es)"
            + (f", {plan.steps} steps per epoch" if plan.steps is not None else "") + ")"
            + "".join(f"\nwarning: {line}" for line in plan.warnings))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = CommandLine(
        prog="python -m dist_triplet.check",
        description="Validate a training config and its data once, before starting ranks.")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="processes the job will start (horovodrun -np); default 1")
    parser.add_argument("--config", help="YAML config, as given to dist_triplet.train")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, as given to dist_triplet.train")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 Ctrl-C)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_config(args.config, cfg, args.overrides)
        summary = preflight(cfg, args.processes)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:         # while the data are read: nothing was written
        print("interrupted: the check stopped; nothing was written", file=sys.stderr, flush=True)
        return 130
    print(summary, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
