"""The distributed training step and the epoch loop: the core every backend shares.

``DataParallelStep`` is one optimizer update over this process's share of the global
batch; ``run_epoch`` runs an epoch of them with a per-step hook. ``train.train`` drives
them, and so do the benchmarks and tests/equivalence_worker.py, so no loop is copied.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np


def optimizer_params(optim) -> dict:
    """Gluon optimizer arguments for config section ``optim`` (an ``OptimConfig``): the
    learning rate (replaced before every step by the schedule), weight decay, and the
    momentum for SGD. Pass them to ``Backend.make_trainer``."""
    params = {"learning_rate": optim.lr, "wd": optim.wd}
    if optim.optimizer == "sgd":
        params["momentum"] = optim.momentum
    return params


class DataParallelStep:
    """The distributed training step, identical in structure for every backend.

    The training rows are put on every device once (shared, not copied, on cpu(0)) in
    their own dtype: uint8 images stay uint8 there (a quarter of float32's bytes) and are
    scaled to float32 / 255 inside the step, batch by batch; float32 features are used as
    they are. An epoch's indices are copied once (``epoch_indices``), a step takes a view
    of its rows.
    ``step(batch)`` takes this process's share of the global batch:

    * offline sampler: ``batch`` (Bp, 3) int64 (anchor, positive, negative) rows, Bp =
      devices x ``train.batch_size``; each device gets a contiguous (B, 3) slice.
    * P x K sampler: ``batch`` (devices, P*K) int64; each device mines within its own batch
      (scope 'local') or over every worker's batch (scope 'global').

    Args:
        backend: the ``dist.Backend`` (its ``contexts`` are the devices).
        net: the embedding network, initialised on every context.
        trainer: the Trainer from ``backend.make_trainer`` (the step does not build one).
        pixels: (N, F) training rows: uint8 image bytes or float32 features (a read-only
            memory map is fine: it is not copied on cpu(0)); labels: (N,) integer labels.
        margin: triplet margin in squared-L2 units (``loss.margin``).
        miner: ``None`` for offline triplets, else the online miner of P x K batches
            (``'batch_hard'`` / ``'semi_hard'``); k: samples per class in those batches.
        scope: ``'local'``: each device mines within its own batch; ``'global'``: over
            the global batch of all workers (``model.GlobalMinedTripletStep``; the batches
            must come from ``EpochSampler(scope='global')``).

    It returns the per-device loss sums (NDArrays, no host synchronisation) and the
    number of loss terms they sum over.
    """

    def __init__(self, backend, net, trainer, pixels: np.ndarray, labels: np.ndarray, *,
                 margin: float, miner: Optional[str] = None, k: int = 0,
                 scope: str = "local"):
        import mxnet as mx
        from .model import GlobalMinedTripletStep, MinedTripletStep, OfflineTripletStep

        self.mx = mx
        self.backend = backend
        self.ctxs = backend.contexts
        self.net = net
        self.trainer = trainer
        self.mining = miner is not None
        # Indices travel as float32 (what F.take wants); exact for row ids below 2**24.
        if len(pixels) >= 2 ** 24:
            raise ValueError(f"{len(pixels)} training rows: indices above 2**24 are not exact "
                             "in float32; use data.limit_train")
        self.uint8 = np.asarray(pixels[:0]).dtype == np.uint8
        self.pixels = [self._resident(pixels, c) for c in self.ctxs]               # (N, F) per device
        self.labels = [mx.nd.array(labels.astype(np.float32), ctx=c) for c in self.ctxs]
        if scope not in ("local", "global"):
            raise ValueError(f"sampler.scope={scope!r}: expected 'local' or 'global'")
        self.global_step = None
        if self.mining and scope == "global":
            self.global_step = GlobalMinedTripletStep(
                net, margin, miner, k, self.ctxs,
                worker_ranks=[backend.worker_rank(d) for d in range(len(self.ctxs))],
                num_workers=backend.num_workers, allgather=backend.allgather,
                allreduce_sum=backend.allreduce_sum, uint8=self.uint8)
        else:
            if self.mining:
                self.block = MinedTripletStep(net, margin, miner, k=k, uint8=self.uint8)
            else:
                self.block = OfflineTripletStep(net, margin, uint8=self.uint8)
            self.block.hybridize(static_alloc=True, static_shape=True)

    def _resident(self, pixels: np.ndarray, ctx):
        """``pixels`` as an NDArray on ``ctx``, uint8 kept uint8, anything else float32. On
        cpu(0) it shares the host array's memory (DLPack, no copy) -- also when that is a
        memory map of the shared data cache (data.cache_dir), so a host's processes hold
        the training set once between them (benchmarks/scale.py); the caller must not
        modify ``pixels`` afterwards. Other devices get a copy."""
        mx = self.mx
        dtype = np.uint8 if self.uint8 else np.float32
        if ctx == mx.cpu(0):
            host = np.ascontiguousarray(pixels, dtype=dtype)
            return mx.nd.from_numpy(host.view(), zero_copy=True)  # marks only the view read-only
        return mx.nd.array(pixels, ctx=ctx, dtype=dtype)

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
        with mx.autograd.record():
            if self.global_step is not None:
                # Every device's loss is the global batch's mean (a surrogate, see there).
                losses = self.global_step(self.pixels, self.labels, idx)
            elif self.mining:
                losses = [self.block(x, y, i) for x, y, i in zip(self.pixels, self.labels, idx)]
            else:
                losses = [self.block(x, i) for x, i in zip(self.pixels, idx)]
        mx.autograd.backward(losses)
        # Offline: per-sample losses, normalise by the triplets of this process. Mining: one
        # mean loss per device, normalise by the devices. Horovod then averages over ranks.
        terms = len(self.ctxs) if self.mining else len(batch)
        self.trainer.step(terms)
        return [l.sum() for l in losses], terms


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
    asynchronous queue and refresh the progress bar), never per step. Per-step loss sums
    stay on the device as a list and are fetched once: a small op per step costs ~0.2 ms
    of a ~5 ms CPU step (docs/benchmark.md).
    """
    import mxnet as mx
    steps = len(batches)
    dev_idx = stepper.epoch_indices(batches)                 # one host->device copy per epoch
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
    return losses, wait + time.perf_counter() - t_w
