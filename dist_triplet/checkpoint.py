"""Epoch checkpoints: atomic writes by rank 0, last-K retention, and resume on every rank.

Layout: ``<run>/checkpoints/epoch-0003/`` holding ``params`` (``net.save_parameters``),
``trainer.states`` (``Trainer.save_states``: optimizer state and update counts),
``meta.json`` (epoch, step count, seed, world size, the resolved config). A checkpoint is
first written to ``.epoch-0003.tmp-<pid>/`` and then renamed: a rename within one
file system is atomic, so a killed run never leaves a half-written directory that looks
like a checkpoint. No RNG state is needed: triplets are a function of (seed, epoch, rank)
and nothing else in training draws random numbers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

_NAME = re.compile(r"^epoch-(\d{4,})$")

# Config keys that must match to continue a run: they change the parameters' shapes,
# what a step computes, or which triplets each rank draws.
RESUME_KEYS = (
    "model.hidden", "model.final_relu", "model.normalize", "loss.margin",
    "sampler.kind", "sampler.p", "sampler.k", "sampler.miner", "sampler.steps_per_epoch",
    "optim.optimizer", "optim.lr", "optim.momentum", "optim.wd", "optim.schedule",
    "optim.warmup_epochs", "optim.scale_lr", "optim.base_batch",
    "train.batch_size", "train.seed", "data.dataset", "data.limit_train",
)


def list_checkpoints(ckpt_dir: str) -> list:
    """Complete checkpoints in ``ckpt_dir`` as (epoch, path), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir: str, epoch: int, net, trainer, meta: dict, keep: int) -> str:
    """Write the checkpoint of a finished ``epoch`` (0-based) atomically; keep the last ``keep``.

    Rank 0 only; calls no collective. Returns the checkpoint's directory.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"epoch-{epoch:04d}")
    tmp = os.path.join(ckpt_dir, f".epoch-{epoch:04d}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    net.save_parameters(os.path.join(tmp, "params"))
    trainer.save_states(os.path.join(tmp, "trainer.states"))
    with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump(dict(meta, epoch=epoch), fh, indent=1)
    if os.path.exists(final):  # re-running an epoch after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: str) -> dict:
    """The ``meta.json`` of checkpoint directory ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint directory.
        ValueError: meta.json is not valid JSON (names the file).
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"checkpoint.resume: {path!r} is not a checkpoint directory "
                                f"(no meta.json); checkpoints look like <run>/checkpoints/epoch-0003")
    with open(meta_path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON: {exc}") from None


def check_compatible(saved_config: dict, config: dict, saved_world_size: int,
                     world_size: int, path: str) -> None:
    """Refuse to resume when a key in ``RESUME_KEYS`` or the world size differs.

    Raises:
        ValueError: names the key (or 'world size'), the saved and the new value, and the
            checkpoint.
    """
    for key in RESUME_KEYS:
        section, name = key.split(".")
        old = saved_config.get(section, {}).get(name)
        new = config[section][name]
        if old != new:
            raise ValueError(f"cannot resume from {path}: {key} was {old!r} there, is {new!r} "
                             f"now; use the same value or start a fresh run")
    if saved_world_size != world_size:
        raise ValueError(f"cannot resume from {path}: world size was {saved_world_size} there, "
                         f"is {world_size} now; each rank's triplet shard depends on the world "
                         "size, so resume with the same number of workers")


def load_checkpoint(path: str, net, trainer, ctx) -> dict:
    """Load parameters and trainer state from ``path`` into ``net`` / ``trainer``.

    Every rank calls it (each reads the files, so ``path`` must be on a file system every
    host sees). Returns the checkpoint's meta dict.
    """
    meta = read_meta(path)
    net.load_parameters(os.path.join(path, "params"), ctx=ctx)
    trainer.load_states(os.path.join(path, "trainer.states"))
    return meta
