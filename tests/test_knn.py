"""Tests of dist_triplet.knn against plain-loop neighbour lists."""
import numpy as np
import pytest

from dist_triplet import knn


def loop_key(q, x):
    """The documented ranking key: the squared distance, 0 at or below 1e-10 times
    ||q||^2 + ||x||^2 (float64 rounding noise), rounded to float32."""
    d = np.sum((q - x) ** 2)
    return np.float32(0.0 if d <= 1e-10 * (q @ q + x @ x) else d)


def loop_neighbours(query, gallery, leave_one_out):
    """Each query's gallery indices sorted by (key, index): a plain loop."""
    q = np.asarray(query, np.float64)
    g = np.asarray(gallery, np.float64)
    out = []
    for i in range(len(q)):
        ranked = sorted((loop_key(q[i], g[j]), j) for j in range(len(g))
                        if not (leave_one_out and j == i))
        out.append([j for _, j in ranked])
    return out


def loop_relevance(query, q_labels, gallery, g_labels, leave_one_out):
    return [[g_labels[j] == q_labels[i] for j in nn]
            for i, nn in enumerate(loop_neighbours(query, gallery, leave_one_out))]


def collect(search, q_idx, r):
    """The ranked relevance of ``search`` for every query, as lists cut at r."""
    got = {}

    def on_tile(rows, rr, rel):
        for row, rv, line in zip(rows, rr, rel):
            got[int(row)] = [bool(v) for v in line[:rv]]

    search.ranked_relevance(q_idx, r, on_tile)
    return [got[i] for i in range(len(q_idx))]


def data_sets():
    rng = np.random.RandomState(0)
    yield "random", rng.randn(50, 4).astype(np.float32), rng.randint(0, 3, 50)
    # Integer points: exact ties everywhere, at the first rank and across labels.
    yield "ties", rng.randint(0, 3, size=(60, 2)).astype(np.float32), rng.randint(0, 3, 60)
    # 8-bit images (bytes / 255) with duplicates: the exact-integer GEMM.
    v = (rng.randint(0, 256, size=(80, 20)) * (rng.rand(80, 20) < 0.4)).astype(np.uint8)
    v[rng.randint(0, 80, 15)] = v[rng.randint(0, 80, 15)]
    yield "bytes", v.astype(np.float32) / np.float32(255), rng.randint(0, 4, 80)
    # A collapsed embedding: all rows a few ulps apart, every distance ties at 0.
    flat = np.full((30, 3), 0.3, np.float32)
    for i in range(30):
        for _ in range(i % 5):
            flat[i] = np.nextafter(flat[i], np.float32(1))
    yield "collapsed", flat, rng.randint(0, 2, 30)


@pytest.mark.parametrize("method", knn.METHODS)
@pytest.mark.parametrize("name,emb,labels", list(data_sets()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_ranked_relevance_leave_one_out_matches_loop(method, name, emb, labels):
    want = loop_relevance(emb, labels, emb, labels, True)
    search = knn.NeighbourSearch(emb, labels, method=method)
    q_idx = np.arange(len(emb))
    r = np.array([max(1, int((labels == labels[i]).sum()) - 1) for i in q_idx])
    got = collect(search, q_idx, r)
    for i in q_idx:
        assert got[i] == want[i][:r[i]], (name, i)
    nearest = search.nearest_relevance(q_idx)
    assert nearest.tolist() == [w[0] for w in want]


@pytest.mark.parametrize("method", knn.METHODS)
@pytest.mark.parametrize("name,emb,labels", list(data_sets()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_ranked_relevance_with_separate_gallery_matches_loop(method, name, emb, labels):
    # The first 20 rows query the rest: no self exclusion, gallery indices restart at 0.
    q, ql, g, gl = emb[:20], labels[:20], emb[20:], labels[20:]
    want = loop_relevance(q, ql, g, gl, False)
    search = knn.NeighbourSearch(g, gl, q, ql, method=method)
    r = np.array([max(1, int((gl == ql[i]).sum())) for i in range(20)])
    got = collect(search, np.arange(20), r)
    for i in range(20):
        assert got[i] == want[i][:r[i]], (name, i)
    assert search.nearest_relevance(np.arange(20)).tolist() == [w[0] for w in want]


def test_nearest_relevance_of_a_query_subset_in_any_order():
    rng = np.random.RandomState(1)
    emb = rng.randint(0, 4, size=(70, 3)).astype(np.float32)
    labels = rng.randint(0, 5, 70)
    want = [w[0] for w in loop_relevance(emb, labels, emb, labels, True)]
    q_idx = np.array([33, 2, 69, 2, 10, 0, 41])
    got = knn.NeighbourSearch(emb, labels).nearest_relevance(q_idx)
    assert got.tolist() == [want[i] for i in q_idx]


def test_fast_nearest_rechecks_pairs_float32_cannot_order():
    # Norms ~1e4, neighbours 0.01 apart: float32 distances err more than the gaps, so the
    # certified first rank must come from the exact re-check.
    rng = np.random.RandomState(6)
    emb = np.zeros((40, 2), dtype=np.float32)
    emb[:, 0] = 100.0
    emb[:, 1] = rng.permutation(40).astype(np.float32) * np.float32(0.01)
    labels = rng.randint(0, 2, 40)
    exact = knn.NeighbourSearch(emb, labels, method="exact").nearest_relevance(np.arange(40))
    fast = knn.NeighbourSearch(emb, labels, method="fast").nearest_relevance(np.arange(40))
    assert fast.tolist() == exact.tolist()
    # Not compared to the loop: neighbours at +-0.01 tie up to the float64 expansion's own
    # rounding (~5e-12 here), which decides their order (documented in dist_triplet.knn).
    assert 0 < exact.sum() < 40


def test_top_k_lowest_index_ties_by_hand():
    d = np.array([[3.0, 1.0, 1.0, 0.0, 1.0]], np.float32)
    # Without self: 3 (0.0), then the tie 1, 2, 4 by index; k = 3 cuts inside the tie.
    assert knn.top_k_lowest_index_ties(d, 3).tolist() == [[3, 1, 2]]
    # Column 3 is the query itself: skipped.
    assert knn.top_k_lowest_index_ties(d, 3, np.array([3])).tolist() == [[1, 2, 4]]


def test_exact_top_k_matches_loop():
    rng = np.random.RandomState(2)
    g = rng.randint(0, 3, size=(40, 2)).astype(np.float32)
    q = rng.randint(0, 3, size=(7, 2)).astype(np.float32)
    want = loop_neighbours(q, g, False)
    assert knn.exact_top_k(q, g, 5, block=3).tolist() == [w[:5] for w in want]
    want_loo = loop_neighbours(g, g, True)
    assert knn.exact_top_k(g, g, 4, leave_one_out=True).tolist() == [w[:4] for w in want_loo]
    with pytest.raises(ValueError, match="k must lie"):
        knn.exact_top_k(g, g, 40, leave_one_out=True)


def test_exact_keys_snap_and_non_finite():
    dot = np.array([1.0, 0.5, np.nan])
    scale = np.array([2.0, 2.0, 2.0])
    # 2 - 2*1 = 0 (snapped), 2 - 1 = 1, NaN -> +inf (ranked last)
    assert knn.exact_keys(dot, scale).tolist() == [0.0, 1.0, np.inf]


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="method"):
        knn.NeighbourSearch(np.zeros((3, 2), np.float32), np.zeros(3, int), method="faiss")


def clustered(seed, n=1000, dim=16, classes=20):
    rng = np.random.RandomState(seed)
    centres = rng.randn(classes, dim) * 4
    labels = rng.randint(0, classes, n)
    return (centres[labels] + rng.randn(n, dim)).astype(np.float32), labels


def test_approximate_search_exhaustive_is_exact_on_distinct_distances():
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu")
    emb, _ = clustered(3)
    index = knn.ApproximateSearch(emb, nlist=16, nprobe=16)   # every cell: exhaustive
    got = index.search(emb[:50], 10, exclude=np.arange(50))
    want = knn.exact_top_k(emb[:50], emb, 10 + 1)
    # The exact top 11 without the query itself (its own distance 0 comes first).
    want = np.array([[j for j in row if j != i][:10] for i, row in enumerate(want)])
    assert np.array_equal(got, want)


def test_approximate_recall_measures_misses():
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu")
    emb, _ = clustered(4)
    full = knn.approximate_recall(emb, emb, 20, leave_one_out=True, nlist=25, nprobe=25)
    assert full["recall"] == 1.0 and full["nprobe"] == 25 and full["queries"] == 1000
    one = knn.approximate_recall(emb, emb, 20, leave_one_out=True, nlist=25, nprobe=1)
    # One cell of 25 misses the neighbours across cell borders, but finds most.
    assert 0.3 < one["recall"] < 1.0
    # The definition, by a loop over queries: |approximate & exact| / k.
    index = knn.ApproximateSearch(emb, nlist=25, nprobe=1)
    got = index.search(emb, 20, exclude=np.arange(1000))
    want = knn.exact_top_k(emb, emb, 20, leave_one_out=True)
    by_loop = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, want)])
    assert one["recall"] == pytest.approx(by_loop, abs=1e-12)


def test_benchmark_reports_every_option_on_given_data():
    rng = np.random.RandomState(5)
    emb = rng.randn(300, 8).astype(np.float32)
    labels = rng.randint(0, 3, 300)
    got = knn.benchmark(emb, labels, repeats=1, mxnet=False)
    for key in ("precision_at_1_s", "retrieval_full_s", "retrieval_exact_s",
                "triplet_accuracy_s", "evaluate_epoch_s", "gemm_numpy_s"):
        assert got[key] > 0.0 and got["cpu"][key] >= 0.0, key
    assert "gemm_mxnet_s" not in got and "embed_s" not in got
    assert (got["n"], got["dim"]) == (300, 8)


def test_nearest_relevance_all_over_many_tiles_matches_the_full_search():
    # Many row and column tiles (tiles of 16 and 7 rows), classes spanning tile borders,
    # ties: the symmetric half-matrix path against the exact path's first neighbour (the
    # exact path itself is checked against the plain loop above).
    rng = np.random.RandomState(7)
    for emb in (rng.randint(0, 3, size=(400, 2)).astype(np.float32),
                rng.randn(400, 3).astype(np.float32)):
        labels = rng.randint(0, 4, size=400)
        labels[:40] = 3                                   # one long run across borders
        exact = knn.NeighbourSearch(emb, labels, method="exact")
        want = collect(exact, np.arange(400), np.ones(400, int))
        want = [w[0] for w in want]
        search = knn.NeighbourSearch(emb, labels)
        assert search._fast.nearest_relevance_all(1.0, threads=2, tile=16).tolist() == want
        assert search._fast.nearest_relevance_all(1.0, threads=1, tile=7).tolist() == want
