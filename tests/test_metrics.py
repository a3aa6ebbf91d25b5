"""Tests of the retrieval metrics (dist_triplet.retrieval.metrics) and the evaluation numbers
(dist_triplet.metrics) against plain-loop references and hand-computed values."""
import math

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the neighbour engine uses faiss")

from dist_triplet.metrics import (  # noqa: E402
    embedding_spread,
    evaluate_embeddings,
    is_collapsed,
    triplet_accuracy,
)
from dist_triplet.retrieval.metrics import (  # noqa: E402
    map_at_r,
    precision_at_1,
    r_precision,
    retrieval_metrics,
)


def reference_query(rel):
    """(Precision@1, R-Precision, AP@R) of one query by a plain loop, from the relevance
    (1/0) of its R nearest items, R = len(rel) (Musgrave et al. 2020)."""
    r = len(rel)
    hits, ap = 0, 0.0
    for k, is_rel in enumerate(rel, start=1):
        hits += is_rel
        ap += (hits / k) * is_rel
    return rel[0], sum(rel) / r, ap / r


def reference_retrieval(emb, labels, key=float):
    """Musgrave et al. 2020 metrics by a plain loop: sorted() over (key(distance), index).

    ``key=np.float32``: the documented ranking key, the distance rounded to float32."""
    emb = np.asarray(emb, dtype=np.float64)
    p1, rp, mapr, excluded = [], [], [], 0
    for i in range(len(emb)):
        r = sum(1 for j in range(len(emb)) if j != i and labels[j] == labels[i])
        if r == 0:
            excluded += 1
            continue
        ranked = sorted((key(np.sum((emb[i] - emb[j]) ** 2)), j)
                        for j in range(len(emb)) if j != i)
        rel = [1 if labels[j] == labels[i] else 0 for _, j in ranked[:r]]
        for out, value in zip((p1, rp, mapr), reference_query(rel)):
            out.append(value)
    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return {"precision_at_1": mean(p1), "r_precision": mean(rp), "map_at_r": mean(mapr),
            "queries": len(p1), "excluded_queries": excluded}


def assert_metrics_equal(got, want):
    assert got["queries"] == want["queries"]
    assert got["excluded_queries"] == want["excluded_queries"]
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_loop_reference_on_random_data(seed):
    rng = np.random.RandomState(seed)
    emb = rng.randn(40, 5).astype(np.float32)
    labels = rng.randint(0, 4, size=40)
    got = retrieval_metrics(emb, labels)
    want = reference_retrieval(emb, labels)
    assert_metrics_equal(got, want)
    # Random data is neither perfect nor hopeless: guards against a trivially-constant result.
    assert 0.0 < got["map_at_r"] < 1.0


def test_retrieval_matches_loop_reference_with_many_ties():
    # Integer points on a 3x3 grid: many exactly equal distances, including at the R-th
    # rank, where argpartition alone would pick an arbitrary member of the tie.
    rng = np.random.RandomState(3)
    emb = rng.randint(0, 3, size=(30, 2)).astype(np.float32)
    labels = rng.randint(0, 4, size=30)
    assert_metrics_equal(retrieval_metrics(emb, labels), reference_retrieval(emb, labels))


def test_perfect_embedding_scores_one():
    # Three tight, far-apart clusters.
    labels = np.repeat(np.arange(3), 4)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    emb = (centres[labels] + 0.01 * np.arange(12)[:, None]).astype(np.float32)
    got = retrieval_metrics(emb, labels)
    assert got == {"precision_at_1": 1.0, "r_precision": 1.0, "map_at_r": 1.0,
                   "queries": 12, "excluded_queries": 0}


def test_collapsed_embedding_uses_lower_index_tie_rule():
    # All points equal, so every distance is 0 and each query's neighbours come in index
    # order. labels = [0, 1, 1, 0, 0, 1], R = 2 for each query; top-2 neighbours:
    #   q0 -> 1,2 (c1,c1): P@1 0, RP 0,   MAP 0
    #   q1 -> 0,2 (c0,c1): P@1 0, RP 1/2, MAP (1/2)(1/2) = 1/4
    #   q2 -> 0,1 (c0,c1): P@1 0, RP 1/2, MAP 1/4
    #   q3 -> 0,1 (c0,c1): P@1 1, RP 1/2, MAP (1/2)(1)   = 1/2
    #   q4 -> 0,1 (c0,c1): P@1 1, RP 1/2, MAP 1/2
    #   q5 -> 0,1 (c0,c1): P@1 0, RP 1/2, MAP 1/4
    labels = np.array([0, 1, 1, 0, 0, 1])
    # 0.3 is not a binary fraction: the expansion leaves rounding noise that must be
    # snapped to exactly 0 for the tie rule to apply.
    emb = np.full((6, 3), 0.3, dtype=np.float32)
    got = retrieval_metrics(emb, labels)
    assert got["precision_at_1"] == pytest.approx(2 / 6, abs=1e-12)
    assert got["r_precision"] == pytest.approx(2.5 / 6, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(1.75 / 6, abs=1e-12)
    assert is_collapsed(emb)
    assert embedding_spread(emb) == pytest.approx(0.0, abs=1e-12)


def test_nearly_collapsed_embedding_ties_like_collapsed():
    # A collapsed network's outputs need not be bit-identical: rows a few float32 ulps
    # apart are below the expansion's rounding error, tie as 0, and score as above.
    labels = np.array([0, 1, 1, 0, 0, 1])
    emb = np.full((6, 3), 0.3, dtype=np.float32)
    for i, steps in enumerate([3, 0, 5, 1, 4, 2]):  # not in index order
        for _ in range(steps):
            emb[i] = np.nextafter(emb[i], np.float32(1.0))
    assert len({row.tobytes() for row in emb}) == 6
    got = retrieval_metrics(emb, labels)
    assert got["precision_at_1"] == pytest.approx(2 / 6, abs=1e-12)
    assert got["r_precision"] == pytest.approx(2.5 / 6, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(1.75 / 6, abs=1e-12)
    assert is_collapsed(emb)


def test_tie_goes_to_lower_index():
    # 1-D points; query 0 has neighbours 1 (class 1) and 2 (class 0) tied at distance 1.
    #   q0 (R=2) -> 1,2: P@1 0, RP 1/2, MAP 1/4   (the other tie order would give P@1 1)
    #   q1 (R=1) -> 0:   0, 0, 0
    #   q2 (R=2) -> 0,1: P@1 1, RP 1/2, MAP 1/2
    #   q3 (R=1) -> 4:   0, 0, 0
    #   q4 (R=2) -> 3,1: 0, 0, 0
    emb = np.array([[0.0], [1.0], [-1.0], [10.0], [11.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0])
    got = retrieval_metrics(emb, labels)
    assert got["precision_at_1"] == pytest.approx(1 / 5, abs=1e-12)
    assert got["r_precision"] == pytest.approx(1 / 5, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(0.75 / 5, abs=1e-12)


def test_singleton_class_is_excluded_and_counted():
    # Index 4 is the only sample of class 2: it is no query, but still a neighbour.
    # q0 and q1 find index 4 first (wrong), q2 and q3 find each other (right).
    emb = np.array([[0.0], [0.1], [5.0], [5.1], [0.05]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    got = retrieval_metrics(emb, labels)
    assert got == {"precision_at_1": 0.5, "r_precision": 0.5, "map_at_r": 0.5,
                   "queries": 4, "excluded_queries": 1}


def test_all_singletons_give_nan_and_no_queries():
    got = retrieval_metrics(np.eye(3, dtype=np.float32), np.array([0, 1, 2]))
    assert got["queries"] == 0 and got["excluded_queries"] == 3
    assert all(math.isnan(got[k]) for k in ("precision_at_1", "r_precision", "map_at_r"))


def test_retrieval_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(np.zeros((4, 2), np.float32), np.zeros(3, int))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(4, np.float32), np.zeros(4, int))


def test_matches_loop_reference_with_ties():
    # Integer points: exact ties everywhere, also at the R-th rank and across labels.
    rng = np.random.RandomState(5)
    emb = rng.randint(0, 3, size=(60, 2)).astype(np.float32)
    labels = rng.randint(0, 3, size=60)
    assert_metrics_equal(retrieval_metrics(emb, labels), reference_retrieval(emb, labels))


def test_pairs_float32_cannot_order_are_ordered_exactly():
    # Norms ~1e4 and neighbours 0.01 apart (squared distances from 1e-4): float32
    # distances are off by ~1e-3, more than the gaps, so the order comes from the exact
    # float64 re-ranking alone. (Keys stay above the 0-snap, 1e-10 * 2e4.)
    rng = np.random.RandomState(6)
    emb = np.zeros((40, 2), dtype=np.float32)
    emb[:, 0] = 100.0
    emb[:, 1] = rng.permutation(40).astype(np.float32) * np.float32(0.01)
    labels = rng.randint(0, 2, size=40)
    got = retrieval_metrics(emb, labels)
    assert_metrics_equal(got, reference_retrieval(emb, labels))
    assert 0.0 < got["map_at_r"] < 1.0


def test_8bit_images_with_duplicates_match_the_loop():
    # bytes / 255 (as data.load_split) and raw uint8 (taken as float32 0..255).
    rng = np.random.RandomState(7)
    v = (rng.randint(0, 256, size=(100, 64)) * (rng.rand(100, 64) < 0.4)).astype(np.uint8)
    v[rng.randint(0, 100, 20)] = v[rng.randint(0, 100, 20)]  # exact duplicates tie
    labels = rng.randint(0, 4, size=100)
    for emb in (v.astype(np.float32) / np.float32(255), v):
        assert_metrics_equal(retrieval_metrics(emb, labels), reference_retrieval(emb, labels))


def test_non_finite_embeddings_are_refused_by_the_metrics_and_flagged_by_evaluation():
    rng = np.random.RandomState(9)
    emb = rng.randn(30, 3).astype(np.float32)
    emb[4, 1] = np.nan
    labels = rng.randint(0, 3, size=30)
    with pytest.raises(ValueError, match="1 non-finite"):
        retrieval_metrics(emb, labels)
    got = evaluate_embeddings(emb, labels, np.array([[0, 1, 2]]))
    assert got["collapsed"] is True and got["valid"] is False and got["queries"] == 0


def test_triplet_accuracy_seed_counts_exact_tie_strict_does_not():
    # 1-D: triplet 0: d_ap 1 < d_an 4 (both right); triplet 1: d_ap 1 == d_an 1 (seed
    # right, strict wrong); triplet 2: d_ap 4 > d_an 1 (both wrong).
    a = np.array([[0.0], [0.0], [0.0]], dtype=np.float32)
    p = np.array([[1.0], [1.0], [2.0]], dtype=np.float32)
    n = np.array([[2.0], [-1.0], [1.0]], dtype=np.float32)
    got = triplet_accuracy(a, p, n)
    assert got == {"seed_accuracy": 2 / 3, "strict_accuracy": 1 / 3,
                   "correct": 2, "strict_correct": 1, "total": 3}


def test_seed_accuracy_agrees_with_margin_zero_gluon_triplet_loss():
    mx = pytest.importorskip("mxnet", reason="Gluon TripletLoss needs mxnet")
    a = np.array([[0.0], [0.0], [0.0]], dtype=np.float32)
    p = np.array([[1.0], [1.0], [2.0]], dtype=np.float32)
    n = np.array([[2.0], [-1.0], [1.0]], dtype=np.float32)
    loss = mx.gluon.loss.TripletLoss(margin=0)(mx.nd.array(a), mx.nd.array(p),
                                              mx.nd.array(n)).asnumpy()
    np.testing.assert_allclose(loss, [0.0, 0.0, 3.0])
    assert triplet_accuracy(a, p, n)["correct"] == int((loss == 0).sum())


def test_gluon_triplet_loss_uses_squared_distances():
    mx = pytest.importorskip("mxnet", reason="Gluon TripletLoss needs mxnet")
    # max(0, 1^2 - 1.2^2 + 0.5) = 1 - 1.44 + 0.5 = 0.06 (would be 0.3 with plain L2).
    loss = mx.gluon.loss.TripletLoss(margin=0.5)(
        mx.nd.array([[0.0]]), mx.nd.array([[1.0]]), mx.nd.array([[1.2]]))
    assert loss.asnumpy()[0] == pytest.approx(0.06, abs=1e-6)


def test_triplet_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        triplet_accuracy(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((3, 2)))


def test_embedding_spread_by_hand():
    assert embedding_spread(np.array([[0.0, 0.0], [2.0, 0.0]])) == pytest.approx(1.0)
    # mean 1; squared deviations 1, 1, 1, 9 -> mean 3.
    assert embedding_spread(np.array([[0.0], [0.0], [0.0], [4.0]])) == pytest.approx(math.sqrt(3))


def test_is_collapsed_threshold_and_non_finite():
    emb = np.array([[0.0], [2e-6]])  # spread 1e-6
    assert is_collapsed(emb, eps=1.1e-6)
    assert not is_collapsed(emb, eps=0.9e-6)
    assert is_collapsed(np.array([[0.0], [np.nan]]))
    assert is_collapsed(np.array([[0.0], [np.inf]]))
    assert not is_collapsed(np.array([[0.0], [1.0]]))


def test_evaluate_embeddings_flags_collapse_but_still_reports():
    labels = np.array([0, 1, 1, 0, 0, 1])
    emb = np.full((6, 3), 0.3, dtype=np.float32)
    triplets = np.array([[0, 3, 1], [1, 2, 0]])
    got = evaluate_embeddings(emb, labels, triplets, collapse_eps=1e-6)
    assert got["collapsed"] is True and got["valid"] is False
    assert got["spread"] == pytest.approx(0.0, abs=1e-12)
    # The seed metric's 100% on a useless model, which is why `collapsed` exists.
    assert got["seed_accuracy"] == 1.0 and got["strict_accuracy"] == 0.0
    assert got["precision_at_1"] == pytest.approx(2 / 6, abs=1e-12)
    assert got["total"] == 2 and got["queries"] == 6


def test_evaluate_embeddings_on_good_embedding():
    labels = np.repeat(np.arange(3), 4)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    emb = (centres[labels] + 0.01 * np.arange(12)[:, None]).astype(np.float32)
    triplets = np.array([[0, 1, 4], [5, 6, 8], [9, 10, 0]])
    got = evaluate_embeddings(emb, labels, triplets, collapse_eps=1e-6)
    assert got["collapsed"] is False and got["valid"] is True
    assert got["spread"] > 1.0
    assert got["map_at_r"] == 1.0 and got["seed_accuracy"] == 1.0 and got["strict_accuracy"] == 1.0


def test_evaluate_embeddings_rejects_bad_triplets():
    emb = np.zeros((4, 2), np.float32)
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="triplet indices"):
        evaluate_embeddings(emb, labels, np.array([[0, 1, 4]]), collapse_eps=1e-6)
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        evaluate_embeddings(emb, labels, np.array([0, 1, 2]), collapse_eps=1e-6)


def test_partial_collapse_flagged_by_tied_triplets():
    # Most rows on one point (dead ReLUs), a few spread out: the spread is far above eps,
    # but 3 of 4 triplets tie exactly, so the seed accuracy (ties count) is 1.0 while the
    # strict one is 0.25. Such an embedding must be flagged, not reported as a success.
    emb = np.zeros((8, 2), np.float32)
    emb[6] = [5.0, 0.0]
    emb[7] = [5.0, 1.0]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    triplets = np.array([[0, 1, 4], [1, 2, 5], [2, 3, 4], [6, 7, 0]])
    got = evaluate_embeddings(emb, labels, triplets, collapse_eps=1e-6)
    assert got["spread"] > 1.0
    assert got["seed_accuracy"] == 1.0 and got["strict_accuracy"] == 0.25
    assert got["tie_share"] == 0.75
    assert got["collapsed"] is True and got["valid"] is False


def test_few_ties_do_not_flag_collapse():
    emb = np.array([[0, 0], [0, 1], [3, 0], [3, 1]], np.float32)
    labels = np.array([0, 0, 1, 1])
    triplets = np.array([[0, 1, 2], [2, 3, 0], [1, 0, 3]])
    got = evaluate_embeddings(emb, labels, triplets, collapse_eps=1e-6)
    assert got["tie_share"] == 0.0
    assert got["collapsed"] is False and got["valid"] is True


# ----------------------------------------------------------------------------- definitions

def test_definitions_on_hand_made_relevance():
    # One query, R = 4, ranked relevance 1 0 1 1 (then padding):
    #   P@1 1; R-Precision 3/4; MAP@R (1/4)(1/1 + 2/3 + 3/4) = 29/48.
    # A second, R = 2, relevance 0 1 | 1: P@1 0; RP 1/2; MAP@R (1/2)(1/2) = 1/4 (the third
    # rank is past its R and does not count).
    rel = np.array([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], bool)
    r = np.array([4, 2])
    assert precision_at_1(rel).tolist() == [1.0, 0.0]
    assert r_precision(rel, r).tolist() == [0.75, 0.5]
    np.testing.assert_allclose(map_at_r(rel, r), [29 / 48, 1 / 4], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- gallery

def reference_with_gallery(q, ql, g, gl):
    """The same definitions by a loop, queries against a separate gallery (no exclusion)."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    p1, rp, mapr, excluded = [], [], [], 0
    for i in range(len(q)):
        r = int(np.sum(gl == ql[i]))
        if r == 0:
            excluded += 1
            continue
        ranked = sorted((float(np.sum((q[i] - g[j]) ** 2)), j) for j in range(len(g)))
        rel = [1 if gl[j] == ql[i] else 0 for _, j in ranked[:r]]
        for out, value in zip((p1, rp, mapr), reference_query(rel)):
            out.append(value)
    return {"precision_at_1": float(np.mean(p1)), "r_precision": float(np.mean(rp)),
            "map_at_r": float(np.mean(mapr)), "queries": len(p1), "excluded_queries": excluded}


def test_separate_gallery_matches_loop_reference():
    rng = np.random.RandomState(10)
    gallery = rng.randint(0, 4, size=(70, 2)).astype(np.float32)   # ties across labels
    g_labels = rng.randint(0, 3, size=70)
    query = rng.randint(0, 4, size=(25, 2)).astype(np.float32)
    q_labels = rng.randint(0, 4, size=25)      # class 3 is not in the gallery: excluded
    got = retrieval_metrics(query, q_labels, gallery, g_labels)
    want = reference_with_gallery(query, q_labels, gallery, g_labels)
    assert want["excluded_queries"] == int((q_labels == 3).sum()) > 0
    assert_metrics_equal(got, want)
    only_p1 = retrieval_metrics(query, q_labels, gallery, g_labels, metrics=("precision_at_1",))
    assert only_p1 == {"precision_at_1": want["precision_at_1"], "queries": want["queries"],
                       "excluded_queries": want["excluded_queries"]}


def test_gallery_precision_at_1_is_nearest_neighbour_accuracy():
    # Gallery: class 0 at x = 0, 1; class 1 at x = 10. Queries at 0.4 (class 0: right),
    # 9 (class 0: nearest is 10, wrong), 6 (class 1: right). 1-NN accuracy 2/3.
    gallery = np.array([[0.0], [1.0], [10.0]], np.float32)
    query = np.array([[0.4], [9.0], [6.0]], np.float32)
    got = retrieval_metrics(query, [0, 0, 1], gallery, [0, 0, 1])
    assert got["precision_at_1"] == pytest.approx(2 / 3, abs=1e-15)
    # R-Precision: R = 2 for class 0 ({0, 1} vs {0, 1} and {10, 1}), 1 for class 1.
    assert got["r_precision"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-15)


def test_gallery_arguments_checked():
    q = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="both gallery_emb and gallery_labels"):
        retrieval_metrics(q, [0, 1, 0], q)
    with pytest.raises(ValueError, match="columns"):
        retrieval_metrics(q, [0, 1, 0], np.zeros((3, 5), np.float32), [0, 1, 0])
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(q, [0, 1, 0], q, [0, 1])
    with pytest.raises(ValueError, match="metrics"):
        retrieval_metrics(q, [0, 1, 0], metrics=("recall_at_5",))
    with pytest.raises(ValueError, match="max_queries"):
        retrieval_metrics(q, [0, 1, 0], max_queries=-1)


# ----------------------------------------------------------------------------- P@1 alone

@pytest.mark.parametrize("seed", [0, 1])
def test_precision_at_1_alone_equals_the_full_search(seed):
    rng = np.random.RandomState(20 + seed)
    cases = [rng.randn(200, 6).astype(np.float32),
             rng.randint(0, 3, size=(150, 2)).astype(np.float32),           # ties
             (rng.randint(0, 256, size=(120, 30)) * (rng.rand(120, 30) < 0.3))
             .astype(np.uint8),                                              # bytes
             np.full((40, 3), 0.3, np.float32)]                              # collapsed
    for emb in cases:
        labels = rng.randint(0, 4, size=len(emb))
        full = retrieval_metrics(emb, labels)
        alone = retrieval_metrics(emb, labels, metrics=("precision_at_1",))
        assert alone["precision_at_1"] == full["precision_at_1"], emb.dtype
        assert alone["queries"] == full["queries"]


# ----------------------------------------------------------------------------- query sample

def test_max_queries_is_a_seeded_sample_against_the_full_gallery():
    rng = np.random.RandomState(11)
    emb = rng.randn(60, 3).astype(np.float32)
    labels = rng.randint(0, 4, size=60)
    labels[7] = 9                                   # a singleton: never sampled
    full = retrieval_metrics(emb, labels)
    assert retrieval_metrics(emb, labels, max_queries=100) == full   # more than there are
    got = retrieval_metrics(emb, labels, max_queries=15, seed=3)
    assert got == retrieval_metrics(emb, labels, max_queries=15, seed=3)   # deterministic
    assert got["queries"] == 15 and got["excluded_queries"] == 1
    # The documented draw: RandomState(seed).choice of the queries with R >= 1.
    eligible = np.flatnonzero(np.arange(60) != 7)
    chosen = np.sort(np.random.RandomState(3).choice(eligible, 15, replace=False))
    # Each chosen query scored against all 59 others, by the loop.
    p1, rp, mapr = [], [], []
    for i in chosen:
        r = int(np.sum(labels == labels[i])) - 1
        ranked = sorted((float(np.sum((emb[i].astype(np.float64) - emb[j]) ** 2)), j)
                        for j in range(60) if j != i)
        rel = [labels[j] == labels[i] for _, j in ranked[:r]]
        p1.append(float(rel[0]))
        rp.append(sum(rel) / r)
        hits, ap = 0, 0.0
        for k, is_rel in enumerate(rel, start=1):
            hits += is_rel
            ap += hits / k * is_rel
        mapr.append(ap / r)
    assert got["precision_at_1"] == pytest.approx(np.mean(p1), abs=1e-12)
    assert got["r_precision"] == pytest.approx(np.mean(rp), abs=1e-12)
    assert got["map_at_r"] == pytest.approx(np.mean(mapr), abs=1e-12)
    assert retrieval_metrics(emb, labels, max_queries=15, seed=4) != got   # another sample


# ----------------------------------------------------------------------------- approximate

def test_beyond_exact_max_gallery_the_search_is_approximate_and_flagged():
    pytest.importorskip("faiss", reason="the approximate search uses faiss-cpu")
    rng = np.random.RandomState(12)
    centres = rng.randn(5, 8) * 10                       # far apart: no near ties
    labels = rng.randint(0, 5, size=600)
    emb = (centres[labels] + rng.randn(600, 8)).astype(np.float32)
    exact = retrieval_metrics(emb, labels)
    # Every faiss cell visited: the same neighbours as the exact search (distinct distances).
    approx = retrieval_metrics(emb, labels, exact_max_gallery=599, nprobe=10_000)
    assert approx.pop("approximate") is True
    assert_metrics_equal(approx, exact)
    assert "approximate" not in exact
    p1 = retrieval_metrics(emb, labels, exact_max_gallery=100, nprobe=10_000,
                           metrics=("precision_at_1",), max_queries=50)
    assert p1["queries"] == 50 and p1["approximate"] is True


# ----------------------------------------------------------------------------- validity

def test_evaluate_embeddings_without_any_query_partner_is_invalid():
    # Every class has one sample: no query has a correct answer, the metrics are NaN.
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)   # no tied triplet
    got = evaluate_embeddings(emb, np.array([0, 1, 2]), np.array([[0, 1, 2]]),
                              collapse_eps=1e-6)
    assert got["queries"] == 0 and math.isnan(got["precision_at_1"])
    assert got["collapsed"] is False and got["valid"] is False
