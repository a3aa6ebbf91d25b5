"""Tests of dist_triplet.mining against plain-loop NumPy references (P=3, K=4 batch)."""
import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="mining runs on MXNet")

from dist_triplet.mining import (  # noqa: E402  (after the importorskip)
    MinedTripletLoss,
    batch_hard,
    mined_triplet_loss,
    pairwise_sq_dist,
    semi_hard,
)

P, K, MARGIN = 3, 4, 0.5


def make_batch(seed=7):
    """12 random 2-D points, class-major P x K labels, with no near-tied distances."""
    rng = np.random.RandomState(seed)
    emb = rng.randn(P * K, 2).astype(np.float32)
    labels = np.repeat(np.arange(P), K).astype(np.float32)
    d = ref_sq_dist(emb)
    gaps = np.diff(np.sort(d[np.triu_indices(P * K, 1)]))
    # Precondition: float32 mining and the float64 loop must not disagree on an order.
    assert gaps.min() > 1e-4
    return emb, labels


def ref_sq_dist(emb):
    e = emb.astype(np.float64)
    return np.array([[float(np.sum((a - b) ** 2)) for b in e] for a in e])


def ref_batch_hard(emb, labels):
    d = ref_sq_dist(emb)
    trip = []
    for a in range(len(emb)):
        pos = [j for j in range(len(emb)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(emb)) if labels[j] != labels[a]]
        trip.append((a, max(pos, key=lambda j: d[a, j]), min(neg, key=lambda j: d[a, j])))
    return trip


def ref_semi_hard(emb, labels):
    """(a, p, n, used_fallback) for every ordered positive pair, TF-Addons rule."""
    d = ref_sq_dist(emb)
    trip = []
    for a in range(len(emb)):
        neg = [j for j in range(len(emb)) if labels[j] != labels[a]]
        for p in range(len(emb)):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [j for j in neg if d[a, j] > d[a, p]]
            if farther:
                trip.append((a, p, min(farther, key=lambda j: d[a, j]), False))
            else:
                trip.append((a, p, max(neg, key=lambda j: d[a, j]), True))
    return trip


def ref_loss(emb, trip, margin):
    d = ref_sq_dist(emb)
    return float(np.mean([max(0.0, d[a, p] - d[a, n] + margin) for a, p, n, *_ in trip]))


def ref_grad(emb, trip, margin):
    """d(mean loss)/d(emb) with the triplets held fixed, by hand."""
    e = emb.astype(np.float64)
    g = np.zeros_like(e)
    for a, p, n, *_ in trip:
        if np.sum((e[a] - e[p]) ** 2) - np.sum((e[a] - e[n]) ** 2) + margin > 0:
            g[a] += 2 * (e[n] - e[p])
            g[p] += -2 * (e[a] - e[p])
            g[n] += 2 * (e[a] - e[n])
    return g / len(trip)


def test_pairwise_sq_dist_matches_loop():
    emb, _ = make_batch()
    d = pairwise_sq_dist(mx.nd, mx.nd.array(emb)).asnumpy()
    np.testing.assert_allclose(d, ref_sq_dist(emb), rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(d) == 0.0) and np.all(d >= 0.0)


def test_batch_hard_indices_match_loop():
    emb, labels = make_batch()
    a, p, n, w = (x.asnumpy() for x in batch_hard(mx.nd, mx.nd.array(emb), mx.nd.array(labels)))
    want = np.array(ref_batch_hard(emb, labels))
    np.testing.assert_array_equal(a, want[:, 0])
    np.testing.assert_array_equal(p, want[:, 1])
    np.testing.assert_array_equal(n, want[:, 2])
    np.testing.assert_array_equal(w, np.ones(P * K))


def test_semi_hard_indices_match_loop_and_use_both_branches():
    emb, labels = make_batch()
    a, p, n, w = (x.asnumpy() for x in
                  semi_hard(mx.nd, mx.nd.array(emb), mx.nd.array(labels), MARGIN))
    assert a.shape == p.shape == n.shape == w.shape == ((P * K) ** 2,)
    want = ref_semi_hard(emb, labels)
    rows = [ai * P * K + pi for ai, pi, _, _ in want]
    np.testing.assert_array_equal(np.flatnonzero(w), sorted(rows))  # weight 1 iff positive pair
    np.testing.assert_array_equal(a[rows], [t[0] for t in want])
    np.testing.assert_array_equal(p[rows], [t[1] for t in want])
    np.testing.assert_array_equal(n[rows], [t[2] for t in want])
    # The data exercise both the semi-hard choice and the farthest-negative fallback.
    fallbacks = sum(t[3] for t in want)
    assert 0 < fallbacks < len(want)


@pytest.mark.parametrize("miner, ref", [("batch_hard", ref_batch_hard),
                                        ("semi_hard", ref_semi_hard)])
def test_mined_loss_value_and_gradient_match_loop(miner, ref):
    emb, labels = make_batch()
    trip = ref(emb, labels)
    x = mx.nd.array(emb)
    x.attach_grad()
    with mx.autograd.record():
        loss = MinedTripletLoss(MARGIN, miner)(x, mx.nd.array(labels))
    loss.backward()
    assert loss.shape == (1,)
    assert loss.asscalar() == pytest.approx(ref_loss(emb, trip, MARGIN), abs=1e-6)
    assert loss.asscalar() > 0
    grad = x.grad.asnumpy()
    assert np.abs(grad).sum() > 0
    # Gradients flow only through the gathered rows (mining is BlockGrad'ed).
    np.testing.assert_allclose(grad, ref_grad(emb, trip, MARGIN), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("miner", ["batch_hard", "semi_hard"])
def test_hybridized_block_matches_eager_and_backprops(miner):
    emb, labels = make_batch()
    eager = MinedTripletLoss(MARGIN, miner)
    hybrid = MinedTripletLoss(MARGIN, miner)
    hybrid.hybridize(static_alloc=True, static_shape=True)
    want = eager(mx.nd.array(emb), mx.nd.array(labels)).asscalar()
    for _ in range(2):  # the second call runs the cached static graph
        x = mx.nd.array(emb)
        x.attach_grad()
        with mx.autograd.record():
            loss = hybrid(x, mx.nd.array(labels))
        loss.backward()
        assert loss.asscalar() == pytest.approx(want, abs=1e-6)
        assert np.isfinite(x.grad.asnumpy()).all() and np.abs(x.grad.asnumpy()).sum() > 0


def test_mined_triplet_loss_returns_per_triplet_vectors():
    emb, labels = make_batch()
    loss, w = mined_triplet_loss(mx.nd, mx.nd.array(emb), mx.nd.array(labels), MARGIN,
                                 "batch_hard")
    trip = ref_batch_hard(emb, labels)
    d = ref_sq_dist(emb)
    want = [max(0.0, d[a, p] - d[a, n] + MARGIN) for a, p, n in trip]
    np.testing.assert_allclose(loss.asnumpy(), want, atol=1e-5)
    np.testing.assert_array_equal(w.asnumpy(), np.ones(P * K))


def test_semi_hard_over_k_minus_1_positives_equals_all_pairs():
    # A P x K batch gives each anchor exactly K - 1 positives: mining only those pairs
    # (O(B^2 K)) must pick the very triplets of the all-pairs O(B^3) version.
    emb, labels = make_batch()
    a, p, n, w = (x.asnumpy() for x in semi_hard(mx.nd, mx.nd.array(emb), mx.nd.array(labels),
                                                 MARGIN, positives=K - 1))
    assert a.shape == p.shape == n.shape == w.shape == (P * K * (K - 1),)
    got = sorted((int(ai), int(pi), int(ni)) for ai, pi, ni, wi in zip(a, p, n, w) if wi)
    want = ref_semi_hard(emb, labels)
    assert got == sorted((t[0], t[1], t[2]) for t in want)
    # Row a * (K - 1) + j holds anchor a's j-th positive, in batch order.
    np.testing.assert_array_equal(a.reshape(P * K, K - 1), np.repeat(np.arange(P * K), K - 1)
                                  .reshape(P * K, K - 1))
    assert np.all(np.diff(p.reshape(P * K, K - 1), axis=1) > 0)


@pytest.mark.parametrize("hybridize", [False, True])
def test_semi_hard_with_k_matches_loop_loss_and_gradient(hybridize):
    emb, labels = make_batch()
    trip = ref_semi_hard(emb, labels)
    block = MinedTripletLoss(MARGIN, "semi_hard", k=K)
    if hybridize:
        block.hybridize(static_alloc=True, static_shape=True)
    for _ in range(2):
        x = mx.nd.array(emb)
        x.attach_grad()
        with mx.autograd.record():
            loss = block(x, mx.nd.array(labels))
        loss.backward()
        assert loss.asscalar() == pytest.approx(ref_loss(emb, trip, MARGIN), abs=1e-6)
        np.testing.assert_allclose(x.grad.asnumpy(), ref_grad(emb, trip, MARGIN),
                                   rtol=1e-4, atol=1e-5)


def test_semi_hard_with_fewer_positives_than_asked_pads_with_zero_weight():
    # Class 1 has 2 members (1 positive each) but positives=3: the missing pairs weigh 0.
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]], np.float32)
    labels = mx.nd.array([0, 0, 0, 1, 1])
    a, p, n, w = (x.asnumpy() for x in semi_hard(mx.nd, mx.nd.array(emb), labels, MARGIN,
                                                 positives=3))
    assert w.sum() == 3 * 2 + 2 * 1
    assert np.all(labels.asnumpy()[p[w > 0].astype(int)] == labels.asnumpy()[a[w > 0].astype(int)])
    assert np.all(p[w > 0] != a[w > 0])


def test_anchors_without_positive_or_negative_get_zero_weight():
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    # Sample 2 is alone in its class: no positive, so no batch-hard triplet.
    *_, w = batch_hard(mx.nd, mx.nd.array(emb), mx.nd.array([0, 0, 1]))
    np.testing.assert_array_equal(w.asnumpy(), [1, 1, 0])
    # One class only: no negatives anywhere, so no triplets and a loss of 0, not NaN.
    same = mx.nd.array([4, 4, 4])
    *_, w = batch_hard(mx.nd, mx.nd.array(emb), same)
    np.testing.assert_array_equal(w.asnumpy(), [0, 0, 0])
    *_, w = semi_hard(mx.nd, mx.nd.array(emb), same, MARGIN)
    assert w.asnumpy().sum() == 0
    for miner in ("batch_hard", "semi_hard"):
        assert MinedTripletLoss(MARGIN, miner)(mx.nd.array(emb), same).asscalar() == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="miner"):
        MinedTripletLoss(MARGIN, "hardest")
    with pytest.raises(ValueError, match="margin"):
        MinedTripletLoss(-0.1, "batch_hard")
    with pytest.raises(ValueError, match="miner"):
        mined_triplet_loss(mx.nd, mx.nd.ones((2, 2)), mx.nd.array([0, 1]), MARGIN, "x")
    with pytest.raises(ValueError, match="k must be"):
        MinedTripletLoss(MARGIN, "semi_hard", k=1)
    with pytest.raises(ValueError, match="positives"):
        semi_hard(mx.nd, mx.nd.ones((2, 2)), mx.nd.array([0, 1]), MARGIN, positives=0)
