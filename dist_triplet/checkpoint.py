"""Epoch checkpoints: atomic writes by rank 0, last-K retention, and resume on every rank.

Layout of ``<run>/checkpoints/epoch-0003/`` (the checkpoint after "epoch 3/N" of the log,
0-based epoch 2; runs written before the names matched the log used the 0-based number,
``epoch-0002``, and still resume: a checkpoint's epoch is the one in its meta.json):

* ``params``          ``net.save_parameters``
* ``trainer.states``  ``Trainer.save_states``: the pickled optimizer (learning rate, update
  counts) and its per-parameter state (momentum, Adam's moments)
* ``meta.json``       a :class:`CheckpointMeta`: epoch (0-based), steps per epoch, world
  size (workers = processes x devices), the resolved config and a copy of the metrics
  history up to this epoch (the run's ``recorder.Recorder`` owns the history; the copy lets
  a resumed run continue metrics.json); written last

This module is storage only. Which config keys may change on resume is declared beside
each key in config.py (``resume`` metadata); :func:`check_compatible` reads it from there.
Choosing the checkpoint to resume from is run-directory policy (``rundir.find_resume``).

Atomicity: a checkpoint is written into ``.epoch-0003.tmp-<pid>/``, its files are fsynced,
and the directory is then renamed to ``epoch-0003``. A rename within one file system is
atomic, so a run killed at any moment leaves either a complete ``epoch-NNNN`` or none;
``list_checkpoints`` also ignores ``epoch-NNNN`` directories that lack a file, and the next
save removes stale ``.epoch-*.tmp-*`` leftovers.

RNG state: none is saved because none is needed. Triplets are a function of
(seed, epoch, rank) (``triplets.create_pairs`` / ``pk_batches``), parameters are
initialised from the seed and then overwritten by the checkpoint, and layers that draw
random numbers (the Dropout of some model-zoo backbones) draw them from MXNet's generator,
seeded from (seed, epoch, worker) before every epoch (``loop.seed_layers``). So a run
resumed after epoch e draws exactly
the batches an uninterrupted run draws, and ends with the same parameters (to float
round-off; tests/test_checkpoint.py checks 1e-6).

Every rank reads the checkpoint it resumes from, so the checkpoint directory must be on a
file system all hosts see (NFS, Lustre, a shared volume); only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .config import Config, flat_dict, resume_policies
from .export import mxnet_error_line
from .fsutil import fsync_dir, fsync_tree, write_json

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d{4,})$")
_TMP = re.compile(r"^\.epoch-\d{4,}\.(tmp|old)-\d+$")
# A checkpoint is complete only when all three are present (meta.json is written last).
FILES = ("params", "trainer.states", "meta.json")

def checkpoint_name(epoch: int) -> str:
    """Directory name of the checkpoint of 0-based ``epoch``, numbered as the log's
    "epoch 3/N" line: ``epoch-0003`` for 0-based 2."""
    return f"epoch-{epoch + 1:04d}"


def _epoch_of(path: str, number: int) -> int:
    """The 0-based epoch of checkpoint directory ``path`` from its meta.json; the name's
    ``number`` minus 1 when meta.json cannot be read (``read_meta`` then says why)."""
    try:
        with open(os.path.join(path, "meta.json")) as fh:
            return int(json.load(fh)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return number - 1


def list_checkpoints(ckpt_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``ckpt_dir`` as (0-based epoch, path), oldest first.

    Skips temporary directories of an interrupted save (``.epoch-0003.tmp-123``) and
    ``epoch-NNNN`` directories missing any of ``FILES``. A missing ``ckpt_dir`` gives [].
    """
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and all(os.path.isfile(os.path.join(path, f)) for f in FILES):
            found.append((_epoch_of(path, int(m.group(1))), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


@dataclass
class CheckpointMeta:
    """What ``meta.json`` holds, typed. JSON keys are the field names, except
    ``steps_per_epoch``, stored as ``steps`` (the key of checkpoints already written).

    epoch: 0-based epoch the checkpoint ends.
    config: the run's ``Config.to_dict()``.
    world_size: workers (processes x devices) that trained it.
    processes: processes in collectives (Horovod ranks; 1 otherwise); None in a record
        written before it existed (then read as ``world_size``).
    devices: devices per process; None in an old record (then read as 1).
    steps_per_epoch: optimizer steps per epoch; None when not recorded.
    history: per-epoch metric rows up to ``epoch`` (a copy of the recorder's).
    data: the training data's digest (``plan.data_digest``); None when not recorded.
    """
    epoch: int
    config: dict
    world_size: int
    processes: Optional[int] = None
    devices: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    history: List[dict] = field(default_factory=list)
    data: Optional[str] = None

    def to_json(self) -> dict:
        doc = {"epoch": self.epoch, "config": self.config, "world_size": self.world_size}
        for key, value in (("processes", self.processes), ("devices", self.devices),
                           ("steps", self.steps_per_epoch), ("data", self.data)):
            if value is not None:
                doc[key] = value
        if self.history:
            doc["history"] = self.history
        return doc

    @classmethod
    def from_json(cls, meta, meta_path: str) -> "CheckpointMeta":
        """Validate a parsed meta.json; ValueError names the file and the bad key."""
        absent = ([k for k in ("epoch", "config", "world_size") if k not in meta]
                  if isinstance(meta, dict) else [])
        if not isinstance(meta, dict) or absent:
            raise ValueError(f"{meta_path}: not a dist_triplet checkpoint (missing "
                             f"{', '.join(absent) or 'a JSON object'})")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [("epoch", is_int(meta["epoch"]) and meta["epoch"] >= 0, "an integer >= 0"),
                  ("config", isinstance(meta["config"], dict)
                   and all(isinstance(v, dict) for v in meta["config"].values()),
                   "a mapping of config sections"),
                  ("world_size", is_int(meta["world_size"]) and meta["world_size"] >= 1,
                   "an integer >= 1")]
        checks += [(k, is_int(meta[k]) and meta[k] >= 1, "an integer >= 1")
                   for k in ("processes", "devices", "steps") if k in meta]
        if "data" in meta:
            checks.append(("data", isinstance(meta["data"], str), "a digest string"))
        if "history" in meta:
            checks.append(("history", isinstance(meta["history"], list)
                           and all(isinstance(r, dict) for r in meta["history"]),
                           "a list of per-epoch rows"))
        for key, ok, want in checks:
            if not ok:
                raise ValueError(f"{meta_path}: {key} must be {want}, found {meta[key]!r}; "
                                 "the file was edited or damaged: resume from another "
                                 "checkpoint")
        return cls(epoch=meta["epoch"], config=meta["config"], world_size=meta["world_size"],
                   processes=meta.get("processes"), devices=meta.get("devices"),
                   steps_per_epoch=meta.get("steps"), history=list(meta.get("history", [])),
                   data=meta.get("data"))


def save_checkpoint(ckpt_dir: str, net, trainer, meta: CheckpointMeta, keep: int) -> str:
    """Write the checkpoint of the finished epoch ``meta.epoch`` (0-based) atomically; keep
    the last ``keep``.

    Rank 0 only; calls no collective. Checkpoints of *later* epochs than ``meta.epoch``
    belong to a continuation abandoned by resuming from an older checkpoint and are
    removed, so ``resume=auto`` never jumps back onto that abandoned line.

    Args:
        ckpt_dir: ``<run>/checkpoints``; created if missing.
        net, trainer: the Gluon block and its Trainer.
        meta: the record stored as meta.json.
        keep: number of newest checkpoints kept, >= 1.

    Returns:
        The checkpoint's directory ``<ckpt_dir>/epoch-NNNN``.

    Raises:
        ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.keep={keep}: save_checkpoint needs keep >= 1")
    epoch = meta.epoch
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):  # leftovers of a save that was killed
        if _TMP.match(name):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    name = checkpoint_name(epoch)
    final = os.path.join(ckpt_dir, name)
    # A directory, so fsutil.atomic_write (one file) does not fit; the same recipe: write
    # into a temp sibling, fsync, rename.
    tmp = os.path.join(ckpt_dir, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    net.save_parameters(os.path.join(tmp, "params"))
    trainer.save_states(os.path.join(tmp, "trainer.states"))
    write_json(os.path.join(tmp, "meta.json"), meta.to_json())  # last: marks it complete
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):  # re-running an epoch after a resume: move the old one aside
        old = os.path.join(ckpt_dir, f".{name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(ckpt_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    found = list_checkpoints(ckpt_dir)
    for ep, path in found:
        if ep > epoch:
            log.warning("removing %s: it continues an older line of this run than the one "
                        "resumed from", path)
            shutil.rmtree(path, ignore_errors=True)
    found = [(ep, path) for ep, path in found if ep <= epoch]
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read_meta(path: str) -> CheckpointMeta:
    """The meta record of checkpoint directory ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint directory (names the path
            and the missing file).
        ValueError: meta.json is not valid JSON, lacks epoch / config / world_size, holds a
            value of the wrong type, or its epoch does not match the directory name (names
            the file).
    """
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(
            f"checkpoint.resume: {path!r} is not a complete checkpoint directory (missing "
            f"{', '.join(missing)}); checkpoints look like <run>/checkpoints/epoch-0003")
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON: {exc}") from None
    meta = CheckpointMeta.from_json(doc, meta_path)
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    # The name is the log's 1-based epoch; before that it was the 0-based one.
    if m and int(m.group(1)) not in (meta.epoch + 1, meta.epoch):
        raise ValueError(f"{meta_path}: epoch {meta.epoch} (0-based) does not match the "
                         f"directory name {m.group(0)}; the checkpoint was renamed or "
                         "edited: resume from another checkpoint")
    return meta


def check_compatible(meta: CheckpointMeta, config: dict, path: str, *, processes: int,
                     devices: int, steps: Optional[int] = None,
                     data: Optional[str] = None) -> List[str]:
    """Refuse to resume when the run would not continue the same computation.

    The keys compared, and how, are the ``resume`` policies declared in config.py.

    Args:
        meta: the checkpoint's record (``read_meta``).
        config: the new run's ``Config.to_dict()``.
        path: the checkpoint, for messages.
        processes: processes taking part in collectives now (Horovod ranks; 1 otherwise).
        devices: devices per process now (kvstore: several; else 1).
        steps: steps per epoch now; compared with the checkpoint's when given.
        data: the training data's digest now; compared with the checkpoint's when both are
            known (data.path and data.root may change: the data may move, not differ).

    Returns:
        The "schedule" keys that differ, as "key: old -> new" strings (allowed; the caller
        logs them, and warns when a remaining step's learning rate changes).

    Raises:
        ValueError: a "fixed" key differs (names the key, both values and the checkpoint);
            or the world size (processes x devices) differs, since each worker's triplet
            shard depends on it; or the steps per epoch or the data digest differ (the
            training data changed).
    """
    # A key missing from the checkpoint's config was added to dist_triplet after it was
    # written: keys are added with the default that keeps the old behaviour, so the saved
    # run had that default (e.g. sampler.scope 'local', data.format 'auto').
    saved = dict(flat_dict(Config().to_dict()), **flat_dict(meta.config))
    new = flat_dict(config)
    policies = resume_policies()
    for key in (k for k, p in policies.items() if p == "fixed"):
        if key == "model.channels" and new["model.backbone"] != "convnet":
            continue    # no conv blocks: runs from before it was refused there set it freely
        if saved.get(key) != new[key]:
            raise ValueError(f"cannot resume from {path}: {key} was {saved.get(key)!r} there, "
                             f"is {new[key]!r} now; use the same value or start a fresh run "
                             "(another output.dir)")
    old_p = meta.processes if meta.processes is not None else meta.world_size
    old_d = meta.devices if meta.devices is not None else 1
    if (old_p, old_d) != (processes, devices):
        # Offline triplets are sharded over processes and then split over each process's
        # devices, so the same world size split differently still draws other triplets.
        same = ("the same world size, but processes x devices differ"
                if old_p * old_d == processes * devices else "a different world size")
        raise ValueError(
            f"cannot resume from {path}: world size was {meta.world_size} there "
            f"({old_p} process(es) x {old_d} device(s)), is {processes * devices} now "
            f"({processes} x {devices}): {same}; each worker's triplets depend on both, so "
            f"resume with {old_p} process(es) x {old_d} device(s)")
    if steps is not None and meta.steps_per_epoch not in (None, steps):
        raise ValueError(f"cannot resume from {path}: {meta.steps_per_epoch} steps per epoch "
                         f"there, {steps} now with the same config, so the training data "
                         f"differ (data.root={new.get('data.root')!r})")
    if data is not None and meta.data not in (None, data):
        where = "; ".join(f"{k} {saved.get(k)!r} there, {new.get(k)!r} now" for k in (
            "data.path", "data.root") if saved.get(k) != new.get(k)) or "the same paths"
        raise ValueError(f"cannot resume from {path}: the training data differ from the ones "
                         f"it was trained on ({where}; digest {meta.data[:12]} there, "
                         f"{data[:12]} now); resume on the same data or start a fresh run")
    return [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k, p in policies.items()
            if p == "schedule" and saved.get(k) != new[k]]


def load_checkpoint(path: str, net, trainer, ctx) -> CheckpointMeta:
    """Load parameters and trainer state from ``path`` into ``net`` / ``trainer``.

    Every rank calls it (each reads the files, so ``path`` must be on a file system every
    host sees). ``trainer.load_states`` replaces the trainer's optimizer by the pickled
    one, learning rate included; the training loop sets the learning rate before every
    step, so the current config's schedule applies. Returns the checkpoint's record.

    Raises:
        FileNotFoundError / ValueError: as ``read_meta``; ValueError naming the file when
            ``params`` or ``trainer.states`` cannot be loaded (truncated, corrupt).
    """
    meta = read_meta(path)
    for name, load in (("params", lambda f: net.load_parameters(f, ctx=ctx)),
                       ("trainer.states", trainer.load_states)):
        try:
            load(os.path.join(path, name))
        except Exception as exc:  # noqa: BLE001 - MXNetError, pickle or assertion errors
            raise ValueError(f"{os.path.join(path, name)}: cannot load ({type(exc).__name__}: "
                             f"{mxnet_error_line(exc)}); "
                             "resume from an older checkpoint of the run instead") from exc
    return meta
