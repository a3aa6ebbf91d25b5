"""Online triplet mining inside a batch of embeddings, and the mined triplet loss.

The batch comes from a P x K class-balanced sampler (P classes x K samples, class-major),
so every anchor has K - 1 positives and (P - 1) * K negatives in the batch. Two miners:

* ``"batch_hard"``: Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", 2017 (arXiv:1703.07737): for each anchor the farthest positive and
  the closest negative.
* ``"semi_hard"``: Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, Sec. 3.2: for
  each (anchor, positive) pair the closest negative that is farther than the positive.
  When no negative is farther, the farthest negative is taken, as TensorFlow Addons'
  ``tfa.losses.triplet_semihard_loss`` does.

Distances are squared Euclidean, the distance of ``gluon.loss.TripletLoss`` (MXNet 1.9
docs: ``loss = max(0, ||a - p||^2 - ||a - n||^2 + margin)``). Mining decisions carry no
gradient (``BlockGrad`` on the distance matrix): the indices select rows, and the loss is
``gluon.loss.TripletLoss`` on the gathered rows, so gradients flow through the anchor,
positive and negative embeddings only.

Global mining (``sampler.scope: global``, :class:`GlobalMinedTripletLoss`): every worker
mines over the whole global batch, in which only its own rows carry a gradient; see
:func:`splice_own_rows` for why the summed gradients are exactly the single-process ones.

Every function takes ``F`` first and uses only operators that exist in both ``mx.nd`` and
``mx.sym``, so it runs eagerly and inside a ``HybridBlock.hybrid_forward``. Indices are
returned as float32, as MXNet's ``argmax``/``argmin`` produce them; ``F.take`` accepts them.
"""
from __future__ import annotations

from mxnet import gluon

__all__ = [
    "MINERS",
    "pairwise_sq_dist",
    "batch_hard",
    "semi_hard",
    "mined_triplet_loss",
    "MinedTripletLoss",
    "splice_own_rows",
    "GlobalMinedTripletLoss",
]

MINERS = ("batch_hard", "semi_hard")


def _row_index(F, x):
    """(B,) float32 0..B-1 for the rows of ``x``, without knowing B (works for mx.sym)."""
    return F.contrib.arange_like(x, axis=0)


def _label_masks(F, labels, like):
    """(same, eye) masks, each (B, B) float32 of 0/1, from (B,) labels."""
    labels = F.cast(labels, dtype="float32")  # int labels would not broadcast with floats
    same = F.broadcast_equal(F.expand_dims(labels, axis=1), F.expand_dims(labels, axis=0))
    idx = _row_index(F, like)
    eye = F.broadcast_equal(F.expand_dims(idx, axis=1), F.expand_dims(idx, axis=0))
    return same, eye


def pairwise_sq_dist(F, emb):
    """Squared Euclidean distance between all rows of ``emb``.

    ``d[i, j] = ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j``, clipped at 0 (the expansion can go
    slightly negative in float32) and with an exactly-zero diagonal (where rounding would
    otherwise leave noise). Differentiable; the miners wrap it in ``BlockGrad``.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 embeddings.

    Returns:
        (B, B) float32, in squared embedding units, as ``gluon.loss.TripletLoss``.
    """
    sq = F.sum(F.square(emb), axis=1)  # (B,)
    dot = F.dot(emb, emb, transpose_b=True)  # (B, B)
    d = F.broadcast_add(F.expand_dims(sq, axis=1), F.expand_dims(sq, axis=0)) - 2.0 * dot
    d = F.relu(d)
    idx = _row_index(F, emb)
    eye = F.broadcast_equal(F.expand_dims(idx, axis=1), F.expand_dims(idx, axis=0))
    return d * (1.0 - eye)


def batch_hard(F, emb, labels):
    """Batch-hard mining (Hermans et al. 2017): one triplet per anchor.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 embeddings.
        labels: (B,) class labels, float32 (ints are cast; exact up to 2**24).

    Returns:
        ``(a, p, n, weight)``, each (B,) float32: ``a = 0..B-1``; ``p`` the farthest
        other sample with the anchor's label; ``n`` the closest sample with another
        label; ``weight`` 1 where the anchor has at least one positive and one negative,
        else 0 (``p``/``n`` are then arbitrary valid indices). Equal distances resolve to
        the lower index (MXNet's ``argmax``/``argmin`` return the first). No gradient.
    """
    d = F.BlockGrad(pairwise_sq_dist(F, emb))
    same, eye = _label_masks(F, labels, emb)
    pos = same - eye  # same label, not the anchor itself
    neg = 1.0 - same
    # d >= 0, so pushing non-positives to -1 keeps them below every positive.
    p = F.argmax(d * pos + (pos - 1.0), axis=1)
    # Non-negatives get max(d) + 1, above every negative.
    big = F.max(d) + 1.0
    n = F.argmin(d + F.broadcast_mul(1.0 - neg, big), axis=1)
    weight = (F.sum(pos, axis=1) > 0) * (F.sum(neg, axis=1) > 0)
    a = _row_index(F, emb)
    return a, p, n, F.BlockGrad(weight)


def semi_hard(F, emb, labels, margin, positives=None):
    """Semi-hard mining (FaceNet, Schroff et al. 2015): one triplet per positive pair.

    For every ordered pair (a, p), a != p with the same label, the negative is the
    closest n with ``d(a, n) > d(a, p)`` (squared L2). If no negative is farther than the
    positive, the farthest negative is taken instead -- the rule of TensorFlow Addons'
    ``triplet_semihard_loss``. As there, ``margin`` does not change the choice: the
    closest farther negative is the semi-hard one (``d(a,p) < d(a,n) < d(a,p) + margin``)
    if any exists, and otherwise its loss would be 0 anyway.

    ``positives=None`` considers all B*B ordered pairs: memory and time O(B^3) (a
    (B, B, B) mask), ~4M elements at B = 160, which dominates a CPU step. With
    ``positives=m`` only each anchor's first m positives (in batch order) are paired:
    O(B^2 m). A P x K batch gives every anchor exactly K - 1 positives, so ``m = K - 1``
    mines exactly the same triplets, ~B / m times cheaper.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 embeddings.
        labels: (B,) class labels, float32 (ints are cast).
        margin: float >= 0, squared-L2 units as ``gluon.loss.TripletLoss``; accepted for
            a uniform miner signature and checked, but see above.
        positives: None, or int m >= 1 positives per anchor (anchors with more lose the
            later ones; missing ones get weight 0).

    Returns:
        ``(a, p, n, weight)``, each (T,) float32. ``positives=None``: T = B*B, row
        ``a * B + p`` for the pair (a, p). ``positives=m``: T = B*m, row ``a * m + j``
        for the anchor's j-th positive. ``weight`` is 1 for a true pair (a != p, same
        label) with at least one negative in the batch, else 0. Ties resolve to the
        lower index. No gradient.

    Raises:
        ValueError: if ``margin < 0`` or ``positives < 1``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if positives is not None:
        if int(positives) < 1:
            raise ValueError(f"positives must be >= 1, got {positives}")
        return _semi_hard_pairs(F, emb, labels, int(positives))
    d = F.BlockGrad(pairwise_sq_dist(F, emb))  # (B, B)
    same, eye = _label_masks(F, labels, emb)
    pos = same - eye
    neg = 1.0 - same
    d_ap = F.expand_dims(d, axis=2)  # (B, B, 1): [a, p, .]
    d_an = F.expand_dims(d, axis=1)  # (B, 1, B): [a, ., n]
    farther = F.broadcast_mul(F.broadcast_greater(d_an, d_ap),
                              F.expand_dims(neg, axis=1))  # (B, B, B): [a, p, n]
    big = F.max(d) + 1.0
    n_semi = F.argmin(F.broadcast_add(F.broadcast_mul(1.0 - farther, big), d_an), axis=2)
    has_semi = F.sum(farther, axis=2) > 0  # (B, B)
    n_far = F.argmax(d * neg + (neg - 1.0), axis=1)  # (B,): farthest negative per anchor
    n = F.where(has_semi, n_semi, F.broadcast_like(F.expand_dims(n_far, axis=1), d))
    idx = _row_index(F, emb)
    a = F.broadcast_like(F.expand_dims(idx, axis=1), d)
    p = F.broadcast_like(F.expand_dims(idx, axis=0), d)
    weight = F.broadcast_mul(pos, F.expand_dims(F.sum(neg, axis=1) > 0, axis=1))
    def flat(x):
        return F.reshape(x, shape=(-1,))

    return flat(a), flat(p), flat(n), F.BlockGrad(flat(weight))


def _semi_hard_pairs(F, emb, labels, m):
    """:func:`semi_hard` over each anchor's first ``m`` positives: (B*m,) each.

    Only one (B, m, B) tensor is reduced (an argmin); sums and look-ups go through flat
    ``take``: MXNet's CPU reductions cost ~15 ns per element, so they decide the speed.
    """
    d = F.BlockGrad(pairwise_sq_dist(F, emb))  # (B, B)
    same, eye = _label_masks(F, labels, emb)
    pos = same - eye
    neg = 1.0 - same
    idx = _row_index(F, emb)                                        # (B,) 0..B-1
    b = F.max(idx) + 1.0                                            # (1,) B
    # Positives score B - j (> 0, larger for lower j), others 0: topk gives the first m.
    score = F.broadcast_mul(pos, F.expand_dims(F.broadcast_sub(b, idx), axis=0))
    p = F.topk(score, axis=1, k=m, ret_typ="indices", dtype="float32")  # (B, m)
    a = F.broadcast_like(F.expand_dims(idx, axis=1), p)             # (B, m)

    def at(mat, rows, cols):  # mat[rows, cols] elementwise, through the flat matrix
        return F.take(F.reshape(mat, shape=(-1,)), F.broadcast_add(F.broadcast_mul(rows, b), cols))

    d_ap = at(d, a, p)                                              # (B, m)
    is_pos = at(pos, a, p)                                          # (B, m): 0 if padding
    d_an = F.expand_dims(d, axis=1)                                 # (B, 1, B): [a, ., n]
    farther = F.broadcast_mul(F.broadcast_greater(d_an, F.expand_dims(d_ap, axis=2)),
                              F.expand_dims(neg, axis=1))           # (B, m, B): [a, j, n]
    big = F.max(d) + 1.0
    n_semi = F.argmin(F.broadcast_add(F.broadcast_mul(1.0 - farther, big), d_an), axis=2)
    # The argmin is semi-hard iff it is a negative farther than the positive; if none is,
    # it lands on a non-candidate and the farthest negative is taken instead.
    has_semi = at(neg, a, n_semi) * (at(d, a, n_semi) > d_ap)       # (B, m)
    n_far = F.argmax(d * neg + (neg - 1.0), axis=1)                 # (B,): farthest negative
    n = F.where(has_semi, n_semi, F.broadcast_like(F.expand_dims(n_far, axis=1), d_ap))
    has_neg = F.expand_dims(F.sum(neg, axis=1) > 0, axis=1)         # (B, 1)
    weight = F.broadcast_mul(is_pos, has_neg)

    def flat(x):
        return F.reshape(x, shape=(-1,))

    return flat(a), flat(p), flat(n), F.BlockGrad(flat(weight))


def _mine(F, emb, labels, margin, miner, positives=None):
    if miner == "batch_hard":
        return batch_hard(F, emb, labels)
    if miner == "semi_hard":
        return semi_hard(F, emb, labels, margin, positives)
    raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")


def mined_triplet_loss(F, emb, labels, margin, miner, loss_fn=None, positives=None):
    """Per-triplet ``gluon.loss.TripletLoss`` over the triplets one miner selects.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 embeddings.
        labels: (B,) class labels, float32.
        margin: float >= 0, squared-L2 units (``gluon.loss.TripletLoss``).
        miner: ``"batch_hard"`` or ``"semi_hard"``.
        loss_fn: a ``gluon.loss.TripletLoss`` to reuse (a block's child); a new one with
            ``margin`` if None.
        positives: semi-hard only: positives per anchor (see :func:`semi_hard`).

    Returns:
        ``(loss, weight)``: (T,) float32 each, T = B for batch-hard and B*B (or
        B*positives) for semi-hard; ``loss`` is differentiable with respect to ``emb``;
        ``weight`` is 0/1 without gradient.

    Raises:
        ValueError: on an unknown ``miner`` or ``margin < 0``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    a, p, n, weight = _mine(F, emb, labels, margin, miner, positives)
    if loss_fn is None:
        loss_fn = gluon.loss.TripletLoss(margin=margin)
    loss = loss_fn(F.take(emb, a), F.take(emb, p), F.take(emb, n))
    return loss, weight


class MinedTripletLoss(gluon.HybridBlock):
    """Mean ``gluon.loss.TripletLoss`` over the triplets mined in a P x K batch.

    ``forward(emb, labels)`` with emb (B, D) float32 and labels (B,) float32 returns a
    (1,) float32 scalar ``sum(loss * w) / max(sum(w), 1)``: the mean over valid triplets,
    and 0 (not NaN) when the batch has none. Hybridizable
    (``hybridize(static_alloc=True, static_shape=True)``).

    Args:
        margin: float >= 0, squared-L2 units as ``gluon.loss.TripletLoss``.
        miner: ``"batch_hard"`` (Hermans et al. 2017) or ``"semi_hard"`` (FaceNet).
        k: samples per class of the P x K batches, or None. With ``k``, semi-hard pairs
            each anchor with its K - 1 positives only (the same triplets as all pairs,
            O(B^2 K) instead of O(B^3); see :func:`semi_hard`). Ignored by batch-hard.

    Raises:
        ValueError: on an unknown ``miner``, ``margin < 0`` or ``k < 2``.
    """

    def __init__(self, margin: float, miner: str = "batch_hard", k=None, **kwargs):
        super().__init__(**kwargs)
        if miner not in MINERS:
            raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if k is not None and int(k) < 2:
            raise ValueError(f"k must be >= 2 (a positive per anchor), got {k}")
        self._margin = float(margin)
        self._miner = miner
        self._positives = int(k) - 1 if k is not None and miner == "semi_hard" else None
        with self.name_scope():
            self.triplet = gluon.loss.TripletLoss(margin=self._margin)

    def hybrid_forward(self, F, emb, labels):
        loss, weight = mined_triplet_loss(F, emb, labels, self._margin, self._miner,
                                          loss_fn=self.triplet, positives=self._positives)
        return F.sum(loss * weight) / F.maximum(F.sum(weight), 1.0)


def splice_own_rows(F, own, gathered, slot):
    """The global batch ``gathered`` with this worker's rows replaced by ``own``, whose
    gradient they carry; every other row is a constant (no gradient).

    The values are exactly those of ``gathered`` (``own - BlockGrad(own)`` is exactly 0,
    and ``x + 0 == x`` in IEEE arithmetic), so every worker mines the same triplets from
    the same matrix, bit for bit. The gradient of a loss ``L(E)`` of the spliced matrix
    reaches ``own[j]`` as ``dL/dE[g]`` for the global row ``g`` whose ``slot`` is
    ``j + 1``. Summed over workers, whose own rows partition the global batch, those are
    ``dL/dE`` for every row: the gradient one process gets on the whole batch. This is
    pytorch-metric-learning's ``DistributedLossWrapper(efficient=False)`` construction:
    the loss over all anchors on every worker, only local rows differentiable.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        own: (B, D) float32, this worker's embeddings (differentiable).
        gathered: (G, D) float32, every worker's embeddings in worker order, this
            worker's included (values equal to ``own`` at its rows); treated as constant.
        slot: (G,) float32, ``1 + j`` where global row g is ``own[j]``, else 0.

    Returns:
        (G, D) float32, equal in value to ``gathered``.
    """
    delta = own - F.BlockGrad(own)                                   # (B, D), exactly 0
    pad = F.zeros_like(F.slice_axis(own, axis=0, begin=0, end=1))    # (1, D): row for slot 0
    return F.BlockGrad(gathered) + F.take(F.concat(pad, delta, dim=0), slot)


class GlobalMinedTripletLoss(MinedTripletLoss):
    """:class:`MinedTripletLoss` over the global batch, as one worker computes it.

    ``forward(own, gathered, labels, slot)`` with own (B, D), gathered (G, D), labels (G,)
    and slot (G,) float32 (see :func:`splice_own_rows`) returns the (1,) float32 mean
    loss of the triplets mined over all G rows (all anchors), with a gradient only
    towards ``own``. Its value is the same on every worker. With W workers each applying
    this loss, the sum of the W gradients is the gradient of the mean loss of one process
    given the G rows; the training step multiplies by W to undo the averaging of the
    workers' gradients (Horovod's mean, the kvstore sum divided by the devices), as
    pytorch-metric-learning's ``DistributedLossWrapper`` returns ``loss * world_size``.

    Args:
        margin, miner: as :class:`MinedTripletLoss`.
        k: samples per class in the *global* batch (workers x sampler.k when all workers
            draw the same classes), or None; semi-hard then pairs each anchor with its
            k - 1 positives in the global batch.
    """

    def hybrid_forward(self, F, own, gathered, labels, slot):
        emb = splice_own_rows(F, own, gathered, slot)                # (G, D)
        return super().hybrid_forward(F, emb, labels)
