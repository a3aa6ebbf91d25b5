"""The distributed training step and the epoch loop: the core every backend shares.

``DataParallelStep`` is one optimizer update over this process's share of the global
batch, the same for every sampler kind (what differs is the strategy, strategies.py);
``build_step`` makes it from the config; ``run_epoch`` runs an epoch of them with a
per-step hook. ``loop.train`` drives them, and so do the benchmarks and
tests/equivalence_worker.py, so no loop is copied.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import mxnet as mx
import numpy as np

from .augment import augmentation, draw
from .strategies import make_strategy


def optimizer_params(optim) -> dict:
    """Gluon optimizer arguments for config section ``optim`` (an ``OptimConfig``): the
    learning rate (replaced before every step by the schedule), weight decay, and the
    momentum for SGD. Pass them to ``Backend.make_trainer``."""
    params = {"learning_rate": optim.lr, "wd": optim.wd}
    if optim.optimizer == "sgd":
        params["momentum"] = optim.momentum
    return params


class DataParallelStep:
    """The distributed training step, identical in structure for every backend and
    sampler; what differs by sampler kind is the ``strategy`` (strategies.py).

    The training rows are put on every device once (shared, not copied, on cpu(0)) in
    their own dtype: uint8 images stay uint8 there (a quarter of float32's bytes) and are
    scaled to float32 / 255 inside the step, batch by batch; float32 features are used as
    they are. An epoch's indices are copied once (``epoch_indices``), a step takes a view
    of its rows.
    ``step(batch)`` takes this process's share of the global batch: (devices x B, 3)
    int64 (anchor, positive, negative) rows for the offline sampler, (devices, P*K) for
    P x K; each device gets an equal contiguous slice, laid out by ``strategy.layout``.

    Args:
        backend: the ``dist.Backend`` (its ``contexts`` are the devices).
        trainer: the Trainer from ``backend.make_trainer`` (the step does not build one).
        pixels: (N, F) training rows: uint8 image bytes or float32 features (a read-only
            memory map is fine: it is not copied on cpu(0)); labels: (N,) integer labels.
        strategy: the sampler kind's ``strategies.Strategy`` (its ``net`` is trained;
            its ``uint8`` must match ``pixels``).

    It returns the per-device loss sums (NDArrays, no host synchronisation) and the
    number of loss terms they sum over.

    Raises:
        ValueError: 2**24 training rows or more (indices travel as float32), or
            ``pixels`` of another dtype than the strategy expects.

    ``seed``: the run seed (``train.seed``); the random columns of a step's index vector
    (augmentation, miner uniforms) come from (seed, epoch, worker) alone (``augment.draw``).
    """

    def __init__(self, backend, trainer, pixels: np.ndarray, labels: np.ndarray, strategy,
                 seed: int = 0):
        self.seed = seed
        self.backend = backend
        self.ctxs = backend.contexts
        self.strategy = strategy
        self.net = strategy.net
        self.trainer = trainer
        # Indices travel as float32 (what F.take wants); exact for row ids below 2**24.
        if len(pixels) >= 2 ** 24:
            raise ValueError(f"{len(pixels)} training rows: indices above 2**24 are not exact "
                             "in float32; use data.limit_train")
        self.uint8 = is_uint8(pixels)
        if self.uint8 != strategy.uint8:
            raise ValueError(f"training rows are {np.asarray(pixels[:0]).dtype} but the "
                             f"strategy expects {'uint8' if strategy.uint8 else 'float32'}")
        self.pixels = [self._resident(pixels, c) for c in self.ctxs]               # (N, F) per device
        self.labels = [mx.nd.array(labels.astype(np.float32), ctx=c) for c in self.ctxs]

    def _resident(self, pixels: np.ndarray, ctx):
        """``pixels`` as an NDArray on ``ctx``, uint8 kept uint8, anything else float32. On
        cpu(0) it shares the host array's memory (DLPack, no copy) -- also when that is a
        memory map of the shared data cache (data.cache_dir), so a host's processes hold
        the training set once between them (benchmarks/scale.py); the caller must not
        modify ``pixels`` afterwards. Other devices get a copy."""
        dtype = np.uint8 if self.uint8 else np.float32
        if ctx == mx.cpu(0):
            host = np.ascontiguousarray(pixels, dtype=dtype)
            return mx.nd.from_numpy(host.view(), zero_copy=True)  # marks only the view read-only
        return mx.nd.array(pixels, ctx=ctx, dtype=dtype)

    def epoch_indices(self, batches: np.ndarray, epoch: int = 0) -> list:
        """Indices of ``steps`` batches on the devices in one copy: per device a
        (steps, L) float32 NDArray (``strategy.layout`` of the device's share), or
        (steps, c * L) when the strategy's input has c > 1 columns: the indices, then the
        random columns of worker ``backend.worker_rank(d)`` for ``epoch``
        (``model.StepInput``), drawn here for the whole epoch.

        ``mx.nd.array`` from host memory waits until MXNet's queue is empty, so copying
        indices every step stalls the host once per step (measured: benchmark section 2);
        one copy per epoch and a row view per step keeps the queue full.

        Raises:
            ValueError: a batch does not split evenly over the devices.
        """
        n = len(self.ctxs)
        if batches.shape[1] % n:
            # EpochSampler always gives devices x batch_size rows; this guards direct callers.
            raise ValueError(f"a batch of {batches.shape[1]} rows does not split evenly over "
                             f"{n} devices; every device must get the same number so that "
                             "each step's gradient is the mean over the global batch")
        parts = np.split(batches, n, axis=1) if n > 1 else [batches]
        inp = self.strategy.input
        out = []
        for d, (part, ctx) in enumerate(zip(parts, self.ctxs)):
            idx = self.strategy.layout(part)                         # (steps, L)
            if inp.columns > 1:
                steps, rows = idx.shape
                u = draw(self.seed, epoch, self.backend.worker_rank(d),
                         (steps, inp.columns - 1, rows))
                idx = np.concatenate([idx[:, None, :], inp.host_columns(u)],
                                     axis=1).reshape(steps, -1)
            out.append(mx.nd.array(idx, ctx=ctx, dtype="float32"))
        return out

    def device_batches(self, batch: np.ndarray, epoch: int = 0) -> list:
        """One batch's indices on the devices: per device the (L,) float32 NDArray (or
        (c * L,) with random columns: those of step 0 of ``epoch``)."""
        return [d[0] for d in self.epoch_indices(batch[None], epoch)]

    def step(self, batch: np.ndarray, idx: Optional[list] = None):
        """One optimizer update from ``batch``; returns (loss sums per device, terms).

        ``idx``: this step's rows of :meth:`epoch_indices` (one NDArray per device); when
        given, the indices are not copied again (``batch`` still gives the batch size).
        """
        if idx is None:
            idx = self.device_batches(batch)
        with mx.autograd.record():
            losses = self.strategy.losses(self.pixels, self.labels, idx)
        mx.autograd.backward(losses)
        terms = self.strategy.terms(len(batch))
        self.trainer.step(terms)
        return [l.sum() for l in losses], terms


def is_uint8(pixels) -> bool:
    """True when the training rows are uint8 image bytes (a memory map counts)."""
    return np.asarray(pixels[:0]).dtype == np.uint8


def build_step(cfg, backend, net, pixels: np.ndarray, labels: np.ndarray,
               image_shape=None) -> DataParallelStep:
    """The :class:`DataParallelStep` for config ``cfg``: the sampler kind's strategy
    (``strategies.make_strategy``, with section ``augment`` for rows of ``image_shape``
    (H, W, C)) and the trainer ``backend`` makes (``Backend.make_trainer``, optimizer
    arguments from :func:`optimizer_params`)."""
    # Only parameters with a gradient: a kvstore Trainer would otherwise broadcast device 0's
    # BatchNorm running statistics over the other devices' at its first step.
    trainable = {n: p for n, p in net.collect_params().items() if p.grad_req != "null"}
    trainer = backend.make_trainer(trainable, cfg.optim.optimizer, optimizer_params(cfg.optim),
                                   cfg.distributed.compression)
    strategy = make_strategy(cfg.sampler, cfg.loss.margin, net, backend, is_uint8(pixels),
                             augment=augmentation(cfg.augment, image_shape))
    return DataParallelStep(backend, trainer, pixels, labels, strategy, seed=cfg.train.seed)


def run_epoch(stepper: DataParallelStep, batches: np.ndarray, epoch: int, *,
              lr_at: Callable[[int], float], sync_every: int, bar=None,
              on_step: Optional[Callable[[int, int], None]] = None) -> tuple:
    """One epoch's optimizer steps.

    Args:
        stepper: the step.
        batches: the epoch's batches from ``EpochSampler.epoch``, (steps, ...) int64.
        epoch: 0-based epoch (global step of step s = epoch * steps + s).
        lr_at: global step -> learning rate (``schedule.from_config``).
        sync_every: the host waits for the device once every this many steps.
        bar: a progress bar (``update``, ``set_postfix``), or None.
        on_step: called as ``on_step(epoch, step)`` (both 0-based) before each step: a hook
            for tests and tools (the fault tests stop or kill a run there).

    Returns:
        ``(losses, wait_s)``: the (steps,) float32 mean loss of each step on this process,
        and the seconds the host sat blocked on the device.

    The host waits for the device once every ``sync_every`` steps (to bound MXNet's
    asynchronous queue and refresh the progress bar), never per step, and at the end for
    all of the epoch's work (its last backward and update are the epoch's time, not the
    evaluation's that follows). Per-step loss sums
    stay on the device as a list and are fetched once: a small op per step costs ~0.2 ms
    of a ~5 ms CPU step (docs/benchmark.md).
    """
    steps = len(batches)
    dev_idx = stepper.epoch_indices(batches, epoch)          # one host->device copy per epoch
    ctx0 = stepper.ctxs[0]
    step_sums = []
    wait = 0.0
    terms = 1
    for s in range(steps):
        if on_step is not None:
            on_step(epoch, s)
        # Every step, whatever the schedule: a resumed trainer holds the checkpoint's
        # learning rate (load_states), and optim.scale_lr applies to constant schedules too.
        stepper.trainer.set_learning_rate(lr_at(epoch * steps + s))
        sums, terms = stepper.step(batches[s], [d[s] for d in dev_idx])
        step_sums.append(sums[0] if len(sums) == 1 else
                         mx.nd.add_n(*[x.as_in_context(ctx0) for x in sums]))
        if (s + 1) % sync_every == 0 or s + 1 == steps:
            t_w = time.perf_counter()
            loss = step_sums[-1].asscalar() / terms
            wait += time.perf_counter() - t_w
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
        if bar is not None:
            bar.update(1)
    t_w = time.perf_counter()
    losses = mx.nd.concat(*step_sums, dim=0).asnumpy() / terms
    mx.nd.waitall()   # the last backward and update too: the epoch's time, not the next phase's
    return losses, wait + time.perf_counter() - t_w
