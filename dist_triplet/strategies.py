"""Sampler strategies: what the training step does differently for each kind of batch.

The distributed step (``engine.DataParallelStep``) is the same for every sampler; what
differs is owned by one strategy object per sampler kind:

* :meth:`Strategy.layout`: how a device's share of a batch becomes the (L,) row indices
  the device gathers (for a whole epoch at once);
* :meth:`Strategy.losses`: the forward loss on each device (inside ``autograd.record``);
* :meth:`Strategy.terms`: the number ``trainer.step(n)`` divides the summed gradient by.

Three kinds, chosen by :func:`make_strategy` from the ``sampler`` config section:

=====================  ================================  ===========================
strategy               batch of this process             loss per device
=====================  ================================  ===========================
:class:`Offline`       (devices x B, 3) (a, p, n) rows   (B,) per-triplet losses
:class:`LocalMined`    (devices, P*K) class-major rows   (1,) mean mined loss
:class:`GlobalMined`   (devices, P*K), all workers' P    (1,) mean over the global batch
=====================  ================================  ===========================

A new kind is one subclass of :class:`Strategy` (and one line in :func:`make_strategy`).
The network ``net`` is any Gluon block mapping (B, F) float32 rows to (B, D) float32
embeddings; strategies gather its input rows on the device (``model.gather_rows``).
"""
from __future__ import annotations

import numpy as np

from .model import (GlobalMinedTripletStep, MemoryMinedTripletStep, MinedTripletStep,
                    OfflineTripletStep)

__all__ = ["Strategy", "Offline", "LocalMined", "GlobalMined", "MemoryMined", "make_strategy"]


class Strategy:
    """What the step does for one sampler kind; subclasses set ``block`` and override
    the methods below.

    Args (every subclass):
        net: the embedding network, initialised on every context of ``backend``.
        backend: the ``dist.Backend`` (its ``contexts`` are this process's devices).
        margin: triplet margin in squared-L2 units (``loss.margin``).
        uint8: the resident training rows are uint8 image bytes (scaled by 1/255 on the
            device), else float32 features.
        augment: an ``augment.Augment`` for image rows, or None.

    Attribute ``input`` (a ``model.StepInput``, set by subclasses) says which columns
    follow the row indices in each step's index vector (augmentation, miner uniforms);
    ``engine.DataParallelStep.epoch_indices`` draws and appends them.
    """

    def __init__(self, net, backend, *, margin: float, uint8: bool, augment=None):
        self.net = net
        self.backend = backend
        self.ctxs = backend.contexts
        self.margin = margin
        self.uint8 = uint8
        self.augment = augment

    def layout(self, part: np.ndarray) -> np.ndarray:
        """One device's share of ``steps`` batches, ``(steps, rows, ...)`` int64, as the
        ``(steps, L)`` row indices the device's :meth:`losses` reads."""
        raise NotImplementedError

    def losses(self, pixels: list, labels: list, idx: list) -> list:
        """Per device the loss NDArray, from the resident ``pixels`` ((N, F) per device),
        ``labels`` ((N,) float32 per device) and this step's ``idx`` ((L,) float32 per
        device). Called inside ``autograd.record()``."""
        raise NotImplementedError

    def terms(self, rows: int) -> int:
        """What ``trainer.step`` normalises by, for a batch of ``rows`` rows on this
        process (Horovod then averages over processes)."""
        raise NotImplementedError


class Offline(Strategy):
    """The seed's offline triplets (``sampler.kind: offline``): per-triplet losses, the
    step normalised by this process's triplets.

    layout: (steps, B, 3) -> (steps, 3B) = [anchors; positives; negatives] per step, the
    stacked batch ``model.OfflineTripletStep`` pushes through the network once.
    """

    def __init__(self, net, backend, *, margin: float, uint8: bool, augment=None):
        super().__init__(net, backend, margin=margin, uint8=uint8, augment=augment)
        self.block = OfflineTripletStep(net, margin, uint8=uint8, augment=augment)
        self.block.hybridize(static_alloc=True, static_shape=True)
        self.input = self.block.input

    def layout(self, part):
        return part.transpose(0, 2, 1).reshape(len(part), -1)   # (steps, 3B) [a; p; n]

    def losses(self, pixels, labels, idx):
        return [self.block(x, i) for x, i in zip(pixels, idx)]   # (B,) each

    def terms(self, rows):
        return rows


class LocalMined(Strategy):
    """P x K batches mined on each device alone (``sampler.kind: pk``, ``scope: local``):
    one mean loss per device, the step normalised by the devices.

    Args (besides :class:`Strategy`'s): miner: ``'batch_hard'`` or ``'semi_hard'``;
    k: samples per class in a worker's batch (``sampler.k``).
    """

    def __init__(self, net, backend, *, margin: float, uint8: bool, miner: str, k: int,
                 augment=None, memory: int = 0):
        super().__init__(net, backend, margin=margin, uint8=uint8, augment=augment)
        self.miner, self.k, self.memory = miner, k, memory
        self.block = self.make_block()
        self.input = self.block.input

    def make_block(self):
        block = MinedTripletStep(self.net, self.margin, self.miner, k=self.k, uint8=self.uint8,
                                 augment=self.augment)
        block.hybridize(static_alloc=True, static_shape=True)
        return block

    def layout(self, part):
        return part.reshape(len(part), -1)                       # (steps, P*K)

    def losses(self, pixels, labels, idx):
        return [self.block(x, y, i) for x, y, i in zip(pixels, labels, idx)]   # (1,) each

    def terms(self, rows):
        return len(self.ctxs)


class GlobalMined(LocalMined):
    """P x K batches mined over every worker's batch (``scope: global``): each device
    mines its own anchors against the gathered global batch and gets its rows' share of
    the global batch's exact gradient through one allreduce; its loss is a surrogate
    whose value is the global batch's mean (``model.GlobalMinedTripletStep`` says how).
    The batches must come from ``EpochSampler(scope='global')``. ``losses`` is a
    collective under Horovod."""

    step_class = GlobalMinedTripletStep

    def make_block(self):
        backend = self.backend
        extra = {"memory": self.memory} if self.memory else {}
        return self.step_class(
            self.net, self.margin, self.miner, self.k, self.ctxs,
            worker_ranks=[backend.worker_rank(d) for d in range(len(self.ctxs))],
            num_workers=backend.num_workers, allreduce_sum=backend.allreduce_sum,
            uint8=self.uint8, augment=self.augment, **extra)

    def losses(self, pixels, labels, idx):
        return self.block(pixels, labels, idx)


class MemoryMined(GlobalMined):
    """:class:`GlobalMined` with a cross-batch memory of the last ``sampler.memory``
    global batches (XBM; ``model.MemoryMinedTripletStep``): each worker's anchors are
    mined against the pool of the global batch and the memory. ``losses`` is a collective
    under Horovod."""

    step_class = MemoryMinedTripletStep


def make_strategy(sampler, margin: float, net, backend, uint8: bool,
                  augment=None) -> Strategy:
    """The strategy for config section ``sampler`` (a ``SamplerConfig``); ``augment``: an
    ``augment.Augment`` for image rows, or None.

    Raises:
        ValueError: an unknown ``sampler.kind`` or ``sampler.scope`` (names the value).
    """
    if sampler.kind == "offline":
        return Offline(net, backend, margin=margin, uint8=uint8, augment=augment)
    if sampler.kind != "pk":
        raise ValueError(f"sampler.kind={sampler.kind!r}: expected 'offline' or 'pk'")
    kinds = {"local": LocalMined, "global": GlobalMined}
    if sampler.scope not in kinds:
        raise ValueError(f"sampler.scope={sampler.scope!r}: expected 'local' or 'global'")
    memory = sampler.memory  # config.py ensures scope 'global'
    kind = MemoryMined if memory else kinds[sampler.scope]
    return kind(net, backend, margin=margin, uint8=uint8, miner=sampler.miner, k=sampler.k,
                augment=augment, memory=memory)
