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
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from .augment import AUG_COLUMNS, check_rows, crop_flip
from .mining import MinedTripletLoss, PoolTripletLoss


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
        out = []
        if self.augment:
            check_rows(self.augment.image_shape, u.shape[2])
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
    """One worker's share of global mining's forward pass.

    forward(pixels, labels, idx, slot) -> (emb, spread, batch_labels[, u])
        pixels, labels: the resident (N, F) training rows (float32, or uint8 scaled as in
            :func:`gather_rows`) and (N,) float32 labels; idx: the worker's index vector
            (:class:`StepInput`); slot: (W B, 1) float32, 1 on the worker's rows of the
            global batch, else 0.
        emb: (B, D) the worker's embeddings; spread: (W B, D) them at their rows of the
            global batch and 0 elsewhere, without gradient (summed over the workers it is
            the global batch, exactly: adding zeros rounds nothing); batch_labels: (W B,)
            the global batch's labels; u: (B, noise) the miner's uniforms (omitted
            without noise).

    The global batch's labels are the worker's own repeated W times
    (``triplets.pk_global_batches`` deals every worker the same classes in the same order,
    k images each), so they need no communication.
    """

    def __init__(self, net: nn.Block, uint8: bool = False, augment=None, noise: int = 0,
                 workers: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.input = StepInput(uint8, augment, noise)
        self._workers = int(workers)

    def hybrid_forward(self, F, pixels, labels, idx, slot):
        rows, x, u = self.input.read(F, pixels, idx)
        emb = self.net(x)
        spread = F.broadcast_mul(F.tile(F.BlockGrad(emb), reps=(self._workers, 1)), slot)
        lab = F.tile(F.take(labels, rows), reps=(self._workers,))
        return (emb, spread, lab) if u is None else (emb, spread, lab, u)


class PoolGradientLoss(nn.HybridBlock):
    """forward(own (B, D), summed (G D + 2,)) -> (1,) float32: one worker's surrogate loss
    in global mining (:class:`GlobalMinedTripletStep`).

    ``summed`` is ``[gradient (G, D) flat; total; count]`` summed over the workers (no
    gradient flows into it). The value returned is ``total / max(count, 1)``, the global
    batch's mean mined loss; its gradient with respect to ``own`` is the worker's rows
    ``worker B .. (worker + 1) B - 1`` of that gradient times ``workers / max(count, 1)``.

    Args: worker: the worker's index; rows: B; dim: D; workers: W (G = W B).
    """

    def __init__(self, worker: int, rows: int, dim: int, workers: int, **kwargs):
        super().__init__(**kwargs)
        self._span = (worker * rows * dim, (worker + 1) * rows * dim)
        self._at = workers * rows * dim
        self._dim = dim
        self._workers = float(workers)

    def hybrid_forward(self, F, own, summed):
        summed = F.BlockGrad(summed)
        grad = F.reshape(F.slice(summed, begin=(self._span[0],), end=(self._span[1],)),
                         shape=(-1, self._dim))                              # (B, D)
        total = F.slice(summed, begin=(self._at,), end=(self._at + 1,))      # (1,)
        count = F.maximum(F.slice(summed, begin=(self._at + 1,), end=(self._at + 2,)), 1.0)
        dot = F.broadcast_div(F.reshape(F.sum(own * grad), shape=(1,)), count) * self._workers
        return dot - F.BlockGrad(dot) + total / count


class GlobalMinedTripletStep:
    """The forward of ``sampler.scope: global`` for the devices of one process.

    Each device (a worker) embeds its own P x K batch; the embeddings of all workers are
    gathered without gradient by one ``allreduce`` sum of each worker's rows placed in a
    zero (G, D) matrix (:class:`EmbedRows`; Horovod's ``allgather`` would block the host
    every step): the global batch in worker order, the same on every worker. Its labels
    need no communication. Each worker then mines only its own rows as anchors against
    the pool: the whole global batch (:class:`mining.PoolTripletLoss`: the same triplets
    as mining all G anchors, 1/W of the work), followed by the cross-batch memory's
    constant rows in :class:`MemoryMinedTripletStep`. It takes the gradient of its
    anchors' summed loss with respect to the whole (G, D) batch, since their positives
    and negatives are mostly other workers' rows. A second ``allreduce`` sums these
    gradients (with the loss sums and triplet counts) over the workers: the gradient of
    the global batch's summed loss, every anchor's contribution to every row; divided by
    the global triplet count it is exactly the gradient one process gets on the whole
    batch. Each worker backpropagates its own rows' slice of it through the network
    (:class:`PoolGradientLoss`). Distance-weighted mining draws with each anchor's own
    uniforms, which therefore stay on their worker.

    The step averages the workers' parameter gradients (Horovod's mean over processes,
    ``Trainer.step(devices)`` over devices), whereas the global batch's gradient is
    their sum, so the slice is multiplied by W, as pytorch-metric-learning's
    ``DistributedLossWrapper`` multiplies its loss by the world size. The returned loss is
    a surrogate: its value is the global batch's mean mined loss (the same on every
    worker) and its gradient with respect to the worker's embeddings is that slice, so the
    caller runs the ordinary ``autograd.backward(losses)``. No host synchronisation: three
    hybridized blocks, one gradient and two collectives per device and step, all queued
    MXNet operations.

    Cost per worker and step: an allreduce of G D float32, mining of P K anchors against
    M pool rows (G = W P K, plus the memory's; batch-hard O(P K M); semi-hard
    O(P K M log M)), an allreduce of G D + 2 float32, then the usual allreduce of the
    parameter gradients.

    Args:
        net: the embedding network (shared with the caller).
        margin, miner: as :class:`mining.MinedTripletLoss`.
        k: samples per class per worker (sampler.k); the global batch has ``W * k``.
        contexts: this process's devices.
        worker_ranks: the global worker index of each device (``Backend.worker_rank``).
        num_workers: W, all workers of the job (processes x devices).
        allreduce_sum: ``f((n, ...) NDArray, name=str) -> NDArray``, the sum over
            processes (``dist.Backend.allreduce_sum``); a collective. Its two calls per
            step have names of their own: Horovod refuses a name still in flight.
        uint8: the resident training set holds uint8 image bytes (scaled on the device).
        augment: an ``augment.Augment`` or None (:class:`StepInput`).
    """

    memory = 0  # past global batches in the pool (MemoryMinedTripletStep)

    def __init__(self, net, margin: float, miner: str, k: int, contexts, worker_ranks,
                 num_workers: int, allreduce_sum, uint8: bool = False, augment=None):
        self.contexts = list(contexts)
        self.worker_ranks = [int(w) for w in worker_ranks]
        self.num_workers = int(num_workers)
        self.allreduce_sum = allreduce_sum
        self._loss_args = dict(margin=margin, miner=miner, k=int(k) * self.num_workers,
                               memory=self.memory > 0)
        self._blocks = {}
        self._consts = {}
        noise = PoolTripletLoss(**self._loss_args).noise_columns
        self.embed = EmbedRows(net, uint8=uint8, augment=augment, noise=noise,
                               workers=self.num_workers)
        self.embed.hybridize(static_alloc=True, static_shape=True)
        self.input = self.embed.input

    def _block(self, key, make):
        """The hybridized block ``make()`` for ``key`` (a shape), made once."""
        if key not in self._blocks:
            self._blocks[key] = make()
            self._blocks[key].hybridize(static_alloc=True, static_shape=True)
        return self._blocks[key]

    def _rows(self, rows: int) -> list:
        """Per device ``(slot, anchors)`` for workers of ``rows`` rows: the (G, 1) 0/1
        float32 mask of the worker's rows of the global batch (:class:`EmbedRows`) and
        their (rows,) float32 indices there (the anchors it mines)."""
        if rows not in self._consts:
            g = self.num_workers * rows
            self._consts[rows] = [
                (mx.nd.array((np.arange(g) // rows == w)[:, None], ctx=c, dtype="float32"),
                 mx.nd.arange(w * rows, (w + 1) * rows, ctx=c, dtype="float32"))
                for w, c in zip(self.worker_ranks, self.contexts)]
        return self._consts[rows]

    def forward_own(self, pixels, labels, idx) -> list:
        """Per device :class:`EmbedRows`'s ``(emb, spread, batch_labels[, u])``, ``emb``
        with gradient."""
        rows = idx[0].shape[0] // self.input.columns
        return [self.embed(x, y, i, slot)
                for x, y, i, (slot, _) in zip(pixels, labels, idx, self._rows(rows))]

    def gather(self, spread) -> list:
        """Per device the (G, D) global batch, an array of its own without gradient: the
        sum of every worker's ``spread`` (per device, :class:`EmbedRows`). A collective
        under Horovod."""
        with mx.autograd.pause():
            here = [s.detach() for s in spread]
            everyone = self.allreduce_sum(self._on_first(here), name="global_batch")
            return [everyone.as_in_context(c) for c in self.contexts]

    def _on_first(self, arrays):
        """The devices' arrays summed on the first device; the array itself with one."""
        if len(arrays) == 1:
            return arrays[0]
        return mx.nd.add_n(*[a.as_in_context(self.contexts[0]) for a in arrays])

    def pool_inputs(self, pools, labels) -> tuple:
        """``(extra, rows)``: per device the pool's inputs after the batch (none here; the
        memory's in :class:`MemoryMinedTripletStep`) and the pool's row count."""
        return [[] for _ in pools], pools[0].shape[0]

    def __call__(self, pixels, labels, idx) -> list:
        """Per device the (1,) float32 surrogate loss (see the class): its value is the
        global batch's mean mined loss. Call inside ``autograd.record()``, then
        ``autograd.backward(losses)``.

        pixels, labels: per device (N, F) resident training set (float32, or uint8 with
            ``uint8``) and (N,) float32 labels.
        idx: per device the worker's index vector (:class:`StepInput`: its P*K row
            indices, then augmentation and miner columns if any).
        """
        out = self.forward_own(pixels, labels, idx)
        # Labels detached: autograd.grad below would otherwise free the embedding's graph.
        own, lab = [o[0] for o in out], [o[2].detach() for o in out]
        pools = self.gather([o[1] for o in out])                       # (G, D) each
        extra, rows = self.pool_inputs(pools, lab)
        if self.input.noise:
            extra = [x + [o[3].detach()] for x, o in zip(extra, out)]  # own anchors' uniforms
        b, dim = own[0].shape
        mine = self._block(("mine", rows), lambda: PoolTripletLoss(rows=rows, **self._loss_args))
        with mx.autograd.pause():
            sums = []
            for pool, y, (_, anchors), x in zip(pools, lab, self._rows(b), extra):
                pool.attach_grad()
                with mx.autograd.record():
                    sums.append(mine(pool, y, anchors, *x))             # (total, count)
            grads = mx.autograd.grad([t for t, _ in sums], pools)       # (G, D) each
            packets = [mx.nd.concat(g.reshape((-1,)), t, n, dim=0)
                       for g, (t, n) in zip(grads, sums)]
            summed = self.allreduce_sum(self._on_first(packets), name="global_gradient")
        self.after_mining(pools, lab)
        return [self._block(("loss", w, b, dim),
                            lambda: PoolGradientLoss(w, b, dim, self.num_workers))(
                                o, summed.as_in_context(c))
                for o, w, c in zip(own, self.worker_ranks, self.contexts)]

    def after_mining(self, pools, labels) -> None:
        """Called with the gathered global batch once it is mined (the memory's enqueue)."""


class MemoryMinedTripletStep(GlobalMinedTripletStep):
    """:class:`GlobalMinedTripletStep` with a cross-batch memory (XBM: Wang, Zhang, Huang,
    Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    Every device keeps the same queue of the last ``memory`` global batches'
    embeddings and labels (``memory x G`` rows, filled in step order from the gathered
    global batch, so all workers hold the same matrix). The pool each worker mines its
    anchors against is the global batch followed by the memory (positives from the
    batch, negatives from both: ``mining.mine_pool``); gradients flow only through the
    batch (the memory holds constants). After the mining, the global batch is enqueued,
    replacing the oldest. As the global batch, the memory does not depend on how the
    batch is split, so W workers equal one process on the concatenated batch.

    The queue is not checkpointed: a resumed run starts with it empty, as the run did at
    its first step (it is full again after ``memory`` steps).

    Args: as :class:`GlobalMinedTripletStep`, and ``memory``: past global batches kept (>= 1).
    """

    def __init__(self, *args, memory: int, **kwargs):
        self.memory = int(memory)
        super().__init__(*args, **kwargs)
        self.filled = 0                  # global batches enqueued so far
        self.queue = None                # per device [emb (R, D), labels (R,), valid (R,)]

    def pool_inputs(self, pools, labels) -> tuple:
        if self.queue is None:
            rows, dim = pools[0].shape
            r = self.memory * rows
            self.queue = [[mx.nd.zeros((r, dim), ctx=c), mx.nd.zeros((r,), ctx=c),
                           mx.nd.zeros((r,), ctx=c)] for c in self.contexts]
        return [list(q) for q in self.queue], pools[0].shape[0] * (1 + self.memory)

    def after_mining(self, pools, labels) -> None:
        """Write the gathered global batch (per device (G, D), (G,)) over the oldest."""
        g = pools[0].shape[0]
        at = (self.filled % self.memory) * g
        with mx.autograd.pause():
            for (m_emb, m_lab, m_valid), e, y in zip(self.queue, pools, labels):
                m_emb[at:at + g] = e
                m_lab[at:at + g] = y
                m_valid[at:at + g] = 1.0
        self.filled += 1


def embed(net: nn.Block, pixels, ctx, batch_size: int = 2048):
    """Embeddings of ``pixels`` in batches: (N, F) -> (N, D) float32 numpy.

    ``pixels``: float32 rows used as they are, or uint8 image rows, divided by 255 one
    batch at a time (as the training step does on the device), so a large uint8 test set
    is never copied to float32 whole. Used by rank-0 evaluation and by
    ``python -m dist_triplet.embed``; ``net`` may be the training network or an exported
    ``SymbolBlock``. The last batch may be smaller.
    """
    out = []
    for start in range(0, len(pixels), batch_size):
        rows = np.asarray(pixels[start:start + batch_size])
        if rows.dtype == np.uint8:
            rows = rows.astype(np.float32) / np.float32(255.0)
        x = mx.nd.array(rows, ctx=ctx, dtype="float32")
        out.append(net(x).asnumpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)
