"""The embedding network and the per-device training computations.

The network is the seed article's MLP (Dense 256 relu -> Dense 128 relu, Uniform(0.1)
init), with widths, final activation and L2 normalisation taken from the config. The
training computations gather rows by index from pixels that live on the device once
(``F.take``), push anchor, positive and negative through the network as **one stacked
batch of 3B rows** and apply ``gluon.loss.TripletLoss``; everything is a HybridBlock so
that ``hybridize(static_alloc=True, static_shape=True)`` compiles one graph per shape.
"""
from __future__ import annotations

from typing import Sequence

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from .augment import AUG_COLUMNS, crop_flip
from .mining import GlobalMinedTripletLoss, MemoryMinedTripletLoss, MinedTripletLoss


class L2Normalize(nn.HybridBlock):
    """Scale each row to unit L2 norm: (B, D) -> (B, D). FaceNet (Schroff et al. 2015)."""

    def hybrid_forward(self, F, x):
        return F.L2Normalization(x, mode="instance", eps=1e-10)


def build_embedding_net(in_units: int, hidden: Sequence[int], *, final_relu: bool = True,
                        normalize: bool = False) -> nn.HybridSequential:
    """The MLP embedding network ``(B, in_units) float32 -> (B, hidden[-1]) float32``.

    ``in_units`` is given to every Dense layer so parameter shapes are known at
    ``initialize()``: no deferred initialisation, so Horovod's broadcast reaches every
    parameter before the first step.

    Args:
        in_units: input width (784 for 28x28 images).
        hidden: Dense widths; seed: (256, 128).
        final_relu: ReLU after the last layer (the seed has it).
        normalize: L2-normalise the output.
    """
    net = nn.HybridSequential(prefix="embed_")
    with net.name_scope():
        width = in_units
        for i, units in enumerate(hidden):
            last = i == len(hidden) - 1
            act = "relu" if (not last or final_relu) else None
            net.add(nn.Dense(units, activation=act, in_units=width))
            width = units
        if normalize:
            net.add(L2Normalize())
    return net


def initialize(net: nn.Block, init_scale: float, ctx, seed: int) -> None:
    """Initialise ``net`` on ``ctx`` (a context or list) with Uniform(-s, s) weights, zero
    biases (MXNet's default for bias), from ``mx.random.seed(seed)``. The seed article
    uses ``mx.init.Uniform(scale=0.1)``."""
    mx.random.seed(seed)
    net.initialize(mx.init.Uniform(scale=init_scale), ctx=ctx, force_reinit=True)


def gather_rows(F, pixels, idx, uint8: bool):
    """Rows ``idx`` of the resident ``pixels`` as float32 network input: (len(idx), F).

    uint8 image rows are cast and divided by 255 here, on the device, after the gather:
    only the batch is ever float32, and the values are bit-identical to the host's
    ``float32(v) / float32(255)`` (one correctly rounded float32 division either way).
    """
    x = F.take(pixels, idx)                          # one gather, no pixel copies on host
    return F.cast(x, dtype="float32") / 255.0 if uint8 else x


class StepInput:
    """How a step's per-device index vector is laid out and read (no parameters).

    The vector is ``columns`` segments of L values each: the L row indices, then, when
    ``augment`` is active, each row's (dy, dx, flip) (``augment.Augment.columns``), then
    ``noise`` uniforms per row for the miner (distance-weighted). Everything a step
    draws at random thus arrives from the host with the rows (``augment.draw``).

    Args:
        uint8: the resident rows are uint8 image bytes (scaled in :func:`gather_rows`).
        augment: an ``augment.Augment`` or None.
        noise: the miner's uniforms per row (``MinedTripletLoss.noise_columns``).
    """

    def __init__(self, uint8: bool = False, augment=None, noise: int = 0):
        self.uint8 = uint8
        self.augment = augment if augment is not None and augment.active else None
        self.noise = int(noise)
        self.columns = 1 + (AUG_COLUMNS if self.augment else 0) + self.noise

    def host_columns(self, u):
        """The (steps, columns - 1, L) float32 values after the row indices, from
        uniforms ``u`` of that shape (``augment.draw``): augmentation columns, then the
        miner's uniforms moved into [1e-7, 1) (0 would select a zero-weight column)."""
        import numpy as np
        out = []
        if self.augment:
            cells = u.shape[2] * int(np.prod(self.augment.image_shape))
            if cells >= 2 ** 24:
                # crop_flip gathers through float32 flat indices.
                raise ValueError(f"augmentation of {u.shape[2]} rows of "
                                 f"{self.augment.image_shape} images per step: {cells} pixels "
                                 "exceed float32's exact integers (2**24); use a smaller batch")
            out.append(self.augment.columns(u[:, :AUG_COLUMNS].transpose(0, 2, 1))
                       .transpose(0, 2, 1))
            u = u[:, AUG_COLUMNS:]
        out.append(np.maximum(u, 1e-7))
        return np.concatenate(out, axis=1).astype(np.float32)

    def read(self, F, pixels, idx):
        """``(rows, x, u)``: the (L,) row indices, the (L, F) float32 network input
        (augmented when asked) and the (L, noise) uniforms (None without)."""
        if self.columns == 1:
            return idx, gather_rows(F, pixels, idx, self.uint8), None
        cols = F.split(F.reshape(idx, shape=(self.columns, -1)), num_outputs=self.columns,
                       axis=0, squeeze_axis=True)                   # each (L,)
        rows, rest = cols[0], list(cols[1:])
        x = gather_rows(F, pixels, rows, self.uint8)
        if self.augment:
            a = self.augment
            x = crop_flip(F, x, rest[0], rest[1], rest[2], a.image_shape, a.pad)
            rest = rest[AUG_COLUMNS:]
        return rows, x, (F.stack(*rest, axis=1) if rest else None)


class OfflineTripletStep(nn.HybridBlock):
    """Per-sample triplet loss of a batch of index triplets.

    forward(pixels, idx) -> loss
        pixels: (N, F) the whole training set resident on this device: float32 features,
            or uint8 image bytes when ``uint8`` (scaled by 1/255 in :func:`gather_rows`).
        idx: (3B,) float32 row indices laid out [anchors (B); positives (B); negatives (B)]
            (followed by their augmentation columns with ``augment``: :class:`StepInput`).
        loss: (B,) float32, ``max(0, ||a-p||^2 - ||a-n||^2 + margin)`` (gluon.loss.TripletLoss).
    """

    def __init__(self, net: nn.Block, margin: float, uint8: bool = False, augment=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.input = StepInput(uint8, augment)
        self.loss = gluon.loss.TripletLoss(margin=margin)

    def hybrid_forward(self, F, pixels, idx):
        _, x, _ = self.input.read(F, pixels, idx)    # (3B, F) float32
        emb = self.net(x)                            # (3B, D): one stacked forward
        a, p, n = F.split(emb, num_outputs=3, axis=0)  # (B, D) each
        return self.loss(a, p, n)                    # (B,)


class MinedTripletStep(nn.HybridBlock):
    """Mean triplet loss of the triplets mined online in one P x K batch.

    forward(pixels, labels, idx) -> loss
        pixels: (N, F) resident training set, float32 or uint8 (``uint8``, as
            :class:`OfflineTripletStep`); labels: (N,) float32 class ids.
        idx: (P*K,) float32 row indices of the batch, class-major, followed by the
            augmentation and miner columns (:class:`StepInput`) when there are any.
        loss: (1,) float32, the mean over the mined triplets (see mining.MinedTripletLoss).

    ``k``: samples per class of the batches (sampler.k); semi-hard mining then pairs each
    anchor with its K - 1 positives only: the same triplets, O(B^2 K) instead of O(B^3).
    """

    def __init__(self, net: nn.Block, margin: float, miner: str, k=None, uint8: bool = False,
                 augment=None, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.loss = MinedTripletLoss(margin=margin, miner=miner, k=k)
        self.input = StepInput(uint8, augment, self.loss.noise_columns)

    def hybrid_forward(self, F, pixels, labels, idx):
        rows, x, u = self.input.read(F, pixels, idx)
        emb = self.net(x)                            # (B, D)
        if u is None:
            return self.loss(emb, F.take(labels, rows))  # (1,)
        return self.loss(emb, F.take(labels, rows), u)


class EmbedRows(nn.HybridBlock):
    """forward(pixels, idx) -> (net(x), rows, u): the (B, D) embeddings of the rows
    ``idx`` names (laid out as :class:`StepInput` ``input`` says; float32 features or
    uint8 image bytes scaled as in :func:`gather_rows`), with the (B,) row indices and
    the (B, noise) miner uniforms (omitted without noise)."""

    def __init__(self, net: nn.Block, uint8: bool = False, augment=None, noise: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.input = StepInput(uint8, augment, noise)

    def hybrid_forward(self, F, pixels, idx):
        rows, x, u = self.input.read(F, pixels, idx)
        emb = self.net(x)
        return (emb, rows) if u is None else (emb, rows, u)


class GlobalMinedTripletStep:
    """The forward of ``sampler.scope: global`` for the devices of one process.

    Each device (a worker) embeds its own P x K batch; the embeddings and labels of all
    workers are gathered without gradient (the process's devices in order, then
    ``allgather`` across processes in rank order: the global batch in worker order, the
    same matrix on every worker); each worker then computes the mean mined loss over
    the *whole* global batch with only its own rows differentiable
    (:class:`mining.GlobalMinedTripletLoss`). The W workers' gradients sum to the
    gradient one process gets on the global batch; the step averages them (Horovod's
    mean over processes, ``Trainer.step(devices)`` over devices), so the backward pass
    must be seeded with ``head_grads`` = W, as pytorch-metric-learning's
    ``DistributedLossWrapper`` multiplies its loss by the world size.

    Cost: every worker mines the whole global batch (G = W x P x K rows): O(G^2) for
    batch-hard, O(G^2 W K) for semi-hard (~34 ms at G = 320, W K = 32 on this 2-core
    machine), and one allgather of (P K, D + 1) float32 per process and step.

    Args:
        net: the embedding network (shared with the caller).
        margin, miner: as :class:`mining.MinedTripletLoss`.
        k: samples per class per worker (sampler.k); the global batch has ``W * k``.
        contexts: this process's devices.
        worker_ranks: the global worker index of each device (``Backend.worker_rank``):
            consecutive, as the gather concatenates the devices, then the processes.
        num_workers: W, all workers of the job (processes x devices).
        allgather: ``f((n, C) NDArray) -> (processes * n, C) NDArray``, every process's
            array in rank order (``dist.Backend.allgather``); a collective.
        uint8: the resident training set holds uint8 image bytes (scaled on the device).
    """

    def __init__(self, net, margin: float, miner: str, k: int, contexts, worker_ranks,
                 num_workers: int, allgather, uint8: bool = False, augment=None):
        self.contexts = list(contexts)
        self.worker_ranks = [int(w) for w in worker_ranks]
        first = self.worker_ranks[0]
        if self.worker_ranks != list(range(first, first + len(self.contexts))):
            raise ValueError(f"worker ranks {self.worker_ranks} of this process's devices must "
                             "be consecutive: the gathered global batch is in worker order")
        self.num_workers = int(num_workers)
        self.allgather = allgather
        self.loss = self.make_loss(margin, miner, int(k) * self.num_workers)
        self.loss.hybridize(static_alloc=True, static_shape=True)
        self.embed = EmbedRows(net, uint8=uint8, augment=augment, noise=self.loss.noise_columns)
        self.embed.hybridize(static_alloc=True, static_shape=True)
        self.input = self.embed.input
        # Undo the mean over workers: the workers' gradients must be summed (see above).
        self.head_grads = [mx.nd.full((1,), self.num_workers, ctx=c) for c in self.contexts]
        self._slots = {}

    def make_loss(self, margin, miner, k):
        """The loss block over the global batch (k: samples per class in it)."""
        return GlobalMinedTripletLoss(margin=margin, miner=miner, k=k)

    def slots(self, rows: int) -> list:
        """Per device the (G,) float32 ``slot`` of :func:`mining.splice_own_rows` for
        ``rows`` rows per worker: ``1 + j`` at the worker's j-th global row, else 0."""
        if rows not in self._slots:
            import numpy as np
            out = []
            for w, ctx in zip(self.worker_ranks, self.contexts):
                slot = np.zeros(self.num_workers * rows, np.float32)
                slot[w * rows:(w + 1) * rows] = np.arange(1, rows + 1)
                out.append(mx.nd.array(slot, ctx=ctx))
            self._slots[rows] = out
        return self._slots[rows]

    def gather(self, own, labels, rows, noise=None) -> tuple:
        """Every worker's embeddings, labels and miner uniforms, on every device of this
        process, without gradient: ``([(G, D)], [(G,)], [(G, m)] or None)``, one per
        device. ``own``, ``rows`` (and ``noise``): per device the worker's (B, D)
        embeddings, (B,) row indices (and (B, m) uniforms). A collective under Horovod."""
        with mx.autograd.pause():
            parts = [[o.detach(), mx.nd.take(y, r).expand_dims(axis=1)]
                     + ([u] if noise else []) for o, y, r, u in
                     zip(own, labels, rows, noise or [None] * len(own))]
            mine = [mx.nd.concat(*p, dim=1) for p in parts]            # (B, D + 1 [+ m])
            ctx0 = self.contexts[0]
            mine = mine[0] if len(mine) == 1 else mx.nd.concat(
                *[r.as_in_context(ctx0) for r in mine], dim=0)        # (devices * B, ...)
            everyone = self.allgather(mine)                          # (G, ...), worker order
            dim = own[0].shape[1]
            out_emb, out_lab, out_u = [], [], []
            for ctx in self.contexts:
                here = everyone.as_in_context(ctx)
                out_emb.append(mx.nd.slice_axis(here, axis=1, begin=0, end=dim))
                out_lab.append(mx.nd.slice_axis(here, axis=1, begin=dim, end=dim + 1)
                               .reshape((-1,)))
                if noise:
                    out_u.append(mx.nd.slice_axis(here, axis=1, begin=dim + 1, end=None))
        return out_emb, out_lab, (out_u if noise else None)

    def forward_own(self, pixels, idx) -> tuple:
        """Per device ``(own, rows, noise)``: the worker's (B, D) embeddings (with
        gradient), (B,) row indices and (B, m) miner uniforms (None without)."""
        out = [self.embed(x, i) for x, i in zip(pixels, idx)]
        own, rows = [o[0] for o in out], [o[1] for o in out]
        return own, rows, ([o[2] for o in out] if self.input.noise else None)

    def __call__(self, pixels, labels, idx) -> list:
        """Per device the (1,) float32 mean mined loss of the global batch (the same
        value on every worker). Call inside ``autograd.record()``, then
        ``autograd.backward(losses, head_grads=self.head_grads)``.

        pixels, labels: per device (N, F) resident training set (float32, or uint8 with
            ``uint8``) and (N,) float32 labels.
        idx: per device the worker's index vector (:class:`StepInput`: its P*K row
            indices, then augmentation and miner columns if any).
        """
        own, rows, noise = self.forward_own(pixels, idx)               # (B, D) each
        emb, lab, u = self.gather(own, labels, rows, noise)
        slots = self.slots(own[0].shape[0])
        extra = [[x] for x in u] if u else [[]] * len(own)
        return [self.loss(o, e, y, s, *x) for o, e, y, s, x in zip(own, emb, lab, slots, extra)]


class MemoryMinedTripletStep(GlobalMinedTripletStep):
    """:class:`GlobalMinedTripletStep` with a cross-batch memory (XBM: Wang, Zhang, Huang,
    Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    Every device keeps the same queue of the last ``memory`` global batches'
    embeddings and labels (``memory x G`` rows, filled in step order from the gathered
    global batch, so all workers hold the same matrix). Each anchor of the global batch
    is mined against the global batch and the memory (:class:`mining.MemoryMinedTripletLoss`:
    positives from the batch, negatives from both); gradients flow only through the
    current batch (the memory holds constants). After the forward, the global batch is
    enqueued, replacing the oldest. As the global batch, the memory does not depend on
    how the batch is split, so W workers equal one process on the concatenated batch.

    The queue is not checkpointed: a resumed run starts with it empty, as the run did at
    its first step (it is full again after ``memory`` steps).

    Args: as :class:`GlobalMinedTripletStep`, and ``memory``: past global batches kept (>= 1).
    """

    def __init__(self, *args, memory: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = int(memory)
        self.filled = 0                  # global batches enqueued so far
        self.queue = None                # per device [emb (M, D), labels (M,), valid (M,)]

    def make_loss(self, margin, miner, k):
        return MemoryMinedTripletLoss(margin=margin, miner=miner, k=k)

    def allocate(self, rows: int, dim: int) -> None:
        """An empty queue for global batches of ``rows`` x ``dim`` on every device."""
        m = self.memory * rows
        self.queue = [[mx.nd.zeros((m, dim), ctx=c), mx.nd.zeros((m,), ctx=c),
                       mx.nd.zeros((m,), ctx=c)] for c in self.contexts]
        self.filled = 0

    def enqueue(self, emb: list, lab: list) -> None:
        """Write the gathered global batch (per device (G, D), (G,)) over the oldest."""
        g = emb[0].shape[0]
        at = (self.filled % self.memory) * g
        with mx.autograd.pause():
            for (m_emb, m_lab, m_valid), e, y in zip(self.queue, emb, lab):
                m_emb[at:at + g] = e
                m_lab[at:at + g] = y
                m_valid[at:at + g] = 1.0
        self.filled += 1

    def __call__(self, pixels, labels, idx) -> list:
        own, rows, noise = self.forward_own(pixels, idx)
        emb, lab, u = self.gather(own, labels, rows, noise)
        if self.queue is None:
            self.allocate(*emb[0].shape)
        slots = self.slots(own[0].shape[0])
        extra = [[x] for x in u] if u else [[]] * len(own)
        losses = [self.loss(o, e, y, s, *q, *x) for o, e, y, s, q, x in
                  zip(own, emb, lab, slots, self.queue, extra)]
        self.enqueue(emb, lab)           # after the reads above (MXNet orders them)
        return losses


def embed(net: nn.Block, pixels, ctx, batch_size: int = 2048):
    """Embeddings of ``pixels`` in batches: (N, F) -> (N, D) float32 numpy.

    ``pixels``: float32 rows used as they are, or uint8 image rows, divided by 255 one
    batch at a time (as the training step does on the device), so a large uint8 test set
    is never copied to float32 whole. Used by rank-0 evaluation and by
    ``python -m dist_triplet.embed``; ``net`` may be the training network or an exported
    ``SymbolBlock``. The last batch may be smaller.
    """
    import numpy as np
    out = []
    for start in range(0, len(pixels), batch_size):
        rows = np.asarray(pixels[start:start + batch_size])
        if rows.dtype == np.uint8:
            rows = rows.astype(np.float32) / np.float32(255.0)
        x = mx.nd.array(rows, ctx=ctx, dtype="float32")
        out.append(net(x).asnumpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)
