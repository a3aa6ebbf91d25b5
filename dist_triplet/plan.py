"""The job's plan, without MXNet: the config and data checked, and the job's shape.

Both the pre-flight check (``python -m dist_triplet.check``, before horovodrun starts any
rank) and training (``loop.train``, on every rank) call :func:`make_plan`, so a job is
judged by the same code before and after it starts:

* the backend (``distributed.backend``, ``auto`` resolved from the launcher's
  environment: ``launcher.choose_backend``);
* both data splits, read and checked (``data.load_data``) with enough classes for the
  sampler;
* this process's ``EpochSampler``: steps per epoch, and the global batch (triplets, or
  P x K images, of all workers in one step);
* the run directory the config asks for (``rundir.requested_run_dir``; None = a new
  timestamped one under ``output.root``).

A job is described by a :class:`JobShape` (rank, processes, devices per process): a real
``dist.Backend`` is one, and the check makes one for the job it is about to start.
Imports NumPy, PyYAML and the data readers; never MXNet or Horovod.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from . import checkpoint as ckpt
from .augment import augmentation, check_rows
from . import schedule
from .config import Config, config_from_dict, flat_dict, parse_devices
from .data import Split, check_sampler_classes, detect_format, load_data
from .launcher import choose_backend
from .rundir import requested_run_dir
from .triplets import EpochSampler

__all__ = ["JobShape", "Plan", "make_plan", "devices_per_process", "load_splits",
           "build_sampler", "read_resume_meta", "batch_note"]

log = logging.getLogger("dist_triplet")


class JobShape:
    """The shape of a job, as the plan reads it from a ``dist.Backend``: process ``rank``
    of ``num_processes`` processes with ``devices`` devices each. ``contexts`` holds
    placeholders: the devices themselves are chosen by the ranks (``dist.py``)."""

    def __init__(self, num_processes: int, devices: int, rank: int = 0):
        self.rank = rank
        self.num_processes = num_processes
        self.contexts = [None] * devices
        self.num_workers = num_processes * devices

    def worker_rank(self, device: int) -> int:
        """Global worker index of this process's device ``device`` (0-based)."""
        return self.rank * len(self.contexts) + device


def devices_per_process(cfg: Config, backend: str) -> Optional[int]:
    """Devices each process drives, when known without MXNet: 1 for local and horovod, N
    for kvstore 'cpu:N' or N GPU ids; None for kvstore 'all' (the GPU count of a host).
    ``backend`` is the resolved one (not ``auto``).

    Raises:
        ValueError: a malformed ``distributed.devices`` (``config.parse_devices``).
    """
    if backend != "kvstore":
        return 1
    kind, value = parse_devices(cfg.distributed.devices)
    if kind == "cpu":
        return value
    return len(value) if value else None  # 'all' (None) or no ids: the host decides


def load_splits(cfg: Config) -> tuple:
    """(train, test) splits of ``cfg.data``, checked (``data.load_data``: formats, split,
    class rules, one width) and with enough classes for the sampler. Every rank reads the
    test set too, so a broken file fails on all ranks alike instead of leaving the others
    waiting in a collective."""
    train_split, test_split = load_data(cfg.data)
    check_sampler_classes(train_split, cfg.sampler.kind, cfg.sampler.p)
    seen = np.intersect1d(train_split.labels, test_split.labels)
    if cfg.data.split == "classes" and seen.size:   # the data brought a test split
        log.warning("data.split=classes, but %d of the %d test classes are training classes: "
                    "the data bring their own test split, used as it is (data.split then "
                    "sets only the test rules)", seen.size, np.unique(test_split.labels).size)
    return train_split, test_split


def build_sampler(cfg: Config, job, labels) -> EpochSampler:
    """The ``EpochSampler`` of process ``job.rank`` (``job``: a :class:`JobShape` or a
    ``dist.Backend``) for ``cfg``.

    Raises:
        ValueError: a batch does not fit a worker's shard (names the keys).
    """
    s = cfg.sampler
    return EpochSampler(labels, kind=s.kind, batch_size=cfg.train.batch_size, p=s.p, k=s.k,
                        steps_per_epoch=s.steps_per_epoch, seed=cfg.train.seed,
                        rank=job.rank, num_processes=job.num_processes,
                        worker_ranks=[job.worker_rank(d) for d in range(len(job.contexts))],
                        num_workers=job.num_workers, scope=s.scope)


# Keys read only by some jobs: (key, used(cfg, backend), when); set elsewhere they did
# nothing, silently (adversarial trial).
_USED_WHEN = (
    *((f"sampler.{k}", lambda c, b: c.sampler.kind == "pk", "sampler.kind=pk")
      for k in ("p", "k", "miner", "steps_per_epoch")),
    ("train.batch_size", lambda c, b: c.sampler.kind == "offline",
     "sampler.kind=offline; a P x K batch is sampler.p x sampler.k"),
    ("optim.momentum", lambda c, b: c.optim.optimizer == "sgd", "optim.optimizer=sgd"),
    ("optim.base_batch", lambda c, b: c.optim.scale_lr, "optim.scale_lr=true"),
    ("eval.query_seed", lambda c, b: c.eval.max_queries > 0, "eval.max_queries > 0"),
    ("distributed.devices", lambda c, b: b == "kvstore", "the kvstore backend"),
    ("distributed.compression", lambda c, b: b == "horovod", "the horovod backend"),
    *((f"data.{k}", lambda c, b: bool(c.data.path) and (c.data.format if c.data.format != "auto"
                                                     else detect_format(c.data.path))
       in ("folder", "csv"), "image files (data.format folder or csv)")
      for k in ("mode", "image_size")),
)


@dataclass(frozen=True)
class Plan:
    """A checked job: what :func:`make_plan` returns.

    cfg: the config. backend: the backend to run (``auto`` resolved).
    train, test: the checked data splits.
    job: the job's shape (a :class:`JobShape` or the ``dist.Backend``); None when the
        devices per process are not known without MXNet (kvstore 'all').
    sampler: this process's ``EpochSampler`` (None with ``job``).
    run_dir: the run directory the config names (None: a new one under output.root).
    """

    cfg: Config
    backend: str
    train: Split
    test: Split
    job: Optional[object]
    sampler: Optional[EpochSampler]
    run_dir: Optional[str]

    @property
    def warnings(self) -> List[str]:
        """Lines for rank 0's log and the pre-flight check: the keys set away from their
        default that this job does not read (:data:`_USED_WHEN`), and an offline epoch that
        covers under half of the training rows (one small class bounds it: the seed's
        create_pairs makes C x (smallest class - 1) triplets an epoch), and P x K batches
        whose k rows of a class are drawn with replacement (a worker's share of the
        smallest class, or the class for global scope, holds fewer than k rows)."""
        now, default = flat_dict(self.cfg.to_dict()), flat_dict(Config().to_dict())
        unused = [f"{k}={now[k]!r} (read only with {when})" for k, used, when in _USED_WHEN
                  if now[k] != default[k] and not used(self.cfg, self.backend)]
        out = [f"keys this run does not read: {'; '.join(unused)}"] if unused else []
        per_class = np.bincount(self.train.labels)
        small = int(np.argmin(np.where(per_class > 0, per_class, per_class.max())))
        made = int(np.count_nonzero(per_class)) * (int(per_class[small]) - 1)
        if self.cfg.sampler.kind == "offline" and made < len(self.train) / 2:
            out.append(f"an epoch makes {made:,} triplets from {len(self.train):,} training "
                       f"rows: the offline sampler (the seed's create_pairs) takes "
                       f"{np.count_nonzero(per_class)} classes x (smallest class - 1), and "
                       f"class {self.train.class_names[small]!r} has {per_class[small]} rows; "
                       "sampler.kind=pk draws from every row")
        sp, w = self.cfg.sampler, self.job.num_workers if self.job is not None else 1
        share, need = (per_class[small], w * sp.k) if sp.scope == "global" else \
            (per_class[small] // w, sp.k)
        if sp.kind == "pk" and share < need:
            out.append(f"sampler.k={sp.k}: class {self.train.class_names[small]!r} has "
                       f"{per_class[small]} rows, " + (f"fewer than the {need} a global batch "
                       f"takes" if sp.scope == "global" else f"a worker's share {share} of "
                       f"{w} workers") + ": its k rows are drawn with replacement, so a "
                       "positive can be the anchor's own image (lower sampler.k)")
        return out

    @property
    def steps(self) -> Optional[int]:
        """Optimizer steps per epoch (every rank runs the same number)."""
        return self.sampler.steps if self.sampler else None

    @property
    def global_batch(self) -> Optional[int]:
        """Triplets (offline) or images (P x K) of all workers in one step."""
        return self.sampler.per_step * self.job.num_processes if self.sampler else None


def make_plan(cfg: Config, job=None, processes: int = 1, environ=None) -> Plan:
    """Check ``cfg`` and its data and work out the job's shape; writes nothing.

    Args:
        cfg: the run's config.
        job: the running job (a ``dist.Backend``), or None to plan one of ``processes``
            processes started by a launcher (the pre-flight check).
        processes: with ``job`` None, the processes the launcher will start.
        environ: the environment the backend is chosen from (default ``os.environ``);
            with ``job`` None the plan assumes a launcher of ``processes`` processes.

    Raises:
        ValueError / FileNotFoundError: one line naming the file, key or value (bad
            data, a batch larger than a shard, a backend that conflicts with the
            launcher, ...).
    """
    if job is None:
        if processes < 1:
            raise ValueError(f"--processes={processes} must be >= 1")
        environ = {"HOROVOD_SIZE": str(processes)} if environ is None else environ
    backend = choose_backend(cfg.distributed.backend, environ)
    train_split, test_split = load_splits(cfg)
    if augmentation(cfg.augment, train_split.image_shape):    # a device's rows a step
        s, batch = cfg.sampler, cfg.train.batch_size
        check_rows(train_split.image_shape, s.p * s.k if s.kind == "pk" else 3 * batch)
    if job is None:
        devices = devices_per_process(cfg, backend)
        job = JobShape(processes, devices) if devices is not None else None
    sampler = build_sampler(cfg, job, train_split.labels) if job is not None else None
    return Plan(cfg, backend, train_split, test_split, job, sampler, requested_run_dir(cfg))


def batch_note(cfg: Config, world_size: int, global_batch: int) -> Optional[str]:
    """One line for the log when the global batch grows with the workers at a learning
    rate that does not (``optim.scale_lr`` off, more than one worker); None otherwise.
    ``global_batch``: triplets (offline) or images (P x K) of one step of all workers."""
    if world_size <= 1 or cfg.optim.scale_lr:
        return None
    unit = "triplets" if cfg.sampler.kind == "offline" else "images"
    return (f"global batch {global_batch} {unit} ({world_size} workers x "
            f"{global_batch // world_size}) at lr {cfg.optim.lr:g}; optim.scale_lr is off: "
            f"the same config on another number of workers trains with another global "
            f"batch at this rate (optim.scale_lr=true scales lr by global batch / "
            f"optim.base_batch={cfg.optim.base_batch})")


def data_digest(split: Split) -> str:
    """A digest of the training data a checkpoint records (resume refuses other data): BLAKE2b
    (128 bits) of the labels, the images' shape and dtype, and up to 1,024 rows evenly
    spaced (all of the labels; a sample of the pixels, so that it costs milliseconds)."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    rows = np.unique(np.linspace(0, len(split.images) - 1, 1024).astype(np.int64))
    for arr in (split.labels, split.images[rows]):
        h.update(f"{arr.dtype.str}{arr.shape}{split.images.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def read_resume_meta(cfg: Config, resume_path: str, job, steps: int, global_batch: int,
                     data: Optional[str] = None):
    """The checkpoint's record, checked against this job (``checkpoint.check_compatible``;
    ``data``: the training data's :func:`data_digest`).

    When "schedule" keys changed, logs an info line naming them, and a warning only when
    the learning rate of some remaining global step (``(meta.epoch + 1) * steps`` up to
    ``train.epochs * steps``) differs between the checkpoint's config and this one
    (``schedule.first_difference``): e.g. a longer train.epochs on a constant schedule
    without warm-up changes nothing that is left to run. Training calls it on rank 0 only
    (``dist.decide_on_rank0``); every rank loads the checkpoint's parameters, so the path
    must be on a shared file system.

    Raises:
        ValueError: nothing left to train, or the checkpoint does not fit this job
            (``checkpoint.check_compatible``).
    """
    meta = ckpt.read_meta(resume_path)
    if meta.epoch + 1 > cfg.train.epochs:
        raise ValueError(f"{resume_path}: checkpoint is after epoch {meta.epoch + 1}; "
                         f"train.epochs={cfg.train.epochs} leaves nothing to train (give "
                         f"train.epochs > {meta.epoch + 1} to continue)")
    changed = ckpt.check_compatible(meta, cfg.to_dict(), resume_path,
                                    processes=job.num_processes,
                                    devices=len(job.contexts), steps=steps, data=data)
    weights = cfg.model.weights and os.path.abspath(cfg.model.weights)
    if weights and weights != (meta.config.get("model") or {}).get("weights"):
        log.warning("model.weights=%s is not read: a resume loads %s, which holds every "
                    "parameter (model.weights starts a new run; the run keeps its own)",
                    cfg.model.weights, resume_path)
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
