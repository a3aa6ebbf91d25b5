"""Training entry point: ``python -m dist_triplet.train --config FILE [section.key=value ...]``.

The same code runs in every mode:

* single device (debug):  ``python -m dist_triplet.train --config configs/debug.yaml``
* Horovod, N processes:    ``horovodrun -np 4 python -m dist_triplet.train --config configs/fashion_mnist.yaml distributed.backend=horovod``
* kvstore, N devices:      ``python -m dist_triplet.train --config ... distributed.backend=kvstore distributed.devices=cpu:2``

Rank 0 alone logs, evaluates, writes TensorBoard scalars, checkpoints, ``metrics.json``
and the projector; those live in helpers below and call no collective. Every rank runs
the same number of steps per epoch (equal shards, see ``triplets.create_pairs``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config, save_config
from .data import Split, load_dataset, subset
from .triplets import (ClassIndex, create_pairs, pk_batches, pk_global_batches,
                       pk_steps_per_epoch)

log = logging.getLogger("dist_triplet")


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


# ----------------------------------------------------------------------------- rank-0 helpers

def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, WARNING elsewhere, so only rank 0 prints progress."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", force=True)


class Rank0:
    """Everything only rank 0 does: run directory files, TensorBoard scalars, metrics.json,
    checkpoints, evaluation and the projector. On other ranks every method is a no-op, so
    the loop has no bare ``if rank == 0`` blocks. No method calls a collective."""

    def __init__(self, active: bool, run_dir: str, cfg: Config):
        self.active = active
        self.run_dir = run_dir
        self.cfg = cfg
        self.writer = None
        self.history: List[dict] = []
        self.emb = None  # (N, D) test embeddings of the last evaluation
        if active:
            os.makedirs(run_dir, exist_ok=True)
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, epoch: int, values: dict) -> None:
        if self.active:
            for key, val in values.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
                    self.writer.add_scalar(key, val, epoch + 1)
            self.writer.flush()

    def record_epoch(self, row: dict) -> None:
        if self.active:
            self.history.append(row)
            self.write_metrics(final=None)

    def write_metrics(self, final: Optional[dict], extra: Optional[dict] = None) -> None:
        """metrics.json: per-epoch rows and the final values, so scripts need not parse logs."""
        if not self.active:
            return
        doc = {"run_dir": os.path.abspath(self.run_dir), "epochs": self.history, "final": final}
        doc.update(extra or {})
        path = os.path.join(self.run_dir, "metrics.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, path)

    def save_checkpoint(self, epoch: int, net, trainer, meta: dict) -> None:
        if self.active and self.cfg.checkpoint.keep > 0:
            path = ckpt.save_checkpoint(os.path.join(self.run_dir, "checkpoints"), epoch, net,
                                        trainer, dict(meta, history=self.history),
                                        self.cfg.checkpoint.keep)
            log.info("checkpoint %s", path)

    def log_epoch(self, epoch: int, row: dict, timing: str, net, ctx, evaluator) -> None:
        """Evaluate (every ``eval.every`` epochs and after the last), log the epoch line,
        record the row in metrics.json and write its scalars."""
        if not self.active:
            return
        cfg = self.cfg
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs:
            t_eval = time.perf_counter()
            res, self.emb = evaluator(net, ctx)
            row.update(res)
            row["time_eval_s"] = time.perf_counter() - t_eval
            # A collapsed embedding's seed accuracy counts ties as correct (1.0 for one
            # point): say so next to the number, not only at the end of the line.
            log.info("epoch %d/%d  loss %.4f  acc %.4f (%d / %d%s)  P@1 %.4f (raw %.4f)  R-Prec "
                     "%.4f  MAP@R %.4f%s  %.0f triplets/s  %s eval %.2fs]",
                     epoch + 1, cfg.train.epochs, row["loss"], res["seed_accuracy"],
                     res["correct"], res["total"],
                     ", COLLAPSED: not a success" if res["collapsed"] else "",
                     res["precision_at_1"], evaluator.raw["precision_at_1"],
                     res["r_precision"], res["map_at_r"],
                     "  COLLAPSED" if res["collapsed"] else "", row["triplets_per_s"], timing,
                     row["time_eval_s"])
        else:
            log.info("epoch %d/%d  loss %.4f  %.0f triplets/s  %s]", epoch + 1,
                     cfg.train.epochs, row["loss"], row["triplets_per_s"], timing)
        self.record_epoch(row)
        self.scalars(epoch, {f"train/{k}": row[k] for k in ("loss", "triplets_per_s", "lr")})
        self.scalars(epoch, {f"eval/{k}": v for k, v in row.items()
                             if k in ("seed_accuracy", "strict_accuracy", "precision_at_1",
                                      "r_precision", "map_at_r", "spread")})

    def finish(self, final: dict, net, ctx, evaluator, test: Split, extra: dict) -> dict:
        """End of run: final metrics.json, raw-pixel scalars, projector, model export, and
        the run directory's path on stdout. Returns the final metrics ({} off rank 0)."""
        if not self.active:
            return {}
        cfg = self.cfg
        if self.emb is None:  # resumed after the last epoch: embed once for the export
            res, self.emb = evaluator(net, ctx)
            final = dict(final or (self.history[-1] if self.history else {}), **res)
        self.write_metrics(final=final, extra=dict(extra, raw_pixels=evaluator.raw))
        self.scalars(cfg.train.epochs - 1, {f"eval/raw_{k}": v for k, v in evaluator.raw.items()
                                            if isinstance(v, float)})
        if cfg.eval.projector:
            from .projector import export_projector
            n = cfg.eval.projector_points or len(test.labels)
            export_projector(os.path.join(self.run_dir, "tensorboard"),
                             {"origin": test.images[:n], "triplet": self.emb[:n]},
                             test.labels[:n], test.class_names, images=test.images[:n],
                             writer=self.writer)
        # The trained network as symbol + params, for `python -m dist_triplet.embed`.
        from .export import export_model
        model_dir = export_model(net, os.path.join(self.run_dir, "model"), ctx,
                                 test.images.shape[1],
                                 meta={"run_dir": os.path.abspath(self.run_dir),
                                       "epochs": cfg.train.epochs})
        log.info("exported model to %s", model_dir)
        self.close()
        log.info("run directory: %s", os.path.abspath(self.run_dir))
        print(os.path.abspath(self.run_dir), flush=True)
        return final

    def close(self) -> None:
        if self.active and self.writer is not None:
            self.writer.close()


def _check_dir_path(run_dir: str) -> None:
    """Raise ValueError naming output.dir when ``run_dir`` or one of its parents exists
    but is not a directory (the run directory could not be made there)."""
    path = os.path.abspath(run_dir)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                what = "is" if path == os.path.abspath(run_dir) else f"is inside {path!r}, which is"
                raise ValueError(f"output.dir={run_dir!r} {what} an existing file, not a "
                                 "directory; choose another output.dir")
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _make_unique_dir(base: str) -> str:
    """Create ``base`` (or ``base-2``, ``base-3``, ... if taken) exclusively; return it.
    ``os.mkdir`` fails if the directory exists, so two runs started in the same second
    never share one."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    n = 1
    while True:
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def resolve_run_dir(cfg: Config, backend) -> str:
    """The run directory, decided by rank 0 and broadcast (timestamps differ across ranks).
    A generated ``<root>/<name>-<timestamp>`` is created here by rank 0, exclusively. Rank
    0's error (output.dir is a file) is raised on every rank. Every rank must call it."""
    decision = None
    if backend.is_main:
        try:
            run_dir = cfg.output.dir
            if run_dir is None and cfg.checkpoint.resume not in (None, "auto"):
                # Resuming from an explicit checkpoint continues that run's directory.
                run_dir = os.path.dirname(os.path.dirname(os.path.abspath(cfg.checkpoint.resume)))
            if run_dir is None:
                _check_dir_path(cfg.output.root)
                run_dir = _make_unique_dir(os.path.join(
                    cfg.output.root, f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
            else:
                _check_dir_path(run_dir)
            decision = ("ok", run_dir)
        except (ValueError, OSError) as exc:
            decision = ("error", f"output.dir: {exc}" if isinstance(exc, OSError) else str(exc))
    status, value = backend.broadcast_object(decision, name="run_dir")
    if status == "error":
        backend.barrier()  # Horovod: rank 0 must not exit before the others have the message
        raise ValueError(value)
    return value


def check_split(split: Split, what: str) -> None:
    """Raise ValueError naming the split and its directory when no triplet can be made
    from it (fewer than 2 classes, or a class with fewer than 2 samples)."""
    try:
        ClassIndex(split.labels)
    except ValueError as exc:
        raise ValueError(f"{what} split ({split.source}): {exc}") from None


def resolve_resume(cfg: Config, run_dir: str, backend) -> Optional[str]:
    """The checkpoint to resume from (``checkpoint.find_resume``), decided by rank 0, which
    alone writes checkpoints, and broadcast so every rank starts at the same epoch. Rank 0's
    error (a fresh start into a directory that holds checkpoints) is raised on every rank,
    so all exit alike. Every rank must call it."""
    decision = None
    if backend.is_main:
        try:
            decision = ("ok", ckpt.find_resume(cfg.checkpoint.resume,
                                               os.path.join(run_dir, "checkpoints"),
                                               cfg.to_dict()))
        except ValueError as exc:
            decision = ("error", str(exc))
    status, value = backend.broadcast_object(decision, name="resume")
    if status == "error":
        backend.barrier()  # Horovod: rank 0 must not exit before the others have the message
        raise ValueError(value)
    return value


# ----------------------------------------------------------------------------- schedule

def learning_rate(cfg: Config, step: int, steps_per_epoch: int, global_batch: int) -> float:
    """Learning rate at global step ``step`` (0-based): linear scaling (optional), linear
    warm-up over ``optim.warmup_epochs``, then constant or cosine decay to 0 at the end."""
    base = cfg.optim.lr
    if cfg.optim.scale_lr:
        base *= global_batch / cfg.optim.base_batch  # Goyal et al. 2017, linear scaling rule
    total = cfg.train.epochs * steps_per_epoch
    warm = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    if step < warm:
        return base * (step + 1) / warm
    if cfg.optim.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base


# ----------------------------------------------------------------------------- the step

class DataParallelStep:
    """The distributed training step, identical in structure for every backend.

    The training pixels are put on every device once (shared, not copied, on cpu(0)); an
    epoch's indices are copied once (``epoch_indices``), a step takes a view of its rows.
    ``step(batch)`` takes this process's share of the global batch:

    * offline sampler: ``batch`` (Bp, 3) int64 (anchor, positive, negative) rows, Bp =
      devices x ``train.batch_size``; each device gets a contiguous (B, 3) slice.
    * P x K sampler: ``batch`` (devices, P*K) int64; each device mines within its own batch.

    It returns the per-device loss sums (NDArrays, no host synchronisation) and the
    number of loss terms they sum over.
    """

    def __init__(self, cfg: Config, backend, net, pixels: np.ndarray, labels: np.ndarray):
        import mxnet as mx
        from .model import GlobalMinedTripletStep, MinedTripletStep, OfflineTripletStep

        self.mx = mx
        self.cfg = cfg
        self.backend = backend
        self.ctxs = backend.contexts
        self.net = net
        self.mining = cfg.sampler.kind == "pk"
        # Indices travel as float32 (what F.take wants); exact for row ids below 2**24.
        if len(pixels) >= 2 ** 24:
            raise ValueError(f"{len(pixels)} training rows: indices above 2**24 are not exact "
                             "in float32; use data.limit_train")
        self.pixels = [self._resident(pixels, c) for c in self.ctxs]               # (N, F) per device
        self.labels = [mx.nd.array(labels.astype(np.float32), ctx=c) for c in self.ctxs]
        self.global_step = None
        if self.mining and cfg.sampler.scope == "global":
            self.global_step = GlobalMinedTripletStep(
                net, cfg.loss.margin, cfg.sampler.miner, cfg.sampler.k, self.ctxs,
                first_worker=backend.rank * len(self.ctxs),
                num_workers=backend.num_processes * len(self.ctxs), allgather=backend.allgather)
        elif self.mining:
            self.block = MinedTripletStep(net, cfg.loss.margin, cfg.sampler.miner,
                                          k=cfg.sampler.k)
        else:
            self.block = OfflineTripletStep(net, cfg.loss.margin)
        if self.global_step is None:
            self.block.hybridize(static_alloc=True, static_shape=True)
        opt_params = {"learning_rate": cfg.optim.lr, "wd": cfg.optim.wd}
        if cfg.optim.optimizer == "sgd":
            opt_params["momentum"] = cfg.optim.momentum
        self.trainer = backend.make_trainer(net.collect_params(), cfg.optim.optimizer, opt_params)

    def _resident(self, pixels: np.ndarray, ctx):
        """``pixels`` as a float32 NDArray on ``ctx``. On cpu(0) it shares the host array's
        memory (DLPack, no copy), so a CPU process holds the training set once, not twice
        (peak RSS: benchmark section 5); the caller must not modify ``pixels`` afterwards.
        Other devices get a copy."""
        mx = self.mx
        if ctx == mx.cpu(0):
            host = np.ascontiguousarray(pixels, dtype=np.float32)
            return mx.nd.from_numpy(host.view(), zero_copy=True)  # marks only the view read-only
        return mx.nd.array(pixels, ctx=ctx)

    def device_batches(self, batch: np.ndarray) -> list:
        """Split this process's batch over its devices and move the indices there."""
        mx = self.mx
        n = len(self.ctxs)
        if len(batch) % n:
            # EpochSampler always gives devices x batch_size rows; this guards direct callers.
            raise ValueError(f"a batch of {len(batch)} rows does not split evenly over {n} "
                             "devices; every device must get the same number so that each "
                             "step's gradient is the mean over the global batch")
        parts = np.split(batch, n) if n > 1 else [batch]
        out = []
        for part, ctx in zip(parts, self.ctxs):
            if self.mining:
                flat = part.reshape(-1)               # (P*K,)
            else:
                flat = part.T.reshape(-1)             # (3B,) = [anchors; positives; negatives]
            out.append(mx.nd.array(flat, ctx=ctx, dtype="float32"))
        return out

    def epoch_indices(self, batches: np.ndarray) -> list:
        """A whole epoch's indices on the devices in one copy: per device a (steps, 3B)
        (offline) or (steps, P*K) float32 NDArray whose row s equals
        ``device_batches(batches[s])`` for that device.

        ``mx.nd.array`` from host memory waits until MXNet's queue is empty, so copying
        indices every step stalls the host once per step (measured: benchmark section 2);
        one copy per epoch and a row view per step keeps the queue full.
        """
        mx = self.mx
        steps, n = len(batches), len(self.ctxs)
        parts = np.split(batches, n, axis=1) if n > 1 else [batches]
        out = []
        for part, ctx in zip(parts, self.ctxs):
            if self.mining:
                flat = part.reshape(steps, -1)                     # (steps, P*K)
            else:
                flat = part.transpose(0, 2, 1).reshape(steps, -1)  # (steps, 3B) [a; p; n]
            out.append(mx.nd.array(flat, ctx=ctx, dtype="float32"))
        return out

    def step(self, batch: np.ndarray, idx: Optional[list] = None):
        """One optimizer update from ``batch``; returns (loss sums per device, terms).

        ``idx``: this step's rows of :meth:`epoch_indices` (one NDArray per device); when
        given, the indices are not copied again (``batch`` still gives the batch size).
        """
        mx = self.mx
        if idx is None:
            idx = self.device_batches(batch)
        head_grads = None
        with mx.autograd.record():
            if self.global_step is not None:
                # Global mining: every device's loss is the whole global batch's mean.
                losses = self.global_step(self.pixels, self.labels, idx)
                head_grads = self.global_step.head_grads
            elif self.mining:
                losses = [self.block(x, y, i) for x, y, i in zip(self.pixels, self.labels, idx)]
            else:
                losses = [self.block(x, i) for x, i in zip(self.pixels, idx)]
        mx.autograd.backward(losses, head_grads=head_grads)
        # Offline: per-sample losses, normalise by the triplets of this process. Mining: one
        # mean loss per device, normalise by the devices. Horovod then averages over ranks.
        terms = len(self.ctxs) if self.mining else len(batch)
        self.trainer.step(terms)
        return [l.sum() for l in losses], terms


# ----------------------------------------------------------------------------- sampling

class EpochSampler:
    """This rank's batches for an epoch, equal in number on every rank.

    Offline: ``create_pairs`` shard of (seed, epoch, rank), cut into ``steps`` batches of
    ``devices x batch_size`` triplets (the remainder is dropped so all ranks and all steps
    have the same shape). P x K: ``pk_batches`` for each device.
    """

    def __init__(self, cfg: Config, labels: np.ndarray, rank: int, world_size: int,
                 devices: int):
        self.cfg = cfg
        self.index = ClassIndex(labels)
        self.rank, self.world_size, self.devices = rank, world_size, devices
        # Shards are made per worker: under kvstore the devices of one process are workers.
        if cfg.sampler.kind == "pk":
            s = cfg.sampler
            if s.p > len(self.index.classes):
                raise ValueError(f"sampler.p={s.p} but the training set has only "
                                 f"{len(self.index.classes)} classes: a P x K batch takes "
                                 "sampler.p distinct classes; lower sampler.p")
            workers = world_size * devices
            if workers > self.index.min_count:
                # pk_batches gives each worker a disjoint part of every class.
                raise ValueError(
                    f"sampler.kind=pk with world size {world_size} x {devices} device(s) = "
                    f"{workers} workers, but the smallest training class has only "
                    f"{self.index.min_count} samples: each worker needs its own member of "
                    "every class; use fewer workers or more data")
            # All workers (ranks x devices) together see about N samples per epoch.
            self.steps = s.steps_per_epoch or pk_steps_per_epoch(self.index, s.p, s.k,
                                                                   world_size * devices)
            self.per_step = devices * s.p * s.k
        else:
            from .triplets import shard_length
            shard = shard_length(self.index, world_size)
            self.per_step = devices * cfg.train.batch_size
            self.steps = shard // self.per_step
            if self.steps == 0:
                raise ValueError(
                    f"train.batch_size={cfg.train.batch_size} x {devices} device(s) = "
                    f"{self.per_step} triplets per step, but each of the {world_size} rank(s) "
                    f"gets only {shard} triplets per epoch ({len(labels)} training samples): "
                    "lower train.batch_size or use more data")

    def epoch(self, epoch: int) -> np.ndarray:
        """(steps, per_step, 3) offline or (steps, devices, P*K) for P x K; int64."""
        cfg = self.cfg
        if cfg.sampler.kind == "pk":
            s = cfg.sampler
            if s.scope == "global":
                # The same classes on every worker, each its own images: every worker
                # draws the whole global batch and keeps its devices' slices.
                workers = self.world_size * self.devices
                batches = pk_global_batches(self.index, p=s.p, k=s.k, steps=self.steps,
                                            seed=cfg.train.seed, epoch=epoch, workers=workers)
                first = self.rank * self.devices
                return np.ascontiguousarray(batches[:, first:first + self.devices])
            # Each device of this process is its own worker for the sampler.
            per_dev = [pk_batches(self.index, p=s.p, k=s.k, steps=self.steps, seed=cfg.train.seed,
                                  epoch=epoch, rank=self.rank * self.devices + d,
                                  world_size=self.world_size * self.devices)
                       for d in range(self.devices)]
            return np.stack(per_dev, axis=1)
        trip = create_pairs(self.index, seed=cfg.train.seed, epoch=epoch, rank=self.rank,
                            world_size=self.world_size)
        return trip[: self.steps * self.per_step].reshape(self.steps, self.per_step, 3)


# ----------------------------------------------------------------------------- evaluation

class Evaluator:
    """Rank-0 evaluation on the test set; calls no collective.

    Test triplets are made once with ``eval.triplet_seed`` (the seed article's metric:
    9,990 on Fashion-MNIST), retrieval metrics on the whole test set, and the raw-pixel
    baseline once per run."""

    def __init__(self, cfg: Config, test: Split):
        from .metrics import retrieval_metrics
        self.cfg = cfg
        self.test = test
        self.triplets = create_pairs(test.labels, seed=cfg.eval.triplet_seed)
        t0 = time.perf_counter()
        self.raw = retrieval_metrics(test.images, test.labels)
        log.info("raw pixels: P@1 %.4f  R-Prec %.4f  MAP@R %.4f  (%d queries, %.1f s)",
                 self.raw["precision_at_1"], self.raw["r_precision"], self.raw["map_at_r"],
                 self.raw["queries"], time.perf_counter() - t0)

    def __call__(self, net, ctx) -> tuple:
        from .metrics import evaluate_embeddings
        from .model import embed
        emb = embed(net, self.test.images, ctx, self.cfg.eval.batch_size)
        res = evaluate_embeddings(emb, self.test.labels, self.triplets,
                                  collapse_eps=self.cfg.eval.collapse_eps)
        if res["collapsed"]:
            log.warning("embeddings collapsed (spread %.3g <= eval.collapse_eps %.3g): the "
                        "metrics below are not meaningful", res["spread"],
                        self.cfg.eval.collapse_eps)
        return res, emb


# ----------------------------------------------------------------------------- loop

def run_steps(cfg: Config, stepper: DataParallelStep, batches: np.ndarray, dev_idx: list,
              epoch: int, global_batch: int, bar) -> tuple:
    """One epoch's optimizer steps. Returns ``(losses, wait_s)``: the (steps,) float32 mean
    loss of each step on this rank, and the seconds the host sat blocked on the device.

    The host waits for the device once every ``train.sync_every`` steps (to bound MXNet's
    asynchronous queue and refresh the progress bar), never per step. Per-step loss sums
    stay on the device as a list and are fetched once: a small op per step costs ~0.2 ms
    of a ~5 ms CPU step (docs/benchmark.md).
    """
    import mxnet as mx
    steps = len(batches)
    ctx0 = stepper.ctxs[0]
    step_sums = []
    wait = 0.0
    terms = 1
    for s in range(steps):
        # Every step, whatever the schedule: a resumed trainer holds the checkpoint's
        # learning rate (load_states), and optim.scale_lr applies to constant schedules too.
        stepper.trainer.set_learning_rate(
            learning_rate(cfg, epoch * steps + s, steps, global_batch))
        sums, terms = stepper.step(batches[s], [d[s] for d in dev_idx])
        step_sums.append(sums[0] if len(sums) == 1 else
                         mx.nd.add_n(*[x.as_in_context(ctx0) for x in sums]))
        if (s + 1) % cfg.train.sync_every == 0 or s + 1 == steps:
            t_w = time.perf_counter()
            bar.set_postfix(loss=f"{step_sums[-1].asscalar() / terms:.4f}")
            wait += time.perf_counter() - t_w
        bar.update(1)
    t_w = time.perf_counter()
    losses = mx.nd.concat(*step_sums, dim=0).asnumpy() / terms
    return losses, wait + time.perf_counter() - t_w


def train(cfg: Config) -> RunResult:
    """Run training as configured; returns a ``RunResult`` (final metrics on rank 0).

    Every rank calls it. Raises ConfigError / ValueError / FileNotFoundError on bad input
    before anything is written, TrainingError on a non-finite loss (the last good
    checkpoint stays in place).
    """
    from tqdm import tqdm

    from .dist import make_backend
    from .model import build_embedding_net, initialize

    backend = make_backend(cfg.distributed.backend, cfg.distributed.device,
                           cfg.distributed.devices)
    setup_logging(backend.is_main)
    devices = len(backend.contexts)
    workers = backend.world_size if backend.name == "horovod" else devices

    # --- data and sampling: validated on every rank before anything is written
    train_split = subset(load_dataset(cfg.data.dataset, cfg.data.root, train=True),
                         cfg.data.limit_train)
    check_split(train_split, "training")
    sampler = EpochSampler(cfg, train_split.labels, backend.rank if backend.name == "horovod" else 0,
                           backend.world_size if backend.name == "horovod" else 1, devices)
    # Every rank reads the test set too (10k rows, cheap) so a broken file fails on all
    # ranks alike instead of leaving the others waiting in a collective.
    test_split = subset(load_dataset(cfg.data.dataset, cfg.data.root, train=False),
                        cfg.data.limit_test)
    check_split(test_split, "test")  # the evaluator's triplets; before the run dir exists
    if test_split.images.shape[1] != train_split.images.shape[1]:
        raise ValueError(f"test images ({test_split.source}) have {test_split.images.shape[1]} "
                         f"pixels, training images ({train_split.source}) "
                         f"{train_split.images.shape[1]}: both splits must share one image size")

    run_dir = resolve_run_dir(cfg, backend)
    resume_path = resolve_resume(cfg, run_dir, backend)
    meta = None
    if resume_path:
        meta = ckpt.read_meta(resume_path)  # every rank: the path must be on a shared FS
        if meta["epoch"] + 1 > cfg.train.epochs:
            raise ValueError(f"{resume_path}: checkpoint is after epoch {meta['epoch'] + 1}; "
                             f"train.epochs={cfg.train.epochs} leaves nothing to train (give "
                             f"train.epochs > {meta['epoch'] + 1} to continue)")
        changed = ckpt.check_compatible(meta, cfg.to_dict(), resume_path,
                                        processes=backend.num_processes, devices=devices,
                                        steps=sampler.steps)
        if changed:
            log.warning("resuming with a changed schedule (%s): the learning rate now follows "
                        "the new values, so the run will not match an uninterrupted one",
                        "; ".join(changed))

    # --- model, on every device; rank 0's initial parameters everywhere
    net = build_embedding_net(train_split.images.shape[1], cfg.model.hidden,
                              final_relu=cfg.model.final_relu, normalize=cfg.model.normalize)
    initialize(net, cfg.model.init_scale, backend.contexts, cfg.train.seed)
    backend.broadcast_parameters(net.collect_params())  # Horovod: identical start on all ranks
    stepper = DataParallelStep(cfg, backend, net, train_split.images, train_split.labels)
    start_epoch = 0
    if resume_path:
        ckpt.load_checkpoint(resume_path, net, stepper.trainer, backend.contexts)
        start_epoch = meta["epoch"] + 1

    main = Rank0(backend.is_main, run_dir, cfg)
    if meta is not None:
        main.history = list(meta.get("history", []))
    evaluator = Evaluator(cfg, test_split) if backend.is_main else None
    steps = sampler.steps
    global_batch = sampler.per_step * backend.num_processes
    log.info("backend %s, %d worker(s) on %s; %d steps/epoch of %d triplets (global batch), "
             "run dir %s%s", backend.name, workers, [str(c) for c in backend.contexts], steps,
             global_batch, run_dir,
             f"; resuming after epoch {start_epoch} from {resume_path}" if resume_path else "")

    ctx0 = backend.contexts[0]
    # The epoch (1-based) whose checkpoint is the last good one, for the non-finite message.
    good_epoch = start_epoch if resume_path else None
    final: dict = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        t_epoch = time.perf_counter()
        batches = sampler.epoch(epoch)                           # (steps, per_step, ...) int64
        dev_idx = stepper.epoch_indices(batches)                 # one host->device copy per epoch
        t_sample = time.perf_counter() - t_epoch
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=not (backend.is_main and cfg.train.progress and sys.stderr.isatty()),
                   leave=False)
        t_train = time.perf_counter()
        losses, t_wait = run_steps(cfg, stepper, batches, dev_idx, epoch, global_batch, bar)
        train_time = time.perf_counter() - t_train
        bar.close()
        t_ar = time.perf_counter()
        mean_loss = float(backend.allreduce_mean([float(losses.mean())])[0])  # collective: all ranks
        t_allreduce = time.perf_counter() - t_ar  # includes waiting for the slowest rank
        if not math.isfinite(mean_loss):
            bad = np.flatnonzero(~np.isfinite(losses))
            where = f"step {int(bad[0]) + 1} of {steps}" if len(bad) else "a step on another rank"
            kept = (f"The last good checkpoint (epoch {good_epoch}) is intact"
                    if good_epoch is not None else
                    "No checkpoint was written before it" + (" (checkpoint.keep=0)" if
                                                              cfg.checkpoint.keep == 0 else ""))
            raise TrainingError(f"non-finite loss in epoch {epoch + 1}, {where}; stopping. "
                                f"{kept}; lower optim.lr or check the data")
        throughput = steps * global_batch / train_time           # triplets/s, whole job

        row = {"epoch": epoch + 1, "loss": mean_loss, "triplets_per_s": throughput,
               "lr": stepper.trainer.learning_rate, "time_sample_s": t_sample,
               "time_train_s": train_time, "time_wait_s": t_wait,
               "time_allreduce_s": t_allreduce}
        # Where the epoch went, without per-step syncs: sampling (+ index copy), training
        # (of which the host sat waiting for the device: near train = device-bound, near 0 =
        # host-bound), the end-of-epoch allreduce (waits for the slowest rank), evaluation.
        timing = (f"[sample {t_sample:.2f}s train {train_time:.2f}s (wait {t_wait:.2f}s) "
                  f"allreduce {t_allreduce:.2f}s")
        main.log_epoch(epoch, row, timing, net, ctx0, evaluator)
        main.save_checkpoint(epoch, net, stepper.trainer,
                             {"config": cfg.to_dict(), "world_size": workers, "steps": steps,
                              "processes": backend.num_processes, "devices": devices})
        if cfg.checkpoint.keep > 0:
            good_epoch = epoch + 1
        final = row

    final = main.finish(final, net, ctx0, evaluator, test_split,
                        {"world_size": workers, "backend": backend.name})
    backend.barrier()  # Horovod: nobody leaves while rank 0 still writes
    return RunResult(final, net, stepper.trainer, backend, run_dir)


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
    if d.backend == "kvstore" and d.devices.startswith("cpu:"):
        try:
            share *= max(1, int(d.devices.split(":", 1)[1]))
        except ValueError:
            pass  # choose_contexts reports the malformed value
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (tests call it directly)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        default_threads(cfg)
        train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Horovod: leave it here, not in its atexit hook, which complains after an error.
        dist = sys.modules.get(f"{__package__}.dist")
        if dist is not None:
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
