"""The numbers behind the report's class statistics (dist_triplet.diagnostics), against
plain loops: nearest other item with ties to the lower index, confusion counts, per-class
Precision@1 worst first, and the pair sample of the distance histogram."""
import numpy as np
import pytest

pytest.importorskip("faiss", reason="the neighbour search runs on faiss")

from dist_triplet import diagnostics as dg  # noqa: E402
from dist_triplet.metrics import retrieval_metrics  # noqa: E402


def loop_nearest(emb, q):
    """Nearest other row of row q by exact squared L2 (float64), lowest index on ties."""
    best, pos = np.inf, -1
    for j in range(len(emb)):
        if j == q:
            continue
        d = float(np.sum((emb[q].astype(np.float64) - emb[j]) ** 2))
        if d < best:
            best, pos = d, j
    return pos


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_classes_and_others_match_a_loop_with_ties(seed):
    """Small-integer embeddings: many exact ties and duplicates; the tie rule decides."""
    rng = np.random.default_rng(seed)
    emb = rng.integers(0, 3, size=(60, 2)).astype(np.float32)
    labels = rng.integers(0, 4, size=60)
    rows = dg.query_rows(labels)
    want = np.array([loop_nearest(emb, q) for q in rows])
    np.testing.assert_array_equal(dg.nearest_others(emb, rows, 1)[:, 0], want)
    np.testing.assert_array_equal(dg.nearest_classes(emb, labels, rows), labels[want])
    # Hits of the class statistics are the run's Precision@1 hits.
    p1 = retrieval_metrics(emb, labels, metrics=("precision_at_1",))["precision_at_1"]
    assert np.mean(labels[want] == labels[rows]) == pytest.approx(p1, abs=1e-12)


def test_nearest_others_k_never_returns_the_query():
    emb = np.zeros((5, 3), np.float32)              # everything ties at 0
    rows = np.array([0, 3, 4])
    got = dg.nearest_others(emb, rows, 2)
    assert got.tolist() == [[1, 2], [0, 1], [0, 1]]


def test_confusion_and_per_class_worst_first():
    q = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    nn = np.array([0, 0, 1, 2, 1, 1, 0, 0, 2])
    m = dg.confusion(q, nn, 4)
    assert m.tolist() == [[2, 1, 1, 0], [0, 2, 0, 0], [2, 0, 1, 0], [0, 0, 0, 0]]
    rows = dg.per_class(m)
    assert [r.label for r in rows] == [2, 0, 1]           # P@1 1/3, 1/2, 1; class 3: none
    assert (rows[0].queries, rows[0].hits) == (3, 1)
    assert rows[0].precision_at_1 == pytest.approx(1 / 3)
    assert (rows[0].confused_with, rows[0].confused_share) == (0, pytest.approx(2 / 3))
    assert rows[1].confused_with == 1                    # tie 1:1 between classes 1, 2
    assert rows[2].confused_with is None and rows[2].confused_share == 0
    # The queries-weighted mean is the overall P@1 (5 hits of 9).
    assert sum(r.hits for r in rows) / sum(r.queries for r in rows) == pytest.approx(5 / 9)


def test_query_rows_leave_out_lone_items_and_sample_when_capped():
    labels = np.array([0, 1, 0, 2, 2, 2, 3])
    assert dg.query_rows(labels).tolist() == [0, 2, 3, 4, 5]     # 1 and 3: one item each
    got = dg.query_rows(np.arange(100) % 5, cap=10, seed=4)
    assert len(got) == 10 and got.tolist() == sorted(set(got.tolist()))
    assert got.tolist() == dg.query_rows(np.arange(100) % 5, cap=10, seed=4).tolist()


def test_pair_distances_draw_same_and_other_class_pairs():
    rng = np.random.default_rng(0)
    labels = np.array([2] * 3 + [0] * 5 + [1] * 1 + [3] * 7)
    rng.shuffle(labels)
    # Row i sits at (i, 0): a pair's squared distance tells which two rows it joined.
    emb = np.stack([np.arange(len(labels)), np.zeros(len(labels))], 1).astype(np.float32)
    same, other = dg.pair_distances(emb, labels, pairs=100, seed=3)   # of 120 pairs: drawn
    assert same.shape == other.shape == (100,)
    assert (same > 0).all() and (other > 0).all()            # never an item with itself
    gaps = np.sqrt(same).round().astype(int)
    possible_same = {abs(i - j) for i in range(16) for j in range(16)
                     if i != j and labels[i] == labels[j]}
    possible_other = {abs(i - j) for i in range(16) for j in range(16)
                      if labels[i] != labels[j]}
    assert set(gaps.tolist()) <= possible_same
    assert set(np.sqrt(other).round().astype(int).tolist()) <= possible_other
    again = dg.pair_distances(emb, labels, pairs=100, seed=3)
    np.testing.assert_array_equal(again[0], same)
    one_class = dg.pair_distances(emb, np.zeros(16, int), pairs=10)
    assert len(one_class[0]) == 10 and len(one_class[1]) == 0


def test_pair_distances_cover_every_partner():
    """Same-class partners are uniform over the other items of the class: all of them
    appear, and the anchor never does."""
    labels = np.array([0, 1, 0, 1, 0, 0, 1])
    emb = (2.0 ** np.arange(7))[:, None].astype(np.float32)   # distinct pair distances
    same, other = dg.pair_distances(emb, labels, pairs=20, seed=0)   # 20 of the 21: drawn
    same, other = (np.concatenate([a, b]) for a, b in zip(
        (same, other), dg.pair_distances(emb, labels, pairs=20, seed=1)))
    for s in range(2, 300):
        more = dg.pair_distances(emb, labels, pairs=20, seed=s)
        same, other = np.concatenate([same, more[0]]), np.concatenate([other, more[1]])
    pairs = {(i, j) for i in range(7) for j in range(7) if i != j}
    dist = {(i, j): float((emb[i, 0] - emb[j, 0]) ** 2) for i, j in pairs}
    seen_same = {p for p, d in dist.items() if d in set(same.tolist())}
    assert {frozenset(p) for p in seen_same} == {frozenset(p) for p in pairs
                                                 if labels[p[0]] == labels[p[1]]}
    seen_other = {frozenset(p) for p, d in dist.items() if d in set(other.tolist())}
    assert seen_other == {frozenset(p) for p in pairs if labels[p[0]] != labels[p[1]]}


def test_a_small_test_set_gives_every_pair_once():
    """New-user trial: 40 test items drew "20,000 pairs" (with repeats) of the 780 there are."""
    labels = np.repeat([0, 1, 2, 3], 10)
    emb = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    same, other = dg.pair_distances(emb, labels)                      # PAIRS = 20,000
    assert (len(same), len(other)) == (4 * 45, 780 - 4 * 45)
    i, j = np.triu_indices(40, 1)
    want = ((emb[i].astype(np.float64) - emb[j]) ** 2).sum(1)
    np.testing.assert_allclose(np.sort(np.concatenate([same, other])), np.sort(want))
