"""Pre-flight check: ``python -m dist_triplet.check --processes N --config FILE [section.key=value ...]``.

The launch scripts run it once, before ``horovodrun`` starts any rank, with the arguments
the ranks will get. Under horovodrun a bad config or a broken data file would otherwise be
reported by every rank, followed by horovodrun's own traceback (exit status 1); here it is
one line, ``error: ...`` naming the file, key or value, and exit status 2 (issue 14).

It checks, with the same functions ``train.train`` uses, everything that fails before a
run writes anything: the config (keys, types, ranges), both data splits (IDX headers and
payloads, labels, at least 2 classes of at least 2 samples, one image size), that a batch
fits each worker's shard at the given world size (offline and P x K samplers),
``output.dir`` / ``output.root`` not being files, and, for ``checkpoint.resume``, the
checkpoint it would continue from (complete, same computation, same world size). It
writes nothing and imports neither MXNet nor Horovod (about 0.1 s plus reading the data),
so it cannot check devices (GPUs); the ranks still do, and still validate everything
again. On several hosts it sees the launching host's files only.

Exit status: 0 (one line on stderr saying what was checked), 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .config import Config, ConfigError, load_config, parse_devices


class PlannedJob:
    """The shape of a job not started yet, as ``train``'s helpers read it from a
    ``dist.Backend``: rank 0 of ``num_processes`` processes with ``devices`` devices each.
    ``contexts`` holds placeholders: the devices themselves are chosen by the ranks."""

    rank = 0

    def __init__(self, num_processes: int, devices: int):
        self.num_processes = num_processes
        self.contexts = [None] * devices
        self.num_workers = num_processes * devices

    def worker_rank(self, device: int) -> int:
        return self.rank * len(self.contexts) + device


def devices_per_process(cfg: Config) -> Optional[int]:
    """Devices each process drives, when known without MXNet: 1 for local and horovod, N
    for kvstore 'cpu:N' or N GPU ids; None for kvstore 'all' (the GPU count of a host).

    Raises:
        ValueError: a malformed ``distributed.devices`` (``config.parse_devices``).
    """
    if cfg.distributed.backend != "kvstore":
        return 1
    kind, value = parse_devices(cfg.distributed.devices)
    if kind == "cpu":
        return value
    return len(value) if value else None  # 'all' (None) or no ids: the host decides


def preflight(cfg: Config, processes: int = 1) -> str:
    """Validate ``cfg`` and its data for a job of ``processes`` processes; write nothing.

    The checks are ``train.train``'s own, up to the point where it would create the run
    directory: ``train.load_splits``, ``train.build_sampler`` and
    ``train.read_resume_meta`` with a :class:`PlannedJob` in place of the backend, and
    ``rundir.requested_run_dir`` / ``find_resume`` as rank 0 would call them.

    Returns:
        A one-line summary of what was checked.

    Raises:
        ValueError / FileNotFoundError with the message ``train.train`` would give
        (``ConfigError`` is a ValueError).
    """
    from .rundir import _check_dir_path, find_resume, requested_run_dir
    from .train import build_sampler, load_splits, read_resume_meta

    if processes < 1:
        raise ValueError(f"--processes={processes} must be >= 1")
    train_split, test_split = load_splits(cfg)
    devices = devices_per_process(cfg)
    job = PlannedJob(processes, devices) if devices is not None else None
    sampler = build_sampler(cfg, job, train_split.labels) if job else None
    steps = sampler.steps if sampler else None

    run_dir = requested_run_dir(cfg)
    if run_dir is None:
        _check_dir_path(cfg.output.root)  # a new timestamped directory under it
    else:
        _check_dir_path(run_dir)
        resume = find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"),
                             cfg.to_dict())
        if resume and job:
            read_resume_meta(cfg, resume, job, steps, sampler.per_step * processes)
    return (f"check: config and data ok ({len(train_split)} train / {len(test_split)} test "
            f"images, {processes} process(es)"
            + (f", {steps} steps per epoch" if steps is not None else "") + ")")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dist_triplet.check",
        description="Validate a training config and its data once, before starting ranks.")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="processes the job will start (horovodrun -np); default 1")
    parser.add_argument("--config", help="YAML config, as given to dist_triplet.train")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, as given to dist_triplet.train")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    args = parse_args(argv)
    try:
        summary = preflight(load_config(args.config, args.overrides), args.processes)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(summary, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
