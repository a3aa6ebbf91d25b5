"""Epoch checkpoints: atomic writes by rank 0, last-K retention, and resume on every rank.

Layout of ``<run>/checkpoints/epoch-0003/`` (the checkpoint of the 4th epoch, 0-based 3):

* ``params``          ``net.save_parameters``
* ``trainer.states``  ``Trainer.save_states``: the pickled optimizer (learning rate, update
  counts) and its per-parameter state (momentum, Adam's moments)
* ``meta.json``       epoch (0-based), steps per epoch, world size as processes x devices,
  the resolved config and the metrics history up to this epoch; written last

Atomicity: a checkpoint is written into ``.epoch-0003.tmp-<pid>/``, its files are fsynced,
and the directory is then renamed to ``epoch-0003``. A rename within one file system is
atomic, so a run killed at any moment leaves either a complete ``epoch-NNNN`` or none;
``list_checkpoints`` also ignores ``epoch-NNNN`` directories that lack a file, and the next
save removes stale ``.epoch-*.tmp-*`` leftovers.

RNG state: none is saved because none is needed. Triplets are a function of
(seed, epoch, rank) (``triplets.create_pairs`` / ``pk_batches``), parameters are
initialised from the seed and then overwritten by the checkpoint, and no layer draws
random numbers during training (no dropout). So a run resumed after epoch e draws exactly
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
from typing import List, Optional, Tuple

from .export import mxnet_error_line

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d{4,})$")
_TMP = re.compile(r"^\.epoch-\d{4,}\.(tmp|old)-\d+$")
# A checkpoint is complete only when all three are present (meta.json is written last).
FILES = ("params", "trainer.states", "meta.json")

# Config keys that must match to continue a run: they change the parameters' shapes, what
# a step computes, the optimizer state's meaning (momentum and wd are pickled with the
# optimizer in trainer.states, so a new value would be silently ignored), or which
# triplets each rank draws.
RESUME_KEYS = (
    "model.hidden", "model.final_relu", "model.normalize", "loss.margin",
    "sampler.kind", "sampler.p", "sampler.k", "sampler.miner", "sampler.steps_per_epoch",
    "optim.optimizer", "optim.momentum", "optim.wd",
    "train.batch_size", "train.seed", "data.dataset", "data.limit_train",
)
# Keys that may change on resume: the learning rate of every step is recomputed from the
# current config (train.learning_rate), so lowering optim.lr after a divergence, or
# extending train.epochs, works. The resumed run then differs from an uninterrupted one
# with the old values, so train() logs a warning naming them.
SCHEDULE_KEYS = (
    "optim.lr", "optim.schedule", "optim.warmup_epochs", "optim.scale_lr", "optim.base_batch",
    "train.epochs",
)


def checkpoint_name(epoch: int) -> str:
    """Directory name of the checkpoint of 0-based ``epoch``: ``epoch-0003``."""
    return f"epoch-{epoch:04d}"


def list_checkpoints(ckpt_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``ckpt_dir`` as (epoch, path), oldest first.

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
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


# Files that mark a directory as some run's directory (train.Rank0 writes them first).
RUN_FILES = ("config.yaml", "metrics.json")


def find_resume(resume: Optional[str], ckpt_dir: str,
                config: Optional[dict] = None) -> Optional[str]:
    """The checkpoint to resume from, for ``checkpoint.resume`` and the run's ``ckpt_dir``.

    ``None`` (start fresh) refuses a run directory (``dirname(ckpt_dir)``) that already
    holds a run: checkpoints (the new run's saves and the last-K retention would mix with
    the old run's: an old epoch-0009 outlives a new epoch-0002), or a ``config.yaml`` /
    ``metrics.json`` that the new run would overwrite. ``'auto'`` gives the newest complete
    checkpoint, or None (a fresh start) unless the directory holds another run's
    ``config.yaml`` whose ``RESUME_KEYS`` differ from ``config``. A path is returned as
    given (``read_meta`` checks it), unless ``ckpt_dir`` holds checkpoints and the path is
    not one of them: saving into ``ckpt_dir`` would then prune that other run's later
    epochs. Rank 0 decides; it calls no collective.

    Raises:
        ValueError: any refusal above (names the directory, the file or key, and the ways
            out).
    """
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    latest = latest_checkpoint(ckpt_dir)
    if resume == "auto":
        if latest is None and config is not None:
            _check_same_run(run_dir, config)
        return latest
    if resume:
        if latest is not None and not _inside(resume, ckpt_dir):
            raise ValueError(
                f"checkpoint.resume={resume!r} is not a checkpoint of output.dir {run_dir!r}, "
                f"which holds another run's checkpoints (latest {latest}); saving there would "
                "remove them. Choose another output.dir (or output.dir=null to continue in "
                "the checkpoint's own run directory)")
        return resume
    if latest is not None:
        raise ValueError(
            f"output.dir {run_dir!r} already holds "
            f"checkpoints (latest {latest}); pass checkpoint.resume=auto to continue that run, "
            "or choose another output.dir for a fresh one")
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if present:
        raise ValueError(
            f"output.dir {run_dir!r} already holds a run ({', '.join(present)}) and a fresh "
            "run would overwrite it; choose another output.dir, or pass "
            "checkpoint.resume=auto to continue that run")
    return None


def _check_same_run(run_dir: str, config: dict) -> None:
    """Refuse ``resume=auto`` without a checkpoint when ``run_dir/config.yaml`` belongs to a
    run whose ``RESUME_KEYS`` differ: restarting would silently replace that run."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    import yaml
    try:
        with open(path) as fh:
            saved = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the run's config ({exc}); choose another "
                         "output.dir") from None
    saved = _flat(saved) if isinstance(saved, dict) else {}
    new = _flat(config)
    for key in RESUME_KEYS:
        if saved.get(key) != new.get(key):
            raise ValueError(
                f"checkpoint.resume=auto: output.dir {run_dir!r} holds no checkpoint but "
                f"another run's config ({path}: {key} was {saved.get(key)!r}, is "
                f"{new.get(key)!r} now); choose another output.dir for a fresh run")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(path: str) -> None:
    """Flush the files of ``path`` to disk: the rename must not outrun the data (a power
    cut after the rename would otherwise leave a complete-looking, empty checkpoint)."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path)


def save_checkpoint(ckpt_dir: str, epoch: int, net, trainer, meta: dict, keep: int) -> str:
    """Write the checkpoint of a finished ``epoch`` (0-based) atomically; keep the last ``keep``.

    Rank 0 only; calls no collective. Checkpoints of *later* epochs than ``epoch`` belong
    to a continuation abandoned by resuming from an older checkpoint and are removed, so
    ``resume=auto`` never jumps back onto that abandoned line.

    Args:
        ckpt_dir: ``<run>/checkpoints``; created if missing.
        epoch: 0-based epoch just finished.
        net, trainer: the Gluon block and its Trainer.
        meta: JSON-serialisable dict stored in meta.json (``epoch`` is added).
        keep: number of newest checkpoints kept, >= 1.

    Returns:
        The checkpoint's directory ``<ckpt_dir>/epoch-NNNN``.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.keep={keep}: save_checkpoint needs keep >= 1")
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):  # leftovers of a save that was killed
        if _TMP.match(name):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    name = checkpoint_name(epoch)
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    net.save_parameters(os.path.join(tmp, "params"))
    trainer.save_states(os.path.join(tmp, "trainer.states"))
    with open(os.path.join(tmp, "meta.json"), "w") as fh:  # last: marks the files complete
        json.dump(dict(meta, epoch=epoch), fh, indent=1)
    _fsync_files(tmp)
    old = None
    if os.path.exists(final):  # re-running an epoch after a resume: move the old one aside
        old = os.path.join(ckpt_dir, f".{name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
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


def read_meta(path: str) -> dict:
    """The ``meta.json`` of checkpoint directory ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint directory (names the path
            and the missing file).
        ValueError: meta.json is not valid JSON or lacks epoch / config / world_size
            (names the file).
    """
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(
            f"checkpoint.resume: {path!r} is not a complete checkpoint directory (missing "
            f"{', '.join(missing)}); checkpoints look like <run>/checkpoints/epoch-0003")
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as fh:
        try:
            meta = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON: {exc}") from None
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
    if "history" in meta:
        checks.append(("history", isinstance(meta["history"], list)
                       and all(isinstance(r, dict) for r in meta["history"]),
                       "a list of per-epoch rows"))
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"{meta_path}: {key} must be {want}, found {meta[key]!r}; the "
                             "file was edited or damaged: resume from another checkpoint")
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != meta["epoch"]:
        raise ValueError(f"{meta_path}: epoch {meta['epoch']} does not match the directory "
                         f"name {m.group(0)} (epoch {int(m.group(1))}); the checkpoint was "
                         "renamed or edited: resume from another checkpoint")
    return meta


def _flat(config: dict) -> dict:
    return {f"{s}.{k}": v for s, sub in config.items() if isinstance(sub, dict)
            for k, v in sub.items()}


def check_compatible(meta: dict, config: dict, path: str, *, processes: int, devices: int,
                     steps: Optional[int] = None) -> List[str]:
    """Refuse to resume when the run would not continue the same computation.

    Args:
        meta: the checkpoint's meta dict (``read_meta``).
        config: the new run's ``Config.to_dict()``.
        path: the checkpoint, for messages.
        processes: processes taking part in collectives now (Horovod ranks; 1 otherwise).
        devices: devices per process now (kvstore: several; else 1).
        steps: steps per epoch now; compared with the checkpoint's when given.

    Returns:
        The ``SCHEDULE_KEYS`` that differ, as "key: old -> new" strings (allowed; the
        caller warns that the run no longer matches an uninterrupted one).

    Raises:
        ValueError: a key in ``RESUME_KEYS`` differs (names the key, both values and the
            checkpoint); or the world size (processes x devices) differs, since each
            worker's triplet shard depends on it; or the steps per epoch differ (the
            training data changed).
    """
    saved, new = _flat(meta["config"]), _flat(config)
    for key in RESUME_KEYS:
        if saved.get(key) != new[key]:
            raise ValueError(f"cannot resume from {path}: {key} was {saved.get(key)!r} there, "
                             f"is {new[key]!r} now; use the same value or start a fresh run "
                             "(another output.dir)")
    old_p = meta.get("processes", meta["world_size"])
    old_d = meta.get("devices", 1)
    if (old_p, old_d) != (processes, devices):
        # Offline triplets are sharded over processes and then split over each process's
        # devices, so the same world size split differently still draws other triplets.
        same = ("the same world size, but processes x devices differ"
                if old_p * old_d == processes * devices else "a different world size")
        raise ValueError(
            f"cannot resume from {path}: world size was {meta['world_size']} there "
            f"({old_p} process(es) x {old_d} device(s)), is {processes * devices} now "
            f"({processes} x {devices}): {same}; each worker's triplets depend on both, so "
            f"resume with {old_p} process(es) x {old_d} device(s)")
    if steps is not None and meta.get("steps") not in (None, steps):
        raise ValueError(f"cannot resume from {path}: {meta['steps']} steps per epoch there, "
                         f"{steps} now with the same config, so the training data differ "
                         f"(data.root={new.get('data.root')!r})")
    return [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in SCHEDULE_KEYS
            if saved.get(k) != new[k]]


def load_checkpoint(path: str, net, trainer, ctx) -> dict:
    """Load parameters and trainer state from ``path`` into ``net`` / ``trainer``.

    Every rank calls it (each reads the files, so ``path`` must be on a file system every
    host sees). ``trainer.load_states`` replaces the trainer's optimizer by the pickled
    one, learning rate included; the training loop sets the learning rate before every
    step, so the current config's schedule applies. Returns the checkpoint's meta dict.

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
