"""Online triplet mining inside a batch of embeddings, and the mined triplet loss.

The batch comes from a P x K class-balanced sampler (P classes x K samples, class-major),
so every anchor has K - 1 positives and (P - 1) * K negatives in the batch. Three miners:

* ``"batch_hard"``: Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", 2017 (arXiv:1703.07737): for each anchor the farthest positive and
  the closest negative.
* ``"semi_hard"``: Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015, Sec. 3.2: for
  each (anchor, positive) pair the closest negative that is farther than the positive.
  When no negative is farther, the farthest negative is taken, as TensorFlow Addons'
  ``tfa.losses.triplet_semihard_loss`` does.
* ``"distance_weighted"``: Wu, Manmatha, Smola, Krahenbuhl, "Sampling Matters in Deep
  Embedding Learning", ICCV 2017 (:func:`distance_weighted`): per (anchor, positive) pair
  a negative drawn with probability ~ the inverse density of distances on the unit sphere.

Distances are squared Euclidean, the distance of ``gluon.loss.TripletLoss`` (MXNet 1.9
docs: ``loss = max(0, ||a - p||^2 - ||a - n||^2 + margin)``). Mining decisions carry no
gradient (``BlockGrad`` on the distance matrix): the indices select entries of the same,
differentiable, anchor-to-pool distance matrix, and the loss is ``gluon.loss.TripletLoss``'s
formula on them, so gradients flow through the anchor, positive and negative embeddings
only.

Mining against a pool (:func:`mine_pool`, :class:`PoolTripletLoss`): some anchors mined
against every row of a larger set, with the same triplets as mining the whole set. Global
mining (``sampler.scope: global``) uses it with each worker's own rows as anchors and the
gathered global batch as the pool (``model.GlobalMinedTripletStep``); a cross-batch
memory (XBM, Wang et al. CVPR 2020) appends its rows to that pool as constants
(``memory=``): positives come from the batch only, negatives from the batch and the
memory's valid rows.

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
    "distance_weighted",
    "mine_pool",
    "pool_sq_dist",
    "mined_triplet_loss",
    "MinedTripletLoss",
    "PoolTripletLoss",
]

MINERS = ("batch_hard", "semi_hard", "distance_weighted")
# Wu et al. 2017 (and MXNet's example/gluon/embedding_learning): distances are clipped
# below at 0.5 before weighting, and negatives at 1.4 or farther are never drawn.
DW_CUTOFF = 0.5
DW_NONZERO_LOSS_CUTOFF = 1.4


def _row_index(F, x, axis=0):
    """(n,) float32 0..n-1 along ``axis`` of ``x``, without knowing n (works for mx.sym)."""
    return F.contrib.arange_like(x, axis=axis)


def _pool_masks(F, labels, anchor_rows, pool, memory=None):
    """(pos, neg, own) masks, each (A, M) float32 of 0/1: the pool row is a positive of
    the anchor (its label, not itself), a negative (another label), the anchor itself.

    ``labels`` (G,) of the batch, the pool's first G rows; ``anchor_rows`` (A,) float32
    rows of the anchors in the batch; ``pool`` (M, D). ``memory``: None (M = G), or the
    cross-batch memory's ``(labels (M - G,), valid (M - G,) 0/1)``: its rows are never
    positives (their embeddings are stale, XBM's rule) and negatives only where valid."""
    labels = F.cast(labels, dtype="float32")  # int labels would not broadcast with floats
    anchor_labels = F.take(labels, anchor_rows)
    if memory is not None:
        mem_labels, valid = memory
        ones = F.ones_like(labels)
        labels = F.concat(labels, F.cast(mem_labels, dtype="float32"), dim=0)
        fresh = F.expand_dims(F.concat(ones, F.zeros_like(valid), dim=0), axis=0)  # (1, M)
        valid = F.expand_dims(F.concat(ones, valid, dim=0), axis=0)
    rows = _row_index(F, pool)
    same = F.broadcast_equal(F.expand_dims(anchor_labels, axis=1), F.expand_dims(labels, axis=0))
    own = F.broadcast_equal(F.expand_dims(anchor_rows, axis=1), F.expand_dims(rows, axis=0))
    pos, neg = same - own, 1.0 - same
    if memory is not None:
        pos, neg = F.broadcast_mul(pos, fresh), F.broadcast_mul(neg, valid)
    return pos, neg, own


def pool_sq_dist(F, anchors, pool, own):
    """Squared Euclidean distance from each anchor to every row of a pool.

    ``d[i, j] = ||a_i||^2 + ||e_j||^2 - 2 a_i.e_j``, clipped at 0 (the expansion can go
    slightly negative in float32) and exactly 0 where ``own`` is 1 (the anchor's own row,
    where rounding would otherwise leave noise). Differentiable; the miners wrap it in
    ``BlockGrad``.

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        anchors: (A, D) float32; pool: (M, D) float32.
        own: (A, M) float32 0/1, 1 at each anchor's own row of the pool.

    Returns:
        (A, M) float32, in squared embedding units, as ``gluon.loss.TripletLoss``.
    """
    sa = F.sum(F.square(anchors), axis=1)  # (A,)
    sp = F.sum(F.square(pool), axis=1)  # (M,)
    dot = F.dot(anchors, pool, transpose_b=True)  # (A, M)
    d = F.broadcast_add(F.expand_dims(sa, axis=1), F.expand_dims(sp, axis=0)) - 2.0 * dot
    return F.relu(d) * (1.0 - own)


def pairwise_sq_dist(F, emb):
    """:func:`pool_sq_dist` of a batch with itself: (B, D) -> (B, B), zero diagonal."""
    idx = _row_index(F, emb)
    eye = F.broadcast_equal(F.expand_dims(idx, axis=1), F.expand_dims(idx, axis=0))
    return pool_sq_dist(F, emb, emb, eye)


def _batch_hard(F, d, pos, neg, anchor_rows):
    """Batch-hard on an (A, M) distance matrix; see :func:`batch_hard`."""
    # d >= 0, so pushing non-positives to -1 keeps them below every positive.
    p = F.argmax(d * pos + (pos - 1.0), axis=1)
    # Non-negatives get max(d) + 1, above every negative.
    big = F.max(d) + 1.0
    n = F.argmin(d + F.broadcast_mul(1.0 - neg, big), axis=1)
    weight = (F.sum(pos, axis=1) > 0) * (F.sum(neg, axis=1) > 0)
    return _row_index(F, d), anchor_rows, p, n, F.BlockGrad(weight)


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
    return mine_pool(F, emb, labels, None, 0.0, "batch_hard")


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
    return mine_pool(F, emb, labels, None, margin, "semi_hard", positives)


def _flat(F, x):
    return F.reshape(x, shape=(-1,))


def _semi_hard_all(F, d, pos, neg, anchor_rows):
    """:func:`semi_hard` over every (anchor, pool row) pair of an (A, M) matrix: (A*M,)."""
    d_ap = F.expand_dims(d, axis=2)  # (A, M, 1): [a, p, .]
    d_an = F.expand_dims(d, axis=1)  # (A, 1, M): [a, ., n]
    farther = F.broadcast_mul(F.broadcast_greater(d_an, d_ap),
                              F.expand_dims(neg, axis=1))  # (A, M, M): [a, p, n]
    big = F.max(d) + 1.0
    n_semi = F.argmin(F.broadcast_add(F.broadcast_mul(1.0 - farther, big), d_an), axis=2)
    has_semi = F.sum(farther, axis=2) > 0  # (A, M)
    n_far = F.argmax(d * neg + (neg - 1.0), axis=1)  # (A,): farthest negative per anchor
    n = F.where(has_semi, n_semi, F.broadcast_like(F.expand_dims(n_far, axis=1), d))
    r = F.broadcast_like(F.expand_dims(_row_index(F, d), axis=1), d)
    a = F.broadcast_like(F.expand_dims(anchor_rows, axis=1), d)
    p = F.broadcast_like(F.expand_dims(_row_index(F, d, axis=1), axis=0), d)
    weight = F.broadcast_mul(pos, F.expand_dims(F.sum(neg, axis=1) > 0, axis=1))
    return _flat(F, r), _flat(F, a), _flat(F, p), _flat(F, n), F.BlockGrad(_flat(F, weight))


SORT_FROM = 16   # positives per anchor from which semi-hard mining sorts (_semi_hard_pairs)


def _first_positives(F, pos, m):
    """Each anchor's first ``m`` positives (in pool order) in an (A, M) mask:
    ``(r, p, col, width, at)``: (A, m) rows 0..A-1 and pool rows of the pairs (padding
    pairs of anchors with fewer positives have ``at(pos, p)`` 0), (M,) 0..M-1, (1,) M, and
    ``at(mat, cols)`` = ``mat[r, cols]`` elementwise through the flat (A, M) matrix."""
    row = _row_index(F, pos)                                        # (A,) 0..A-1
    col = _row_index(F, pos, axis=1)                                # (M,) 0..M-1
    width = F.max(col) + 1.0                                        # (1,) M
    # Positives score M - j (> 0, larger for lower j), others 0: topk gives the first m.
    score = F.broadcast_mul(pos, F.expand_dims(F.broadcast_sub(width, col), axis=0))
    p = F.topk(score, axis=1, k=m, ret_typ="indices", dtype="float32")  # (A, m)
    r = F.broadcast_like(F.expand_dims(row, axis=1), p)             # (A, m)
    base = F.broadcast_mul(r, width)                                # (A, m): row starts

    def at(mat, cols):
        return F.take(_flat(F, mat), base + cols)

    return r, p, col, width, at


def _semi_hard_pairs(F, d, pos, neg, anchor_rows, m, rows=None):
    """:func:`semi_hard` over each anchor's first ``m`` positives in an (A, M) distance
    matrix: (A*m,) each.

    Each pair's negative -- the closest negative farther than the positive -- is found by
    one of two searches with the same result: comparing every pair with every pool row
    (:func:`_farther_by_comparing`, O(A m M)) or sorting each anchor's row once and
    searching it (:func:`_semi_hard_by_sorting`, O(A M log M)). Sums and look-ups go
    through flat ``take``: MXNet's CPU reductions cost ~15 ns per element, so they decide
    the speed. At A = 80 anchors and m = 7 comparing is faster (2.9 against 4.2 ms CPU a
    step with its gradient, 1 thread), at m = 31 against M = 320 rows sorting (9.5
    against 17 ms): ``SORT_FROM`` sits between.
    """
    n_neg = F.sum(neg, axis=1, keepdims=True)                       # (A, 1)
    if m >= SORT_FROM:
        r, p, at, n_semi, has_semi = _semi_hard_by_sorting(F, d, pos, neg, n_neg, m, rows)
    else:
        r, p, _, _, at = _first_positives(F, pos, m)                # (A, m)
        n_semi, has_semi = _farther_by_comparing(F, d, neg, at(d, p), at)
    n_far = F.argmax(d * neg + (neg - 1.0), axis=1)                 # (A,): farthest negative
    n = F.where(has_semi, n_semi, F.broadcast_like(F.expand_dims(n_far, axis=1), n_semi))
    return _pairs(F, r, p, n, at(pos, p), n_neg, anchor_rows)       # at(pos, p): 0 if padding


def _pairs(F, r, p, n, is_pos, n_neg, anchor_rows):
    """The (A*m,) ``(r, a, p, n, weight)`` of (A, m) pairs: weight 1 for a true pair of an
    anchor with at least one negative (``n_neg``: (A, 1) negatives per anchor)."""
    weight = F.broadcast_mul(is_pos, n_neg > 0)
    a = F.broadcast_like(F.expand_dims(anchor_rows, axis=1), p)     # (A, m) pool rows
    return _flat(F, r), _flat(F, a), _flat(F, p), _flat(F, n), F.BlockGrad(_flat(F, weight))


def _farther_by_comparing(F, d, neg, d_ap, at):
    """Per pair the closest negative farther than ``d_ap`` (A, m), by an argmin over an
    (A, m, M) mask: ``(n_semi, has_semi)``, (A, m) float32 each; ``at`` as
    :func:`_first_positives` gives it."""
    d_an = F.expand_dims(d, axis=1)                                 # (A, 1, M): [a, ., n]
    farther = F.broadcast_mul(F.broadcast_greater(d_an, F.expand_dims(d_ap, axis=2)),
                              F.expand_dims(neg, axis=1))           # (A, m, M): [a, j, n]
    big = F.max(d) + 1.0
    n_semi = F.argmin(F.broadcast_add(F.broadcast_mul(1.0 - farther, big), d_an), axis=2)
    # The argmin is semi-hard iff it is a negative farther than the positive; if none is,
    # it lands on a non-candidate and the farthest negative is taken instead.
    return n_semi, at(neg, n_semi) * (at(d, n_semi) > d_ap)


def _semi_hard_by_sorting(F, d, pos, neg, n_neg, m, rows=None):
    """Each anchor's first ``m`` positives and their closest farther negatives, from one
    sort of each anchor's row: ``(r, p, at, n_semi, has_semi)`` as
    :func:`_first_positives` and :func:`_farther_by_comparing` give them, the same
    triplets, ties included. ``d``, ``pos``, ``neg``: (A, M) distances and 0/1 masks;
    ``n_neg``: (A, 1) negatives per anchor.

    The sort keys are the negatives' float32 distances widened to float64 and scaled by
    ``1 + j 2^-48`` for pool row j, which orders equal distances by row (lower first, as
    ``argmin``) and keeps every strict order of distinct float32 values (their relative
    gap is >= 2^-24, the scale < M 2^-48 for M < 2^24 rows); after every negative come
    the positives, in pool order (so the anchor's first m positives sit right after its
    negatives: no second sort), then the other rows (the anchor itself, unused memory
    rows). A pair's search key is its positive's distance scaled by ``1 + M 2^-48``,
    above the keys of negatives at that same distance, which are not farther, and below
    every non-negative; a branchless binary search counts the negatives at or below it
    in ``rows.bit_length()`` steps when the pool's row count ``rows`` is known (9 at 320
    rows), else 24 (any M < 2^24).
    """
    row = _row_index(F, d)                                          # (A,) 0..A-1
    col = _row_index(F, d, axis=1)                                  # (M,) 0..M-1
    width = F.max(col) + 1.0                                        # (1,) M
    ulp = 2.0 ** -48
    after = F.expand_dims(F.broadcast_add(col, F.max(d) + 1.0), axis=0)  # (1, M) > every d
    key = (d * neg + F.broadcast_mul(pos, after)
           + F.broadcast_mul(1.0 - pos - neg, F.broadcast_add(after, width)))
    tie = F.cast(col, dtype="float64") * ulp + 1.0                  # (M,)
    key = F.broadcast_mul(F.cast(key, dtype="float64"), F.expand_dims(tie, axis=0))  # (A, M)
    # k=0: a full sort of each row, values and their pool rows.
    skey, order = F.topk(key, axis=1, k=0, ret_typ="both", is_ascend=True, dtype="float32")
    base = F.broadcast_mul(F.expand_dims(row, axis=1), width)       # (A, 1): row starts
    last = width - 1.0

    def at(mat, cols):
        return F.take(_flat(F, mat), F.broadcast_add(base, cols))

    j = F.expand_dims(F.arange(0, m), axis=0)                       # (1, m)
    p = at(order, F.broadcast_minimum(F.broadcast_add(n_neg, j), last))  # (A, m)
    q = F.broadcast_mul(F.cast(at(d, p), dtype="float64"),
                        F.cast(width, dtype="float64") * ulp + 1.0)
    # c = #{negatives with key <= q}, by a branchless binary search over 2^bits > M rows.
    c = F.zeros_like(p)
    bits = int(rows).bit_length() if rows else 24
    for bit in range(bits - 1, -1, -1):
        step = float(2 ** bit)
        below = at(skey, F.broadcast_minimum(c + (step - 1.0), last)) <= q  # float64 0/1
        c = c + step * F.cast(below, dtype="float32")
    r = F.broadcast_like(F.expand_dims(row, axis=1), p)             # (A, m)
    return r, p, at, at(order, F.broadcast_minimum(c, last)), F.broadcast_lesser(c, n_neg)


def _distance_weighted(F, d, pos, neg, anchor_rows, m, u, dim_like):
    """Distance-weighted negatives (see :func:`distance_weighted`) on an (A, M) *squared*
    distance matrix of unit-length embeddings, one per pair of each anchor's first ``m``
    positives, drawn by inverse CDF from the uniforms ``u`` (A, m) in (0, 1): (A*m,) each.
    ``dim_like``: a (1, D) row, for D."""
    r, p, col, _, at = _first_positives(F, pos, m)                  # (A, m)
    dist = F.maximum(F.sqrt(d), DW_CUTOFF)                          # (A, M) Euclidean
    dim = F.sum(F.ones_like(dim_like))                              # (1,) D
    # log q(d)^-1 for points uniform on the unit sphere in R^D (Wu et al. eq. 3).
    log_w = (F.broadcast_mul(2.0 - dim, F.log(dist))
             - F.broadcast_mul((dim - 3.0) / 2.0,
                               F.log(F.maximum(1.0 - 0.25 * F.square(dist), 1e-8))))
    cand = neg * (dist < DW_NONZERO_LOSS_CUTOFF)
    top = F.max(F.where(cand > 0, log_w, F.ones_like(log_w) * -1e30), axis=1, keepdims=True)
    w = F.exp(F.minimum(F.broadcast_sub(log_w, top), 0.0)) * cand   # (A, M), max 1 per row
    # No candidate within the cutoff: uniform over the negatives (as MXNet's example).
    w = F.where(F.broadcast_like(F.sum(w, axis=1, keepdims=True) > 0, w), w, neg)
    upper = F.broadcast_lesser_equal(F.expand_dims(col, axis=1), F.expand_dims(col, axis=0))
    cdf = F.dot(w, upper)                                           # (A, M) running sums
    target = F.broadcast_mul(u, F.slice_axis(cdf, axis=1, begin=-1, end=None))  # (A, m)
    # The first column whose running sum reaches the target: a weighted draw.
    n = F.sum(F.broadcast_lesser(F.expand_dims(cdf, axis=1), F.expand_dims(target, axis=2)),
              axis=2)                                               # (A, m)
    return _pairs(F, r, p, n, at(pos, p), F.sum(neg, axis=1, keepdims=True), anchor_rows)


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
    (``augment.draw``), so a step is deterministic. The triplets' loss is
    ``gluon.loss.TripletLoss``'s (the paper pairs the sampler with its margin loss).

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
    return mine_pool(F, emb, labels, None, 0.0, "distance_weighted", positives, u=u)


def mine_pool(F, pool, labels, anchor_rows, margin, miner, positives=None, rows=None,
              u=None, memory=None):
    """Mine triplets for some anchors of a pool of embeddings against every pool row.

    The pool is what the anchors are mined against: one batch (local mining), the
    gathered global batch of every worker (global mining: each worker mines only its
    own rows as anchors), and, with ``memory``, the rows of a cross-batch memory after
    it. With ``anchor_rows=None`` every batch row is an anchor, and the result is exactly
    :func:`batch_hard` / :func:`semi_hard` of the pool; with a subset, it is exactly
    those functions' triplets of those anchors (the same distances, masks and tie rule:
    equal distances resolve to the lower pool row).

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        pool: (G, D) float32 embeddings (the batch); labels: (G,) class labels, float32.
        anchor_rows: (A,) float32 batch rows of the anchors, or None for all G rows.
        margin, miner, positives: as :func:`semi_hard` (``margin`` and ``positives`` are
            ignored by batch-hard; distance-weighted needs ``positives``).
        rows: None, or the pool's row count (G plus the memory's rows), when the caller
            knows it (a graph traced with symbols does not): fewer steps for the sorted
            semi-hard search (:func:`_semi_hard_by_sorting`).
        u: distance-weighted only: (A, positives) float32 uniforms in (0, 1).
        memory: None, or the cross-batch memory ``(emb (R, D), labels (R,), valid (R,))``
            float32, appended to the pool as constants: its rows are negatives where
            valid, never positives.

    Returns:
        ``(a, p, n, weight)`` pool rows (float32; memory row j is G + j) and 0/1 weights
        without gradient: (A,) each for batch-hard; (A*m,) for semi-hard and
        distance-weighted with ``positives=m``, (A*M,) without, ordered anchor-major as
        in :func:`semi_hard`.

    Raises:
        ValueError: on an unknown ``miner``, ``margin < 0`` or ``positives < 1``.
    """
    _check(margin, miner, positives)
    return _mine(F, pool, labels, anchor_rows, miner, positives, rows, u, memory)[2:]


def _check(margin, miner, positives) -> None:
    if miner not in MINERS:
        raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if positives is not None and int(positives) < 1:
        raise ValueError(f"positives must be >= 1, got {positives}")
    if miner == "distance_weighted" and positives is None:
        raise ValueError("distance_weighted mining needs positives per anchor (sampler.k)")


def _mine(F, pool, labels, anchor_rows, miner, positives, rows=None, u=None, memory=None):
    """:func:`mine_pool` (arguments checked there), also returning the (A, M)
    differentiable distance matrix and each triplet's anchor row in it:
    ``(dist, r, a, p, n, weight)``."""
    anchors_at = _row_index(F, pool) if anchor_rows is None else anchor_rows
    anchors = pool if anchor_rows is None else F.take(pool, anchor_rows)
    if memory is not None:
        mem_emb, mem_labels, valid = memory
        memory = (mem_labels, valid)
        pool = F.concat(pool, F.BlockGrad(mem_emb), dim=0)             # (M, D)
    pos, neg, own = _pool_masks(F, labels, anchors_at, pool, memory)
    dist = pool_sq_dist(F, anchors, pool, own)                      # (A, M)
    d = F.BlockGrad(dist)
    if miner == "batch_hard":
        found = _batch_hard(F, d, pos, neg, anchors_at)
    elif miner == "distance_weighted":
        found = _distance_weighted(F, d, pos, neg, anchors_at, int(positives), u,
                                   F.slice_axis(pool, axis=0, begin=0, end=1))
    elif positives is None:
        found = _semi_hard_all(F, d, pos, neg, anchors_at)
    else:
        found = _semi_hard_pairs(F, d, pos, neg, anchors_at, int(positives), rows)
    return (dist,) + tuple(found)


def mined_triplet_loss(F, emb, labels, margin, miner, positives=None, anchor_rows=None,
                       rows=None, u=None, memory=None):
    """Per-triplet triplet loss over the triplets one miner selects.

    The loss is ``gluon.loss.TripletLoss``'s, ``max(0, d(a, p) - d(a, n) + margin)``, with
    the squared distances read from the differentiable anchor-to-pool distance matrix the
    miner already computed (:func:`pool_sq_dist`) instead of from gathered rows: the
    gradient is then one small GEMM back through that matrix, not T x D gathers and
    scatters (T the triplets: 2,480 per worker in the global recipe, where the gathers
    cost more than the mining). The values agree with TripletLoss on the gathered rows to
    float32 rounding (the expansion ``|a|^2 + |p|^2 - 2 a.p``).

    Args:
        F: ``mx.nd`` or ``mx.sym``.
        emb: (G, D) float32 embeddings: the batch, or the pool of :func:`mine_pool`.
        labels: (G,) class labels, float32.
        margin: float >= 0, squared-L2 units (``gluon.loss.TripletLoss``).
        miner: one of :data:`MINERS`.
        positives: semi-hard and distance-weighted: positives per anchor (see
            :func:`semi_hard`; distance-weighted needs it).
        anchor_rows, rows, u, memory: see :func:`mine_pool`.

    Returns:
        ``(loss, weight)``: (T,) float32 each, T = A for batch-hard and A*M (or
        A*positives) otherwise, A the anchors; ``loss`` is differentiable with respect to
        every row of ``emb`` it uses (as anchor, positive or negative), not the memory's;
        ``weight`` is 0/1 without gradient.

    Raises:
        ValueError: on an unknown ``miner`` or ``margin < 0``.
    """
    _check(margin, miner, positives)
    dist, r, _, p, n, weight = _mine(F, emb, labels, anchor_rows, miner, positives, rows, u,
                                     memory)
    flat = _flat(F, dist)
    width = F.max(_row_index(F, dist, axis=1)) + 1.0                # (1,) M
    base = F.broadcast_mul(r, width)                                # (T,) row starts
    loss = F.relu(F.take(flat, base + p) - F.take(flat, base + n) + margin)
    return loss, weight


class MinedTripletLoss(gluon.HybridBlock):
    """Mean ``gluon.loss.TripletLoss`` over the triplets mined in a P x K batch.

    ``forward(emb, labels[, u])`` with emb (B, D) float32 and labels (B,) float32 (and,
    for distance-weighted, u (B, K - 1) float32 uniforms) returns a (1,) float32 scalar
    ``sum(loss * w) / max(sum(w), 1)``: the mean over valid triplets, and 0 (not NaN)
    when the batch has none. Hybridizable
    (``hybridize(static_alloc=True, static_shape=True)``).

    Args:
        margin: float >= 0, squared-L2 units as ``gluon.loss.TripletLoss``.
        miner: ``"batch_hard"`` (Hermans et al. 2017), ``"semi_hard"`` (FaceNet) or
            ``"distance_weighted"`` (Wu et al. 2017; needs ``k``).
        k: samples per class of the P x K batches, or None. With ``k``, semi-hard pairs
            each anchor with its K - 1 positives only (the same triplets as all pairs,
            O(B^2 K) instead of O(B^3); see :func:`semi_hard`), as does
            distance-weighted. Ignored by batch-hard.
        rows: None, or the rows of every batch (pool) it will see: a shorter semi-hard
            search (:func:`mine_pool`); a batch with more rows than this would be mined
            wrongly, so give it only when the batch size is fixed.

    Raises:
        ValueError: on an unknown ``miner``, ``margin < 0``, ``k < 2``, or
            distance-weighted without ``k``.
    """

    def __init__(self, margin: float, miner: str = "batch_hard", k=None, rows=None, **kwargs):
        super().__init__(**kwargs)
        if k is not None and int(k) < 2:
            raise ValueError(f"k must be >= 2 (a positive per anchor), got {k}")
        self._positives = int(k) - 1 if k is not None and miner != "batch_hard" else None
        _check(margin, miner, self._positives)
        self._margin = float(margin)
        self._miner = miner
        self._rows = rows

    @property
    def noise_columns(self) -> int:
        """Uniforms per anchor the miner needs (distance-weighted: K - 1), else 0."""
        return self._positives if self._miner == "distance_weighted" else 0

    def sums(self, F, emb, labels, anchor_rows=None, u=None, memory=None):
        """``(sum(loss * w), sum(w))``, (1,) float32 each, of the mined triplets."""
        loss, weight = mined_triplet_loss(F, emb, labels, self._margin, self._miner,
                                          positives=self._positives, anchor_rows=anchor_rows,
                                          rows=self._rows, u=u, memory=memory)
        return F.sum(loss * weight), F.sum(weight)

    def mean_loss(self, F, emb, labels, u=None, memory=None):
        """The (1,) mean over the mined triplets (0 without any)."""
        total, count = self.sums(F, emb, labels, u=u, memory=memory)
        return total / F.maximum(count, 1.0)

    def hybrid_forward(self, F, emb, labels, u=None):
        return self.mean_loss(F, emb, labels, u)


class PoolTripletLoss(MinedTripletLoss):
    """The mined loss of some anchors of a pool, as sums: the part of a pool's mean
    loss that one worker computes.

    ``forward(pool, labels, anchor_rows[, mem_emb, mem_labels, mem_valid][, u])`` with
    pool (G, D) float32, labels (G,) float32 and anchor_rows (A,) float32 (see
    :func:`mine_pool`), with ``memory`` the cross-batch memory's (R, D), (R,), (R,)
    float32 constants, and for distance-weighted the anchors' (A, K - 1) uniforms,
    returns ``(total, count)``, (1,) float32 each: the summed loss of the triplets mined
    for those anchors against the whole pool, and how many there are. ``total`` is
    differentiable with respect to every batch row (anchor, positive and negative roles).
    Anchor sets that partition the batch add up to the whole batch's ``(total, count)``,
    whose ratio is :class:`MinedTripletLoss` of the pool, the mined triplets being the
    same (:func:`mine_pool`); so do the gradients of ``total``. This is how global mining
    costs each worker 1/W of the mining (``model.GlobalMinedTripletStep``), and how a
    cross-batch memory mines against [global batch; past batches].

    Args: as :class:`MinedTripletLoss` (``rows`` counts the memory's rows too); ``k``
        counts the samples per class in the batch; ``memory``: the forward takes the
        memory's three arrays.
    """

    def __init__(self, margin: float, miner: str = "batch_hard", k=None, rows=None,
                 memory: bool = False, **kwargs):
        super().__init__(margin, miner, k, rows, **kwargs)
        self._memory = bool(memory)

    def hybrid_forward(self, F, pool, labels, anchor_rows, *extra):
        memory = tuple(extra[:3]) if self._memory else None
        u = extra[-1] if self.noise_columns else None
        return self.sums(F, pool, labels, anchor_rows, u, memory)
