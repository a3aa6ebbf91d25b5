"""The neighbour engine (dist_triplet.retrieval.neighbours) against plain-loop neighbour lists."""
import numpy as np
import pytest

pytest.importorskip("faiss", reason="the neighbour engine takes candidates from faiss")

from dist_triplet.retrieval.neighbours import build_faiss, knn, recall_at_k  # noqa: E402


def loop_key(q, x):
    """The documented key: the float64 squared distance, 0 at or below 1e-10 (|q|^2 + |x|^2)."""
    q, x = np.asarray(q, np.float64), np.asarray(x, np.float64)
    d = float(np.sum((q - x) ** 2))
    return 0.0 if d <= 1e-10 * (q @ q + x @ x) else d


def loop_knn(query, gallery, k, exclude=None):
    """Each query's k nearest gallery rows sorted by (key, index): a plain loop."""
    dist, idx = [], []
    for i, q in enumerate(query):
        ranked = sorted((loop_key(q, x), j) for j, x in enumerate(gallery)
                        if exclude is None or j != exclude[i])[:k]
        dist.append([d for d, _ in ranked])
        idx.append([j for _, j in ranked])
    return np.array(dist), np.array(idx)


def data_sets():
    rng = np.random.RandomState(0)
    yield "random", rng.randn(50, 4).astype(np.float32)
    # Integer points: exact ties everywhere, at the first rank and beyond.
    yield "ties", rng.randint(0, 3, size=(60, 2)).astype(np.float32)
    # 8-bit images (bytes / 255) with duplicates.
    v = (rng.randint(0, 256, size=(80, 20)) * (rng.rand(80, 20) < 0.4)).astype(np.uint8)
    v[rng.randint(0, 80, 15)] = v[rng.randint(0, 80, 15)]
    yield "bytes", v.astype(np.float32) / np.float32(255)
    # A collapsed embedding: rows a few ulps apart, every key snaps to 0.
    flat = np.full((30, 3), 0.3, np.float32)
    for i in range(30):
        for _ in range(i % 5):
            flat[i] = np.nextafter(flat[i], np.float32(1))
    yield "collapsed", flat
    # Norms ~1e4, neighbours 0.01 apart: float32 cannot order them, the re-ranking must.
    far = np.zeros((40, 2), np.float32)
    far[:, 0] = 100.0
    far[:, 1] = rng.permutation(40).astype(np.float32) * np.float32(0.01)
    yield "far", far


@pytest.mark.parametrize("name, emb", list(data_sets()), ids=[n for n, _ in data_sets()])
@pytest.mark.parametrize("k", [1, 5])
def test_leave_one_out_equals_the_loop(name, emb, k):
    exclude = np.arange(len(emb))
    dist, idx = knn(emb, emb, k, exclude=exclude)
    want_d, want_i = loop_knn(emb, emb, k, exclude)
    assert idx.tolist() == want_i.tolist()
    np.testing.assert_allclose(dist, want_d, rtol=1e-12, atol=0)
    if name == "collapsed":
        assert idx[:, 0].tolist() == [1] + [0] * (len(emb) - 1) and np.all(dist == 0)


@pytest.mark.parametrize("name, emb", list(data_sets()), ids=[n for n, _ in data_sets()])
def test_separate_gallery_equals_the_loop(name, emb):
    q, g = emb[::3], emb[1::2]
    dist, idx = knn(q, g, 4)
    want_d, want_i = loop_knn(q, g, 4)
    assert idx.tolist() == want_i.tolist()
    np.testing.assert_allclose(dist, want_d, rtol=1e-12, atol=0)


def test_nearest_over_several_tiles_equals_float64_argmin():
    """k = 1 past one tile (768 rows): the symmetric upper-half pass of leave-one-out and
    the query-by-gallery pass, with exact ties, equal the float64 keys' first minimum."""
    rng = np.random.RandomState(5)
    emb = rng.randint(0, 4, size=(1800, 3)).astype(np.float32)      # ties everywhere
    emb[::2] += rng.rand(900, 3).astype(np.float32)                 # and unique points

    def first_min(q, g, exclude=None):
        d = ((q[:, None].astype(np.float64) - g[None]) ** 2).sum(-1)
        if exclude is not None:
            d[np.arange(len(q)), exclude] = np.inf
        return d.argmin(axis=1)                   # the lowest index among equal keys

    _, idx = knn(emb, emb, 1, exclude=np.arange(1800))
    assert idx[:, 0].tolist() == first_min(emb, emb, np.arange(1800)).tolist()
    q, g = emb[:1000], emb[500:]
    _, idx = knn(q, g, 1)
    assert idx[:, 0].tolist() == first_min(q, g).tolist()
    assert (idx[500:, 0] < 500).all() and (idx[500:, 0] == np.arange(500)).mean() > 0.5


@pytest.mark.parametrize("name", ["bytes", "collapsed"])
def test_long_lists_in_float64_equal_the_loop(name):
    """k > 128 takes float64 keys (neighbours._WIDE); duplicates and near-collapse tie."""
    rng = np.random.RandomState(8)
    v = (rng.randint(0, 256, size=(220, 30)) * (rng.rand(220, 30) < 0.4)).astype(np.uint8)
    v[rng.randint(0, 220, 40)] = v[rng.randint(0, 220, 40)]
    emb = v.astype(np.float32) / np.float32(255)
    if name == "collapsed":                          # rows a few ulps apart: every key 0
        emb = np.full((220, 3), 0.3, np.float32)
        emb[::3] = np.nextafter(emb[::3], np.float32(1))
    rows = np.arange(0, 220, 9)
    dist, idx = knn(emb[rows], emb, 150, exclude=rows)
    want_d, want_i = loop_knn(emb[rows], emb, 150, rows)
    assert idx.tolist() == want_i.tolist()
    np.testing.assert_allclose(dist, want_d, rtol=1e-12, atol=0)


def test_long_lists_need_exact_keys_only_where_float64_cannot_order(monkeypatch):
    """The raw-pixel R-Precision (R ~ 1000) took ~60 s: float32's bound linked ~910 of a
    query's 999 neighbours, each then keyed pair by pair. k > 128 ranks by float64 keys:
    distinct 8-bit rows need no exact key, and the order is the loop's."""
    import dist_triplet.retrieval.neighbours as nb
    emb = np.random.RandomState(9).randint(0, 256, (400, 256)).astype(np.float32) / 255
    rows, pairs, real = np.arange(0, 400, 10), [], nb._pair_keys
    monkeypatch.setattr(nb, "_pair_keys", lambda *a: pairs.append(len(a[4])) or real(*a))
    _, idx = knn(emb[rows], emb, 150, exclude=rows, distances=False)
    assert sum(pairs) == 0                                   # 1,046 before
    assert idx.tolist() == loop_knn(emb[rows], emb, 150, rows)[1].tolist()


def test_many_ties_beyond_the_candidates_go_to_numpy_and_stay_exact():
    # 300 copies of one point and a few others: the tie at rank 1 holds far more items than
    # faiss's candidate list, so the NumPy pass decides (lowest indices first).
    rng = np.random.RandomState(1)
    g = np.vstack([rng.randn(5, 3), np.zeros((300, 3)), rng.randn(5, 3)]).astype(np.float32)
    q = np.zeros((2, 3), np.float32)
    _, idx = knn(q, g, 20)
    assert idx.tolist() == [list(range(5, 25))] * 2
    _, idx = knn(q, g, 3, exclude=np.array([5, 7]))
    assert idx.tolist() == [[6, 7, 8], [5, 6, 8]]


def test_order_only_without_distances_and_k_bounds():
    emb = np.random.RandomState(2).randn(20, 3).astype(np.float32)
    dist, idx = knn(emb, emb, 3, exclude=np.arange(20), distances=False)
    assert dist is None and idx.tolist() == loop_knn(emb, emb, 3, np.arange(20))[1].tolist()
    with pytest.raises(ValueError, match="k=20 but the gallery has 20 items"):
        knn(emb, emb, 20, exclude=np.arange(20))
    with pytest.raises(ValueError, match="non-finite"):
        knn(np.full((1, 3), np.nan, np.float32), emb, 1)
    with pytest.raises(ValueError, match="gallery rows 3"):
        knn(np.zeros((1, 4), np.float32), emb, 1)
    # An exclusion past the gallery, and an index over other rows, were IndexErrors.
    with pytest.raises(ValueError, match=r"in \[-1, 20\).*values 0\.\.20"):
        knn(emb, emb, 1, exclude=np.r_[np.arange(19), 20])
    with pytest.raises(ValueError, match="holds 20 items, the gallery 19 rows"):
        knn(emb[:19], emb[:19], 1, index=build_faiss(emb, "hnsw")[0])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_re_ranked_and_its_recall(kind):
    rng = np.random.RandomState(3)
    emb = rng.randn(2000, 4).astype(np.float32)
    index, params = build_faiss(emb, kind, nprobe=1000, ef_search=200)
    _, idx = knn(emb[:20], emb, 5, index=index)
    assert idx.tolist() == loop_knn(emb[:20], emb, 5)[1].tolist()   # exhaustive enough
    assert recall_at_k(index, emb)["recall_at_k"] == 1.0
    weak, _ = build_faiss(emb, kind, nprobe=1, ef_search=1, hnsw_m=4)
    rec = recall_at_k(weak, emb, k=10, queries=200)
    # The figure by a loop: the share of returned items within the exact 10th key.
    pick = np.sort(np.random.default_rng(0).choice(2000, 200, False))
    got, _ = knn(emb[pick], emb, 10, index=weak)
    e64 = emb.astype(np.float64)
    kth = [np.sort(((e64 - e64[i]) ** 2).sum(axis=1))[9] for i in pick]
    want = sum(int(np.sum(row <= t * (1 + 1e-12))) for row, t in zip(got, kth))
    assert rec["recall_at_k"] == pytest.approx(want / 2000, abs=1e-12)
    assert rec["recall_at_k"] < 1.0
    flat, _ = build_faiss(emb, "flat")
    assert recall_at_k(flat, emb)["recall_at_k"] == 1.0


def test_progress_bar_covers_the_search(monkeypatch, capsys):
    """Issue 17 (7): the bar covered only the embedding, not the long search."""
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    emb = np.random.RandomState(4).randn(30, 3).astype(np.float32)
    knn(emb, emb, 2, progress="searching")
    err = capsys.readouterr().err
    assert "searching" in err and "0/30 " in err           # a bar over the 30 queries
    knn(emb, emb, 2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("big", [1e19, 3e38])
def test_rows_whose_float32_keys_overflow_are_searched_in_float64(big):
    # Adversarial trial: one row of 1e20-sized features made every query's nearest item
    # row 0 (float32 keys inf), so training's evaluation printed P@1 0.0 with exit 0.
    rng = np.random.RandomState(4)
    emb = (rng.randn(20, 8) + 3 * np.repeat(np.arange(4), 5)[:, None]).astype(np.float32)
    emb[3] = big
    for k in (1, 3):
        dist, idx = knn(emb, emb, k, exclude=np.arange(20))
        want_d, want = loop_knn(emb, emb, k, np.arange(20))
        assert idx.tolist() == want.tolist()
        np.testing.assert_allclose(dist, want_d, rtol=1e-12)
    with pytest.raises(ValueError, match="overflow the approximate index's float32"):
        knn(emb, emb, 1, index=build_faiss(emb, "hnsw")[0])
