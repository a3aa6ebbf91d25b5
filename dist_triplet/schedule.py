"""Learning-rate schedule: linear scaling (optional), linear warm-up, then constant or
cosine decay to 0 at the end of the run.

Why not ``mxnet.lr_scheduler.CosineScheduler`` (which has the same warm-up and cosine):

* An MXNet scheduler is an attribute of the optimizer, and ``Trainer.save_states`` pickles
  the optimizer with it; ``Trainer.load_states`` then brings back the *checkpoint's*
  scheduler. The resume policy lets the "schedule" keys (optim.lr, optim.schedule,
  train.epochs, ...) change on resume, e.g. to lower the learning rate after a divergence
  (tests/test_checkpoint.py does exactly that); with an MXNet scheduler that would need
  replacing ``Trainer._optimizer.lr_scheduler`` after every load, a private attribute.
* ``CosineScheduler`` is stateful (``__call__`` overwrites ``base_lr``) and evaluates the
  cosine at ``num_update`` (1-based, after the increment), one step later than the step
  being taken: switching would shift the cosine recipe by a step and change its numbers.

Exact resume is what matters, and this gives it: the rate of step ``s`` is a pure
function of the global step ``epoch * steps_per_epoch + s`` and the config, and the
training loop sets it before every step (``engine.run_epoch``), so a resumed run applies
exactly the rates of an uninterrupted one.
"""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, epochs: int, steps_per_epoch: int,
                  schedule: str = "constant", warmup_epochs: float = 0.0,
                  scale_lr: bool = False, global_batch: int = 1,
                  base_batch: int = 256) -> float:
    """Learning rate at global step ``step`` (0-based).

    Args:
        step: optimizer steps taken before this one in the whole run.
        lr: ``optim.lr``, the rate of the global batch.
        epochs, steps_per_epoch: the run's length (the cosine reaches 0 at its end).
        schedule: ``'constant'`` or ``'cosine'``.
        warmup_epochs: linear warm-up from 0 over this many epochs (rounded to steps).
        scale_lr, global_batch, base_batch: linear scaling rule
            ``lr * global_batch / base_batch`` (Goyal et al. 2017).

    Returns:
        The learning rate, a float >= 0.
    """
    base = lr
    if scale_lr:
        base *= global_batch / base_batch  # Goyal et al. 2017, linear scaling rule
    total = epochs * steps_per_epoch
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return base * (step + 1) / warm
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base


def from_config(optim, epochs: int, steps_per_epoch: int, global_batch: int):
    """``step -> learning rate`` for config section ``optim`` (an ``OptimConfig``)."""
    def rate(step: int) -> float:
        return learning_rate(step, lr=optim.lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                             schedule=optim.schedule, warmup_epochs=optim.warmup_epochs,
                             scale_lr=optim.scale_lr, global_batch=global_batch,
                             base_batch=optim.base_batch)
    return rate


def first_difference(old_rate, new_rate, start: int, stop: int):
    """First global step in ``[start, stop)`` whose learning rate differs between two
    ``step -> rate`` functions (:func:`from_config`), or None when all agree exactly.

    Used on resume: a changed "schedule" key (say train.epochs on a constant schedule
    without warm-up) may leave every remaining step's rate as it was. One call per step,
    about 1 s per million steps.
    """
    for step in range(start, stop):
        if old_rate(step) != new_rate(step):
            return step
    return None
