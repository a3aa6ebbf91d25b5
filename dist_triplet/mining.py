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
    "MemoryMinedTripletLoss",
    "distance_weighted",
]

MINERS = ("batch_hard", "semi_hard", "distance_weighted")
# Wu et al. 2017 (and MXNet's example/gluon/embedding_learning): distances are clipped
# below at 0.5 before weighting, and negatives at 1.4 or farther are never drawn.
DW_CUTOFF = 0.5
DW_NONZERO_LOSS_CUTOFF = 1.4


def _row_index(F, x, axis=0):
    """(n,) float32 0..n-1 along ``axis`` of ``x``, without knowing n (works for mx.sym)."""
    return F.contrib.arange_like(x, axis=axis)


def _eye(F, d):
    """(A, N) float32, 1 where column j is anchor i itself (j == i), for a distance matrix
    ``d`` whose first A columns are the anchors."""
    return F.broadcast_equal(F.expand_dims(_row_index(F, d, 0), axis=1),
                             F.expand_dims(_row_index(F, d, 1), axis=0))


def _same(F, labels, cand_labels):
    """(A, N) float32 0/1: anchor i and candidate j share a label."""
    labels = F.cast(labels, dtype="float32")  # int labels would not broadcast with floats
    cand_labels = F.cast(cand_labels, dtype="float32")
    return F.broadcast_equal(F.expand_dims(labels, axis=1), F.expand_dims(cand_labels, axis=0))


def _label_masks(F, labels, like):
    """(same, eye) masks, each (B, B) float32 of 0/1, from (B,) labels."""
    same = _same(F, labels, labels)
    return same, _eye(F, same)


def pairwise_sq_dist(F, emb, cand=None):
    """Squared Euclidean distance from every row of ``emb`` to every row of ``cand``.

    ``d[i, j] = ||e_i||^2 + ||c_j||^2 - 2 e_i.c_j``, clipped at 0 (the expansion can go
    slightly negative in float32) and exactly 0 at (i, i) (where rounding would otherwise
    leave noise; ``cand``'s first rows are ``emb``'s when given). Differentiable; the
    miners wrap it in ``BlockGrad``.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (A, D) float32 embeddings.
        cand: (N, D) float32 candidates, N >= A, whose first A rows are ``emb`` (the
            cross-batch memory appends rows); None = ``emb`` itself.

    Returns:
        (A, N) float32, in squared embedding units, as ``gluon.loss.TripletLoss``.
    """
    cand = emb if cand is None else cand
    sq = F.sum(F.square(emb), axis=1)  # (A,)
    sq_c = F.sum(F.square(cand), axis=1)  # (N,)
    dot = F.dot(emb, cand, transpose_b=True)  # (A, N)
    d = F.broadcast_add(F.expand_dims(sq, axis=1), F.expand_dims(sq_c, axis=0)) - 2.0 * dot
    d = F.relu(d)
    return d * (1.0 - _eye(F, d))


def _hard(F, d, pos, neg):
    """Batch-hard choice on a (A, N) distance matrix with 0/1 masks ``pos`` (positives,
    not the anchor) and ``neg`` (negatives): (p, n, weight), each (A,) float32."""
    # d >= 0, so pushing non-positives to -1 keeps them below every positive.
    p = F.argmax(d * pos + (pos - 1.0), axis=1)
    # Non-negatives get max(d) + 1, above every negative.
    big = F.max(d) + 1.0
    n = F.argmin(d + F.broadcast_mul(1.0 - neg, big), axis=1)
    weight = (F.sum(pos, axis=1) > 0) * (F.sum(neg, axis=1) > 0)
    return p, n, weight


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
    p, n, weight = _hard(F, d, same - eye, 1.0 - same)
    return _row_index(F, emb), p, n, F.BlockGrad(weight)


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
    """:func:`semi_hard` over each anchor's first ``m`` positives: (B*m,) each."""
    d = F.BlockGrad(pairwise_sq_dist(F, emb))  # (B, B)
    same, eye = _label_masks(F, labels, emb)
    return _semi_hard(F, d, same - eye, 1.0 - same, m)


def _first_positives(F, pos, m):
    """(a, p, is_pos, ncols): each (A, m) but ncols (1,); row i pairs anchor i with the
    first ``m`` columns (in column order) where ``pos`` is 1; padding pairs (fewer
    positives) have is_pos 0."""
    col = _row_index(F, pos, 1)                                     # (N,) 0..N-1
    ncols = F.max(col) + 1.0                                        # (1,) N
    # Positives score N - j (> 0, larger for lower j), others 0: topk gives the first m.
    score = F.broadcast_mul(pos, F.expand_dims(F.broadcast_sub(ncols, col), axis=0))
    p = F.topk(score, axis=1, k=m, ret_typ="indices", dtype="float32")  # (A, m)
    a = F.broadcast_like(F.expand_dims(_row_index(F, pos, 0), axis=1), p)
    return a, p, _at(F, pos, a, p, ncols), ncols


def _at(F, mat, rows, cols, ncols):
    """mat[rows, cols] elementwise, through the flat (A, N) matrix."""
    return F.take(F.reshape(mat, shape=(-1,)), F.broadcast_add(F.broadcast_mul(rows, ncols), cols))


def _semi_hard(F, d, pos, neg, m):
    """Semi-hard choice on a (A, N) distance matrix for each anchor's first ``m``
    positives: ``(a, p, n, weight)``, each (A*m,) float32.

    Only one (A, m, N) tensor is reduced (an argmin); sums and look-ups go through flat
    ``take``: MXNet's CPU reductions cost ~15 ns per element, so they decide the speed.
    """
    a, p, is_pos, ncols = _first_positives(F, pos, m)               # (A, m)
    d_ap = _at(F, d, a, p, ncols)                                   # (A, m)
    d_an = F.expand_dims(d, axis=1)                                 # (A, 1, N): [a, ., n]
    farther = F.broadcast_mul(F.broadcast_greater(d_an, F.expand_dims(d_ap, axis=2)),
                              F.expand_dims(neg, axis=1))           # (A, m, N): [a, j, n]
    big = F.max(d) + 1.0
    n_semi = F.argmin(F.broadcast_add(F.broadcast_mul(1.0 - farther, big), d_an), axis=2)
    # The argmin is semi-hard iff it is a negative farther than the positive; if none is,
    # it lands on a non-candidate and the farthest negative is taken instead.
    has_semi = _at(F, neg, a, n_semi, ncols) * (_at(F, d, a, n_semi, ncols) > d_ap)
    n_far = F.argmax(d * neg + (neg - 1.0), axis=1)                 # (A,): farthest negative
    n = F.where(has_semi, n_semi, F.broadcast_like(F.expand_dims(n_far, axis=1), d_ap))
    has_neg = F.expand_dims(F.sum(neg, axis=1) > 0, axis=1)         # (A, 1)
    weight = F.broadcast_mul(is_pos, has_neg)

    def flat(x):
        return F.reshape(x, shape=(-1,))

    return flat(a), flat(p), flat(n), F.BlockGrad(flat(weight))


def _distance_weighted(F, d, pos, neg, m, u, dim_like, cutoff=DW_CUTOFF,
                       nonzero_loss_cutoff=DW_NONZERO_LOSS_CUTOFF):
    """Distance-weighted negatives (Wu et al. 2017) on a (A, N) *squared* distance
    matrix of unit-length embeddings, one per pair of each anchor's first ``m``
    positives, drawn by inverse CDF from the uniforms ``u`` (A, m) in (0, 1):
    ``(a, p, n, weight)``, each (A*m,) float32. ``dim_like``: a (1, D) row, for D."""
    a, p, is_pos, _ = _first_positives(F, pos, m)                   # (A, m)
    dist = F.maximum(F.sqrt(d), cutoff)                             # (A, N) Euclidean
    dim = F.sum(F.ones_like(dim_like))                              # (1,) D
    # log q(d)^-1 for points uniform on the unit sphere in R^D (Wu et al. eq. 3).
    log_w = (F.broadcast_mul(2.0 - dim, F.log(dist))
             - F.broadcast_mul((dim - 3.0) / 2.0,
                               F.log(F.maximum(1.0 - 0.25 * F.square(dist), 1e-8))))
    cand = neg * (dist < nonzero_loss_cutoff)
    top = F.max(F.where(cand > 0, log_w, F.ones_like(log_w) * -1e30), axis=1, keepdims=True)
    w = F.exp(F.minimum(F.broadcast_sub(log_w, top), 0.0)) * cand   # (A, N), max 1 per row
    # No candidate within the cutoff: uniform over the negatives (as MXNet's example).
    w = F.where(F.broadcast_like(F.sum(w, axis=1, keepdims=True) > 0, w), w, neg)
    col = _row_index(F, d, 1)
    upper = F.broadcast_lesser_equal(F.expand_dims(col, axis=1), F.expand_dims(col, axis=0))
    cdf = F.dot(w, upper)                                           # (A, N) running sums
    target = F.broadcast_mul(u, F.slice_axis(cdf, axis=1, begin=-1, end=None))  # (A, m)
    # The first column whose running sum reaches the target: a weighted draw.
    n = F.sum(F.broadcast_lesser(F.expand_dims(cdf, axis=1), F.expand_dims(target, axis=2)),
              axis=2)                                               # (A, m)
    has_neg = F.expand_dims(F.sum(neg, axis=1) > 0, axis=1)
    weight = F.broadcast_mul(is_pos, has_neg)

    def flat(x):
        return F.reshape(x, shape=(-1,))

    return flat(a), flat(p), flat(n), F.BlockGrad(flat(weight))


def distance_weighted(F, emb, labels, positives, u):
    """Distance-weighted negative sampling (Wu, Manmatha, Smola, Krahenbuhl, "Sampling
    Matters in Deep Embedding Learning", ICCV 2017; MXNet's
    ``example/gluon/embedding_learning``): for each (anchor, positive) pair of the
    anchor's first ``positives`` positives, a negative drawn with probability
    proportional to ``q(d)^-1``, the inverse density of distances between points
    uniform on the unit sphere in R^D, ``q(d) = d^(D-2) (1 - d^2/4)^((D-3)/2)``, with d
    clipped below at 0.5 (:data:`DW_CUTOFF`) and negatives at d >= 1.4
    (:data:`DW_NONZERO_LOSS_CUTOFF`, beyond any margin) never drawn; uniform over the
    negatives when none is nearer. Needs L2-normalised embeddings (``model.normalize``).

    The draw is an inverse-CDF look-up of the uniforms ``u``, drawn on the host
    (``augment.draw``), so a step is deterministic. Triplets go to
    ``gluon.loss.TripletLoss`` (the paper pairs the sampler with its margin loss).

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 unit-length embeddings.
        labels: (B,) float32 class labels.
        positives: int m >= 1 positives per anchor (K - 1 in a P x K batch).
        u: (B, m) float32 uniforms in (0, 1).

    Returns:
        ``(a, p, n, weight)``, each (B*m,) float32, row ``a * m + j`` for the anchor's
        j-th positive; ``weight`` 1 for a true pair with at least one negative. No gradient.
    """
    d = F.BlockGrad(pairwise_sq_dist(F, emb))
    same, eye = _label_masks(F, labels, emb)
    return _distance_weighted(F, d, same - eye, 1.0 - same, int(positives), u,
                              F.slice_axis(emb, axis=0, begin=0, end=1))


def _mine(F, emb, labels, margin, miner, positives=None, u=None, memory=None):
    """The chosen miner's ``(a, p, n, weight, cand)``: indices into ``cand``, the rows
    triplets are gathered from (``emb``, or ``emb`` followed by the memory's rows)."""
    if memory is None:
        if miner == "batch_hard":
            return batch_hard(F, emb, labels) + (emb,)
        if miner == "semi_hard":
            return semi_hard(F, emb, labels, margin, positives) + (emb,)
        if miner == "distance_weighted":
            return distance_weighted(F, emb, labels, positives, u) + (emb,)
        raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")
    mem_emb, mem_labels, mem_valid = memory
    cand = F.concat(emb, mem_emb, dim=0)                                  # (A + M, D)
    d = F.BlockGrad(pairwise_sq_dist(F, emb, cand))                       # (A, A + M)
    same = _same(F, labels, F.concat(labels, mem_labels, dim=0))
    ones = F.ones_like(F.cast(labels, dtype="float32"))                   # (A,)
    # Positives from the current batch only (fresh embeddings), negatives from both.
    current = F.concat(ones, F.zeros_like(mem_valid), dim=0)              # (A + M,)
    valid = F.concat(ones, mem_valid, dim=0)
    pos = F.broadcast_mul(same, F.expand_dims(current, axis=0)) - _eye(F, d)
    neg = F.broadcast_mul(1.0 - same, F.expand_dims(valid, axis=0))
    if miner == "batch_hard":
        p, n, weight = _hard(F, d, pos, neg)
        return _row_index(F, emb), p, n, F.BlockGrad(weight), cand
    if miner == "semi_hard":
        return _semi_hard(F, d, pos, neg, int(positives)) + (cand,)
    if miner == "distance_weighted":
        return _distance_weighted(F, d, pos, neg, int(positives), u,
                                  F.slice_axis(emb, axis=0, begin=0, end=1)) + (cand,)
    raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")


def mined_triplet_loss(F, emb, labels, margin, miner, loss_fn=None, positives=None, u=None,
                       memory=None):
    """Per-triplet ``gluon.loss.TripletLoss`` over the triplets one miner selects.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (B, D) float32 embeddings (the anchors).
        labels: (B,) class labels, float32.
        margin: float >= 0, squared-L2 units (``gluon.loss.TripletLoss``).
        miner: ``"batch_hard"``, ``"semi_hard"`` or ``"distance_weighted"``.
        loss_fn: a ``gluon.loss.TripletLoss`` to reuse (a block's child); a new one with
            ``margin`` if None.
        positives: semi-hard and distance-weighted: positives per anchor (see
            :func:`semi_hard`; required by distance-weighted and with ``memory``).
        u: distance-weighted only: (B, positives) float32 uniforms in (0, 1).
        memory: None, or ``(mem_emb (M, D), mem_labels (M,), mem_valid (M,))`` float32
            constants (the cross-batch memory, xbm.py): negatives are then mined over the
            batch and the memory's valid rows, positives in the batch only.

    Returns:
        ``(loss, weight)``: (T,) float32 each, T = B for batch-hard and B*B (or
        B*positives) otherwise; ``loss`` is differentiable with respect to ``emb``;
        ``weight`` is 0/1 without gradient.

    Raises:
        ValueError: on an unknown ``miner`` or ``margin < 0``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    a, p, n, weight, cand = _mine(F, emb, labels, margin, miner, positives, u, memory)
    if loss_fn is None:
        loss_fn = gluon.loss.TripletLoss(margin=margin)
    loss = loss_fn(F.take(emb, a), F.take(cand, p), F.take(cand, n))
    return loss, weight


class MinedTripletLoss(gluon.HybridBlock):
    """Mean ``gluon.loss.TripletLoss`` over the triplets mined in a P x K batch.

    ``forward(emb, labels[, u])`` with emb (B, D) float32 and labels (B,) float32 (and,
    for distance-weighted, u (B, K - 1) float32 uniforms) returns a (1,) float32 scalar
    ``sum(loss * w) / max(sum(w), 1)``: the mean over valid triplets, and 0 (not NaN)
    when the batch has none. Hybridizable (``hybridize(static_alloc=True,
    static_shape=True)``).

    Args:
        margin: float >= 0, squared-L2 units as ``gluon.loss.TripletLoss``.
        miner: ``"batch_hard"`` (Hermans et al. 2017), ``"semi_hard"`` (FaceNet) or
            ``"distance_weighted"`` (Wu et al. 2017; needs ``k``).
        k: samples per class of the P x K batches, or None. With ``k``, semi-hard pairs
            each anchor with its K - 1 positives only (the same triplets as all pairs,
            O(B^2 K) instead of O(B^3); see :func:`semi_hard`), as does distance-weighted.
            Ignored by batch-hard.

    Raises:
        ValueError: on an unknown ``miner``, ``margin < 0``, ``k < 2``, or
            distance-weighted without ``k``.
    """

    def __init__(self, margin: float, miner: str = "batch_hard", k=None, **kwargs):
        super().__init__(**kwargs)
        if miner not in MINERS:
            raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if k is not None and int(k) < 2:
            raise ValueError(f"k must be >= 2 (a positive per anchor), got {k}")
        if miner == "distance_weighted" and k is None:
            raise ValueError("distance_weighted mining needs k (samples per class)")
        self._margin = float(margin)
        self._miner = miner
        self._positives = int(k) - 1 if k is not None and miner != "batch_hard" else None
        with self.name_scope():
            self.triplet = gluon.loss.TripletLoss(margin=self._margin)

    @property
    def noise_columns(self) -> int:
        """Uniforms per anchor the miner needs (distance-weighted: K - 1), else 0."""
        return self._positives if self._miner == "distance_weighted" else 0

    def mean_loss(self, F, emb, labels, u=None, memory=None):
        loss, weight = mined_triplet_loss(F, emb, labels, self._margin, self._miner,
                                          loss_fn=self.triplet, positives=self._positives,
                                          u=u, memory=memory)
        return F.sum(loss * weight) / F.maximum(F.sum(weight), 1.0)

    def hybrid_forward(self, F, emb, labels, u=None):
        return self.mean_loss(F, emb, labels, u)


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

    def hybrid_forward(self, F, own, gathered, labels, slot, u=None):
        emb = splice_own_rows(F, own, gathered, slot)                # (G, D)
        return self.mean_loss(F, emb, labels, u)


class MemoryMinedTripletLoss(GlobalMinedTripletLoss):
    """:class:`GlobalMinedTripletLoss` with a cross-batch memory (XBM, Wang et al. CVPR
    2020; ``model.MemoryMinedTripletStep`` keeps the queue).

    ``forward(own, gathered, labels, slot, mem_emb, mem_labels, mem_valid[, u])``: as
    :class:`GlobalMinedTripletLoss`, and the memory's (M, D) embeddings, (M,) labels and
    (M,) 0/1 validity (rows not filled yet are 0), all float32 constants. Every anchor of
    the global batch is mined with its positives in the batch and its negatives in the
    batch and the memory's valid rows; the loss is the mean over the mined triplets,
    differentiable towards ``own`` only. Cost: O(G (G + M)) for batch-hard, O(G m (G + M))
    for semi-hard and distance-weighted (m positives per anchor).
    """

    def hybrid_forward(self, F, own, gathered, labels, slot, mem_emb, mem_labels, mem_valid,
                       u=None):
        emb = splice_own_rows(F, own, gathered, slot)                # (G, D)
        return self.mean_loss(F, emb, labels, u, memory=(F.BlockGrad(mem_emb), mem_labels,
                                                         mem_valid))
