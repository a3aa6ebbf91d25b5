"""Training entry point: ``python -m dist_triplet.train --config FILE [section.key=value ...]``.

The same code runs in every mode; the launch scripts choose the backend:

* single device (debug):  ``launch/debug.sh`` (``distributed.backend=local``, the default)
* Horovod, N processes:    ``launch/horovod.sh 4 -- --config configs/fashion_mnist.yaml``
  (``horovodrun -np 4 python -m dist_triplet.train ... distributed.backend=horovod``)
* kvstore, N devices:      ``launch/kvstore.sh cpu:2 -- --config ...``
  (``distributed.backend=kvstore distributed.devices=cpu:2``)

This module is orchestration only: it reads and checks the data, resolves the run
directory and the checkpoint to resume from (rundir.py), builds the model, the trainer
(dist.py's backend) and the step (engine.py), and runs the epochs, evaluating on rank 0
(evaluate.py) and handing each epoch's row to the rank-0 Recorder (rundir.py). Every rank
runs the same number of steps per epoch (equal shards, see ``triplets.create_pairs``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from . import checkpoint as ckpt
from . import schedule
from .config import Config, ConfigError, config_from_dict, load_config, parse_devices
from .data import Split, check_sampler_classes, describe, load_data
from .triplets import EpochSampler

log = logging.getLogger("dist_triplet")

StepHook = Callable[[int, int], None]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message says where."""


@dataclass
class RunResult:
    """What ``train`` leaves behind, for callers and tests.

    metrics: the final epoch's row (rank 0; {} on other ranks).
    net, trainer, backend: the trained network, its Trainer and the distribution backend.
    run_dir: the run directory (the same string on every rank).
    """
    metrics: dict
    net: object
    trainer: object
    backend: object
    run_dir: str


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, WARNING elsewhere, so only rank 0 prints progress."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)


def load_splits(cfg: Config) -> tuple:
    """(train, test) splits of ``cfg.data``, checked (``data.load_data``: formats, split,
    class rules, one width) and with enough classes for the sampler. Every rank reads the
    test set too, so a broken file fails on all ranks alike instead of leaving the others
    waiting in a collective."""
    train_split, test_split = load_data(cfg.data)
    check_sampler_classes(train_split, cfg.sampler.kind, cfg.sampler.p)
    return train_split, test_split


def log_data(train_split: Split, test_split: Split, cache_dir: Optional[str]) -> None:
    """One line per split, and a hint when several local ranks each hold a large copy."""
    log.info("training data: %s", describe(train_split))
    log.info("test data: %s", describe(test_split))
    local = int(os.environ.get("HOROVOD_LOCAL_SIZE") or 1)
    if not cache_dir and local > 1 and train_split.images.nbytes > 2 ** 30:
        log.warning("each of the %d local ranks holds its own %.1f GiB copy of the training "
                    "data; data.cache_dir=DIR would share one memory-mapped copy per host",
                    local, train_split.images.nbytes / 2 ** 30)


def read_resume_meta(cfg: Config, resume_path: str, backend, steps: int, global_batch: int):
    """The checkpoint's record, checked against this run (``checkpoint.check_compatible``).

    When "schedule" keys changed, logs an info line naming them, and a warning only when
    the learning rate of some remaining global step (``(meta.epoch + 1) * steps`` up to
    ``train.epochs * steps``) differs between the checkpoint's config and this one
    (``schedule.first_difference``): e.g. a longer train.epochs on a constant schedule
    without warm-up changes nothing that is left to run. ``train`` calls it on rank 0 only
    (``dist.decide_on_rank0``); every rank loads the checkpoint's parameters, so the path
    must be on a shared file system."""
    meta = ckpt.read_meta(resume_path)
    if meta.epoch + 1 > cfg.train.epochs:
        raise ValueError(f"{resume_path}: checkpoint is after epoch {meta.epoch + 1}; "
                         f"train.epochs={cfg.train.epochs} leaves nothing to train (give "
                         f"train.epochs > {meta.epoch + 1} to continue)")
    changed = ckpt.check_compatible(meta, cfg.to_dict(), resume_path,
                                    processes=backend.num_processes,
                                    devices=len(backend.contexts), steps=steps)
    if changed:
        log.info("resuming with changed schedule keys: %s", "; ".join(changed))
        old_cfg = config_from_dict(meta.config)
        start, stop = (meta.epoch + 1) * steps, cfg.train.epochs * steps
        step = schedule.first_difference(
            schedule.from_config(old_cfg.optim, old_cfg.train.epochs, steps, global_batch),
            schedule.from_config(cfg.optim, cfg.train.epochs, steps, global_batch), start, stop)
        if step is not None:
            log.warning("resuming with a changed schedule (%s): the learning rate of global "
                        "step %d (epoch %d) and maybe later ones differs from the checkpoint's "
                        "config, so the run will not match an uninterrupted one with the old "
                        "values", "; ".join(changed), step, step // steps + 1)
    return meta


def evaluate_if_due(evaluator, cfg: Config, epoch: int, net, ctx, force: bool = False):
    """``(results, embeddings)`` every ``eval.every`` epochs, after the last, or when
    ``force``; ``({}, None)`` otherwise and off rank 0 (``evaluator`` None). The results
    include ``time_eval_s``."""
    due = force or (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs
    if evaluator is None or not due:
        return {}, None
    t_eval = time.perf_counter()
    res, emb = evaluator(net, ctx, epoch)
    return dict(res, time_eval_s=time.perf_counter() - t_eval), emb


def non_finite_error(cfg: Config, losses: np.ndarray, epoch: int, good_epoch) -> TrainingError:
    """The error for a non-finite epoch loss: where it happened and which checkpoint is
    the last good one (1-based ``good_epoch``; None if none was written)."""
    bad = np.flatnonzero(~np.isfinite(losses))
    where = f"step {int(bad[0]) + 1} of {len(losses)}" if len(bad) else "a step on another rank"
    kept = (f"The last good checkpoint (epoch {good_epoch}) is intact"
            if good_epoch is not None else
            "No checkpoint was written before it" + (" (checkpoint.keep=0)" if
                                                      cfg.checkpoint.keep == 0 else ""))
    return TrainingError(f"non-finite loss in epoch {epoch + 1}, {where}; stopping. "
                         f"{kept}; lower optim.lr or check the data")


def build_sampler(cfg: Config, backend, labels: np.ndarray) -> EpochSampler:
    """The ``EpochSampler`` of this process for ``cfg`` and ``backend``."""
    s = cfg.sampler
    return EpochSampler(labels, kind=s.kind, batch_size=cfg.train.batch_size, p=s.p, k=s.k,
                        steps_per_epoch=s.steps_per_epoch, seed=cfg.train.seed,
                        rank=backend.rank, num_processes=backend.num_processes,
                        worker_ranks=[backend.worker_rank(d) for d in range(len(backend.contexts))],
                        num_workers=backend.num_workers, scope=s.scope)


def build_step(cfg: Config, backend, net, pixels: np.ndarray, labels: np.ndarray):
    """The ``engine.DataParallelStep`` for ``cfg``: the sampler kind's strategy
    (``strategies.make_strategy``) and the trainer ``backend`` makes
    (``Backend.make_trainer``, optimizer arguments from ``engine.optimizer_params``)."""
    from .engine import DataParallelStep, is_uint8, optimizer_params
    from .strategies import make_strategy
    trainer = backend.make_trainer(net.collect_params(), cfg.optim.optimizer,
                                   optimizer_params(cfg.optim), cfg.distributed.compression)
    strategy = make_strategy(cfg.sampler, cfg.loss.margin, net, backend, is_uint8(pixels))
    return DataParallelStep(backend, trainer, pixels, labels, strategy)


def train(cfg: Config, on_step: Optional[StepHook] = None) -> RunResult:
    """Run training as configured; returns a ``RunResult`` (final metrics on rank 0).

    Every rank calls it. ``on_step(epoch, step)`` (both 0-based) is called before every
    optimizer step (``engine.run_epoch``). Raises ConfigError / ValueError /
    FileNotFoundError on bad input before anything is written, TrainingError on a
    non-finite loss (the last good checkpoint stays in place).
    """
    from tqdm import tqdm

    from .dist import decide_on_rank0, make_backend
    from .engine import run_epoch
    from .evaluate import Evaluator
    from .model import build_embedding_net, initialize
    from .rundir import Recorder, resolve_resume, resolve_run_dir, timing_text

    backend = make_backend(cfg.distributed.backend, cfg.distributed.device,
                           cfg.distributed.devices)
    setup_logging(backend.is_main)
    devices = len(backend.contexts)

    # --- data and sampling: validated on every rank before anything is written
    train_split, test_split = load_splits(cfg)
    log_data(train_split, test_split, cfg.data.cache_dir)
    sampler = build_sampler(cfg, backend, train_split.labels)
    steps = sampler.steps

    run_dir = resolve_run_dir(cfg, backend)
    resume_path = resolve_resume(cfg, run_dir, backend)
    # Rank 0 reads and checks the checkpoint's record and shares it: a refusal (world size
    # changed, ...) is then raised on every rank after one barrier, not by each rank alone
    # while the others may still be in a collective.
    global_batch = sampler.per_step * backend.num_processes
    meta = (decide_on_rank0(backend, lambda: read_resume_meta(cfg, resume_path, backend, steps,
                                                              global_batch),
                            "resume_meta") if resume_path else None)

    # --- model, on every device; rank 0's initial parameters everywhere
    net = build_embedding_net(train_split.images.shape[1], cfg.model.hidden,
                              final_relu=cfg.model.final_relu, normalize=cfg.model.normalize)
    initialize(net, cfg.model.init_scale, backend.contexts, cfg.train.seed)
    backend.broadcast_parameters(net.collect_params())  # Horovod: identical start on all ranks
    stepper = build_step(cfg, backend, net, train_split.images, train_split.labels)
    trainer = stepper.trainer
    start_epoch = 0
    if resume_path:
        ckpt.load_checkpoint(resume_path, net, trainer, backend.contexts)
        start_epoch = meta.epoch + 1

    evaluator = Evaluator(cfg, test_split, train_split) if backend.is_main else None  # rank 0
    recorder = Recorder(backend.is_main, run_dir, cfg, meta.history if meta else (),
                        baseline=evaluator.raw if evaluator else None)
    lr_at = schedule.from_config(cfg.optim, cfg.train.epochs, steps, global_batch)
    log.info("backend %s: %d process(es) x %d device(s) = world size %d on %s; %d steps/epoch "
             "of %d samples (global batch), run dir %s%s", backend.name, backend.num_processes,
             devices, backend.num_workers, [str(c) for c in backend.contexts], steps,
             global_batch, run_dir,
             f"; resuming after epoch {start_epoch} from {resume_path}" if resume_path else "")

    ctx0 = backend.contexts[0]
    # The epoch (1-based) whose checkpoint is the last good one, for the non-finite message.
    good_epoch = start_epoch if resume_path else None
    final: dict = {}
    emb = None  # (N, D) test embeddings of the last evaluation (rank 0)
    for epoch in range(start_epoch, cfg.train.epochs):
        t_epoch = time.perf_counter()
        batches = sampler.epoch(epoch)                           # (steps, per_step, ...) int64
        t_sample = time.perf_counter() - t_epoch
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=not (backend.is_main and cfg.train.progress and sys.stderr.isatty()),
                   leave=False)
        t_train = time.perf_counter()
        losses, t_wait = run_epoch(stepper, batches, epoch, lr_at=lr_at,
                                   sync_every=cfg.train.sync_every, bar=bar, on_step=on_step)
        train_time = time.perf_counter() - t_train
        bar.close()
        t_ar = time.perf_counter()
        mean_loss = float(backend.allreduce_mean([float(losses.mean())])[0])  # collective: all ranks
        t_allreduce = time.perf_counter() - t_ar  # includes waiting for the slowest rank
        if not math.isfinite(mean_loss):
            raise non_finite_error(cfg, losses, epoch, good_epoch)

        row = {"epoch": epoch + 1, "loss": mean_loss,
               "triplets_per_s": steps * global_batch / train_time,  # whole job
               "lr": trainer.learning_rate, "time_sample_s": t_sample,
               "time_train_s": train_time, "time_wait_s": t_wait,
               "time_allreduce_s": t_allreduce}
        res, new_emb = evaluate_if_due(evaluator, cfg, epoch, net, ctx0)
        row.update(res)
        emb = new_emb if new_emb is not None else emb
        # Where the epoch went, without per-step syncs: sampling, training (incl. the
        # epoch's index copy; of which the host sat waiting for the device: near train =
        # device-bound, near 0 = host-bound), the end-of-epoch allreduce (waits for the
        # slowest rank), evaluation.
        timing = timing_text(t_sample, train_time, t_wait, t_allreduce)
        recorder.record_epoch(epoch, row, timing)
        recorder.save_checkpoint(epoch, net, trainer, steps_per_epoch=steps,
                                 processes=backend.num_processes, devices=devices)
        if cfg.checkpoint.keep > 0:
            good_epoch = epoch + 1
        final = row

    if emb is None:  # resumed after the last epoch: embed once for the export (rank 0)
        res, emb = evaluate_if_due(evaluator, cfg, cfg.train.epochs - 1, net, ctx0, force=True)
        res.pop("time_eval_s", None)
        final = dict(final or (recorder.history[-1] if recorder.history else {}), **res)
    final = recorder.finish(final, net, ctx0, test_split, emb,
                            {"world_size": backend.num_workers, "backend": backend.name})
    backend.barrier()  # Horovod: nobody leaves while rank 0 still writes
    return RunResult(final, net, trainer, backend, run_dir)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dist_triplet.train",
        description="Train a triplet-loss embedding (MXNet Gluon; local, Horovod or kvstore).")
    parser.add_argument("--config", help="YAML config; keys not given keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.epochs=2 distributed.backend=horovod")
    return parser.parse_intermixed_args(argv)


def default_threads(cfg: Config) -> None:
    """Set OMP_NUM_THREADS, unless the user did, to this host's cores divided among the
    processes (``HOROVOD_LOCAL_SIZE``, set by horovodrun) and kvstore CPU devices that share
    them. Only effective before MXNet is imported.

    MXNet's own default is half the cores (it assumes two hyper-threads per core): one
    thread on a 2-core VM, which halves the step rate there (benchmark section 2).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    share = int(os.environ.get("HOROVOD_LOCAL_SIZE") or 1)
    d = cfg.distributed
    if d.backend == "kvstore":  # a config value: MXNet (and so the backend) is not up yet
        try:
            kind, n = parse_devices(d.devices)
        except ValueError:
            kind = None  # choose_contexts reports the malformed value
        share *= n if kind == "cpu" else 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))


def main(argv: Optional[Sequence[str]] = None, on_step: Optional[StepHook] = None) -> int:
    """Command-line entry point; returns the exit status (tests call it directly).
    ``on_step``: as in :func:`train` (tests/_fault_train.py uses it)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        default_threads(cfg)
        train(cfg, on_step=on_step)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Horovod: leave it here, not in its atexit hook, which complains after an error.
        rundir = sys.modules.get(f"{__package__}.rundir")
        if rundir is not None:
            rundir.release_run_dir()  # the run directory's lock (rank 0)
        dist = sys.modules.get(f"{__package__}.dist")
        if dist is not None:
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
