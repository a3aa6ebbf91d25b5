"""The training run: backend, model, step and epochs, on every rank.

:func:`train` is what ``python -m dist_triplet.train`` runs (train.py is its command
line): it plans the job (plan.py: backend, data, sampler, run directory; the same code as
the pre-flight check), makes the backend (dist.py), resolves the run directory and the
checkpoint to resume from on rank 0 (rundir.py), builds the model (model.py) and the step
(engine.py, with the sampler kind's strategy), and runs the epochs, evaluating on rank 0
(evaluate.py) and handing each epoch's row to the Recorder (recorder.py); rank 0 ends
with the exports (outputs.py). Every rank runs the same number of steps per epoch (equal
shards, see ``triplets.create_pairs``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from . import checkpoint as ckpt
from . import dist, rundir, schedule
from .config import Config, ConfigError
from .data import Split, describe
from .dist import decide_on_rank0, make_backend
from .engine import build_step, run_epoch
from .evaluate import Evaluator
from .launcher import launcher_rank, local_size
from .backbone import build_network, initialize_network
from .plan import batch_note, data_digest, make_plan, read_resume_meta
from .outputs import finish_run
from .recorder import make_recorder, timing_text
from .rundir import make_run_dir, resume_for

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
    logging.getLogger("faiss").setLevel(logging.WARNING)   # "Loading faiss with AVX2 support"


def log_data(train_split: Split, test_split: Split, cache_dir: Optional[str]) -> None:
    """One line per split, and a hint when several local ranks each hold a large copy."""
    log.info("training data: %s", describe(train_split))
    log.info("test data: %s", describe(test_split))
    local = local_size()
    if not cache_dir and local > 1 and train_split.images.nbytes > 2 ** 30:
        log.warning("each of the %d local ranks holds its own %.1f GiB copy of the training "
                    "data; data.cache_dir=DIR would share one memory-mapped copy per host",
                    local, train_split.images.nbytes / 2 ** 30)


def eval_due(cfg: Config, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with an evaluation: every ``eval.every``, and the last."""
    return (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs


def evaluate_if_due(evaluator, cfg: Config, epoch: int, net, ctx, force: bool = False):
    """``(results, embeddings)`` when :func:`eval_due` or ``force``; ``({}, None)``
    otherwise and off rank 0 (``evaluator`` None). The results include ``time_eval_s``."""
    if evaluator is None or not (force or eval_due(cfg, epoch)):
        return {}, None
    t_eval = time.perf_counter()
    res, emb = evaluator(net, ctx, epoch)
    return dict(res, time_eval_s=time.perf_counter() - t_eval), emb


def non_finite_error(cfg: Config, losses: np.ndarray, epoch: int, good_epoch,
                     embeddings: int = 0) -> TrainingError:
    """The error for a non-finite epoch loss, or (``embeddings`` > 0) that many non-finite
    test embedding values after a finite loss: where it happened and which checkpoint is
    the last good one (1-based ``good_epoch``; None if none was written)."""
    bad = np.flatnonzero(~np.isfinite(losses))
    where = f"step {int(bad[0]) + 1} of {len(losses)}" if len(bad) else "a step on another rank"
    what = (f"non-finite loss in epoch {epoch + 1}, {where}" if not embeddings else
            f"{embeddings:,} non-finite test embedding values after epoch {epoch + 1}, whose "
            "loss was finite: the network diverged (e.g. BatchNorm's running statistics)")
    kept = (f"The last good checkpoint (epoch {good_epoch}) is intact"
            if good_epoch is not None else
            "No checkpoint was written before it" + (" (checkpoint.keep=0)" if
                                                      cfg.checkpoint.keep == 0 else ""))
    return TrainingError(f"{what}; stopping. {kept}; lower optim.lr or check the data")


def train(cfg: Config, on_step: Optional[StepHook] = None) -> RunResult:
    """Run training as configured; returns a ``RunResult`` (final metrics on rank 0).

    Every rank calls it. ``on_step(epoch, step)`` (both 0-based) is called before every
    optimizer step (``engine.run_epoch``). Raises ConfigError / ValueError /
    FileNotFoundError on bad input before anything is written, TrainingError on a
    non-finite loss (the last good checkpoint stays in place).
    """
    backend = make_backend(cfg.distributed.backend, cfg.distributed.device,
                           cfg.distributed.devices)
    setup_logging(backend.is_main)
    devices = len(backend.contexts)

    # --- data and sampling: validated on every rank before anything is written
    plan = make_plan(cfg, backend)
    for line in plan.warnings if backend.is_main else ():
        log.warning(line)
    train_split, test_split, sampler = plan.train, plan.test, plan.sampler
    log_data(train_split, test_split, cfg.data.cache_dir)
    steps, global_batch = plan.steps, plan.global_batch

    # Rank 0 decides the run directory and the checkpoint to resume from, reads and checks
    # the checkpoint's record, and shares each: a refusal (world size changed, ...) is then
    # raised on every rank after one barrier, not by each rank alone while the others may
    # still be in a collective.
    run_dir = decide_on_rank0(backend, lambda: make_run_dir(cfg), "run_dir")
    resume_path = decide_on_rank0(backend, lambda: resume_for(cfg, run_dir), "resume")
    digest = data_digest(train_split) if backend.is_main else None   # checkpoints record it
    meta = (decide_on_rank0(backend, lambda: read_resume_meta(cfg, resume_path, backend, steps,
                                                              global_batch, digest),
                            "resume_meta") if resume_path else None)
    if meta is not None:    # the run's record keeps the weights it started from (not read now)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, weights=(meta.config.get("model") or {}).get("weights")))

    # --- model, on every device; rank 0's initial parameters everywhere
    in_units = train_split.images.shape[1]
    net = build_network(cfg.model, in_units, train_split.image_shape)
    # A resume loads its checkpoint over every parameter: model.weights is not read.
    start = dataclasses.replace(cfg.model, weights=None) if resume_path else cfg.model
    initialize_network(net, start, backend.contexts, cfg.train.seed, in_units)
    backend.broadcast_parameters(net.collect_params())  # Horovod: identical start on all ranks
    stepper = build_step(cfg, backend, net, train_split.images, train_split.labels,
                         train_split.image_shape)
    trainer = stepper.trainer
    start_epoch = 0
    if resume_path:
        ckpt.load_checkpoint(resume_path, net, trainer, backend.contexts)
        start_epoch = meta.epoch + 1

    evaluator = Evaluator(cfg, test_split, train_split) if backend.is_main else None  # rank 0
    recorder = make_recorder(backend.is_main, run_dir, cfg, meta.history if meta else (),
                             baseline=evaluator.raw if evaluator else None)
    lr_at = schedule.from_config(cfg.optim, cfg.train.epochs, steps, global_batch)
    note = batch_note(cfg, backend.num_workers, global_batch)
    if note:
        log.info(note)
    log.info("backend %s: %d process(es) x %d device(s) = world size %d on %s; %d steps/epoch "
             "of %d samples (global batch), run dir %s%s", backend.name, backend.num_processes,
             devices, backend.num_workers, [str(c) for c in backend.contexts], steps,
             global_batch, run_dir,
             f"; resuming after epoch {start_epoch} from {resume_path}" if resume_path else "")

    if start_epoch >= cfg.train.epochs:
        log.info("the run has done all %d epochs: nothing to train (raise train.epochs to "
                 "continue it); its model, projector and report are written again",
                 cfg.train.epochs)
    if resume_path and cfg.sampler.memory:
        log.warning("sampler.memory=%d: the cross-batch memory is not checkpointed; it starts "
                    "empty again, so this run will not end with the parameters of an "
                    "uninterrupted one", cfg.sampler.memory)
    ctx0 = backend.contexts[0]
    # The epoch (1-based) whose checkpoint is the last good one, for the non-finite message.
    good_epoch = start_epoch if resume_path else None
    final: dict = {}
    emb = None  # (N, D) test embeddings of the last evaluation (rank 0)
    for epoch in range(start_epoch, cfg.train.epochs):
        t_epoch = time.perf_counter()
        seed_layers(backend, cfg.train.seed, epoch)
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
        if eval_due(cfg, epoch):  # rank 0's count, on all ranks (an allreduce waits on each:
            # Horovod's broadcast_object returns on the root at once, which then shut down)
            mine = 0 if new_emb is None else int(np.count_nonzero(~np.isfinite(new_emb)))
            if bad := round(backend.allreduce_mean([mine])[0] * backend.num_processes):
                raise non_finite_error(cfg, losses, epoch, good_epoch, embeddings=bad)
        row.update(res)
        emb = new_emb if new_emb is not None else emb
        # Where the epoch went, without per-step syncs: sampling, training (incl. the
        # epoch's index copy; of which the host sat waiting for the device: near train =
        # device-bound, near 0 = host-bound), the end-of-epoch allreduce (waits for the
        # slowest rank), evaluation.
        timing = timing_text(t_sample, train_time, t_wait, t_allreduce)
        recorder.record_epoch(epoch, row, timing)
        recorder.save_checkpoint(epoch, net, trainer, steps_per_epoch=steps,
                                 processes=backend.num_processes, devices=devices, data=digest)
        if cfg.checkpoint.keep > 0:
            good_epoch = epoch + 1
        final = row

    if emb is None:  # resumed after the last epoch: embed once for the export (rank 0)
        res, emb = evaluate_if_due(evaluator, cfg, cfg.train.epochs - 1, net, ctx0, force=True)
        res.pop("time_eval_s", None)
        final = dict(final or (recorder.history[-1] if recorder.history else {}), **res)
    if backend.is_main:  # the end-of-run exports: rank 0 alone, no collective inside
        final = finish_run(recorder, final, net, ctx0, test_split, emb,
                           {"world_size": backend.num_workers, "backend": backend.name})
    backend.barrier()  # Horovod: nobody leaves while rank 0 still writes
    return RunResult(final if backend.is_main else {}, net, trainer, backend, run_dir)


def seed_layers(backend, seed: int, epoch: int) -> None:
    """Seed MXNet's generator on each device from (seed, epoch, worker) before an epoch: the
    Dropout of the model-zoo backbones (squeezenet, vgg, alexnet, inceptionv3) then draws
    the same masks in a resumed run as in an uninterrupted one (checkpoint.py)."""
    import mxnet as mx
    for device, ctx in enumerate(backend.contexts):
        state = np.random.SeedSequence([seed, epoch, backend.worker_rank(device), 3])
        mx.random.seed(int(state.generate_state(1)[0]), ctx=ctx)


_LOST_RANK_WAIT_S = 2.0     # seconds a rank whose peer died waits before it exits (run)


def run(cfg: Config, on_step: Optional[StepHook] = None) -> int:
    """:func:`train`, with the command line's error handling; returns the exit status:
    0, or 2 after one ``error: ...`` line on bad input or a non-finite loss. Releases the
    run directory's lock and leaves Horovod in any case. When another rank died (Horovod
    shut down under this one), one line and ``os._exit(1)``: MXNet's atexit hook would
    print a traceback of the same shutdown."""
    lost = False
    try:
        train(cfg, on_step=on_step)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:        # noqa: BLE001  (MXNetError: only the shutdown is ours)
        if not any(sign in str(exc) for sign in ("Horovod has been shut down", "by peer")):
            raise                   # "Connection reset by peer", "... closed by peer": Gloo
        print("error: another rank stopped, so this one stops too (Horovod shut down)",
              file=sys.stderr, flush=True)
        lost = True
    except KeyboardInterrupt:       # Ctrl-C (horovodrun passes it to every rank)
        if launcher_rank() == 0:
            print("interrupted: the run directory keeps its last complete checkpoint; the "
                  "same command with checkpoint.resume=auto and that output.dir continues "
                  "it", file=sys.stderr, flush=True)
        return 130
    finally:
        rundir.release_run_dir()  # the run directory's lock (rank 0)
        # Horovod: leave it here, not in its atexit hook, which complains after an error.
        dist.shutdown()
    if lost:            # after a pause: the launcher is to name the rank that died first
        sys.stdout.flush()
        time.sleep(_LOST_RANK_WAIT_S)
        os._exit(1)
    return 0
