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

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config
from .data import load_dataset, subset


def devices_per_process(cfg: Config) -> Optional[int]:
    """Devices (workers) each process drives, when known without MXNet: 1 for local and
    horovod, N for kvstore 'cpu:N' or a GPU id list; None for kvstore 'all' (GPU count)."""
    d = cfg.distributed
    if d.backend != "kvstore":
        return 1
    if d.devices.startswith("cpu:"):
        try:
            return max(1, int(d.devices.split(":", 1)[1]))
        except ValueError:
            return None  # the ranks report the malformed value
    if d.devices == "all":
        return None
    return len([x for x in d.devices.split(",") if x.strip()]) or None


def preflight(cfg: Config, processes: int = 1) -> str:
    """Validate ``cfg`` and its data for a job of ``processes`` processes; write nothing.

    Returns:
        A one-line summary of what was checked.

    Raises:
        ValueError / FileNotFoundError with the message ``train.train`` would give
        (``ConfigError`` is a ValueError).
    """
    from .train import EpochSampler, _check_dir_path, check_split

    if processes < 1:
        raise ValueError(f"--processes={processes} must be >= 1")
    train_split = subset(load_dataset(cfg.data.dataset, cfg.data.root, train=True),
                         cfg.data.limit_train)
    check_split(train_split, "training")
    test_split = subset(load_dataset(cfg.data.dataset, cfg.data.root, train=False),
                        cfg.data.limit_test)
    check_split(test_split, "test")
    if test_split.images.shape[1] != train_split.images.shape[1]:
        raise ValueError(f"test images ({test_split.source}) have {test_split.images.shape[1]} "
                         f"pixels, training images ({train_split.source}) "
                         f"{train_split.images.shape[1]}: both splits must share one image size")
    devices = devices_per_process(cfg)
    steps = None
    if devices is not None:
        steps = EpochSampler(cfg, train_split.labels, 0, processes, devices).steps

    run_dir = cfg.output.dir
    if run_dir is None and cfg.checkpoint.resume not in (None, "auto"):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint.resume)))
    if run_dir is None:
        _check_dir_path(cfg.output.root)  # a new timestamped directory under it
    else:
        _check_dir_path(run_dir)
        resume = ckpt.find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"),
                                  cfg.to_dict())
        if resume:
            meta = ckpt.read_meta(resume)
            if meta["epoch"] + 1 > cfg.train.epochs:
                raise ValueError(f"{resume}: checkpoint is after epoch {meta['epoch'] + 1}; "
                                 f"train.epochs={cfg.train.epochs} leaves nothing to train "
                                 f"(give train.epochs > {meta['epoch'] + 1} to continue)")
            if devices is not None:
                ckpt.check_compatible(meta, cfg.to_dict(), resume, processes=processes,
                                      devices=devices, steps=steps)
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
