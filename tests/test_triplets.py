"""Tests for dist_triplet.triplets: invariants, sharding, reproducibility, counts."""
import random
import subprocess
import sys

import numpy as np
import pytest

from dist_triplet.triplets import (ClassIndex, create_pairs, pk_batches, pk_steps_per_epoch,
                                   seed_create_pairs, shard_length)

# Unbalanced, unsorted, with non-contiguous class ids: smallest class (id 7) has 9.
_COUNTS = {0: 13, 3: 20, 7: 9, 8: 11}


def _labels(seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in _COUNTS.items()])
    return np.random.default_rng(seed).permutation(labels)


def _check_invariants(labels, t):
    assert t.dtype == np.int64 and t.ndim == 2 and t.shape[1] == 3
    a, p, n = t.T
    assert np.all(labels[a] == labels[p])
    assert np.all(a != p)
    assert np.all(labels[n] != labels[a])
    assert t.min() >= 0 and t.max() < len(labels)


def test_class_index_fields():
    labels = np.array([5, 2, 5, 2, 2, 9, 9])
    idx = ClassIndex(labels)
    np.testing.assert_array_equal(idx.classes, [2, 5, 9])
    np.testing.assert_array_equal(idx.counts, [3, 2, 2])
    np.testing.assert_array_equal(idx.order, [1, 3, 4, 0, 2, 5, 6])
    np.testing.assert_array_equal(idx.offsets, [0, 3, 5, 7])
    assert idx.n == 7 and idx.min_count == 2 and idx.num_classes == 3
    np.testing.assert_array_equal(idx.part_sizes(1, 2), [1, 1, 1])
    np.testing.assert_array_equal(idx.part_sizes(0, 2), [2, 1, 1])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 17])
def test_create_pairs_invariants_and_sharding(world_size, seed):
    labels = _labels(seed)
    idx = ClassIndex(labels)
    n_r = (min(_COUNTS.values()) - 1) // world_size
    shards = [create_pairs(idx, seed=seed, epoch=2, rank=r, world_size=world_size)
              for r in range(world_size)]
    anchors = []
    for r, t in enumerate(shards):
        _check_invariants(labels, t)
        # Equal length on every rank: C * n_r, and n_r anchors per class.
        assert t.shape == (len(_COUNTS) * n_r, 3) == (shard_length(labels, world_size), 3)
        np.testing.assert_array_equal(np.unique(labels[t[:, 0]], return_counts=True)[1],
                                      [n_r] * len(_COUNTS))
        # Anchors come from the rank's own part: position = r (mod W) in class order.
        pos = np.empty(len(labels), dtype=np.int64)
        pos[idx.order] = np.arange(len(labels)) - np.repeat(idx.offsets[:-1], idx.counts)
        assert np.all(pos[t[:, 0]] % world_size == r)
        assert len(np.unique(t[:, 0])) == len(t)  # without replacement
        anchors.append(set(t[:, 0].tolist()))
    for r in range(world_size):
        for s in range(r + 1, world_size):
            assert not anchors[r] & anchors[s]
    # Labels and a prebuilt index give the same triplets.
    np.testing.assert_array_equal(shards[0], create_pairs(labels, seed=seed, epoch=2, rank=0,
                                                          world_size=world_size))


def test_create_pairs_reproducible_and_varying():
    labels = _labels()
    base = create_pairs(labels, seed=3, epoch=1, rank=1, world_size=2)
    np.testing.assert_array_equal(base, create_pairs(labels, seed=3, epoch=1, rank=1,
                                                     world_size=2))
    for other in (dict(seed=4, epoch=1, rank=1), dict(seed=3, epoch=2, rank=1),
                  dict(seed=3, epoch=1, rank=0)):
        assert not np.array_equal(base, create_pairs(labels, world_size=2, **other))


def test_create_pairs_does_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    create_pairs(_labels(), seed=0)
    assert np.random.random() == before


def test_full_size_counts():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))
    idx = ClassIndex(labels)
    assert create_pairs(idx, seed=0).shape == (59990, 3)
    assert shard_length(idx, 1) == 59990
    # 10 classes * ((6000 - 1) // 4) anchors: equal on every rank.
    for r in range(4):
        assert create_pairs(idx, seed=0, rank=r, world_size=4).shape == (14990, 3)
    assert shard_length(idx, 4) == 14990
    test_labels = np.repeat(np.arange(10), 1000)
    assert shard_length(test_labels, 1) == 9990


def test_negative_class_uniform_over_other_classes():
    labels = np.repeat(np.arange(5), 2001)  # 4 other classes, 2000 anchors per class
    t = create_pairs(labels, seed=11)
    for c in range(5):
        neg = labels[t[labels[t[:, 0]] == c, 2]]
        counts = np.bincount(neg, minlength=5)
        assert counts[c] == 0
        observed = np.delete(counts, c)
        expected = observed.sum() / 4
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert chi2 < 16.27  # chi-square 3 dof, p = 0.001


def test_positive_uniform_over_other_members():
    labels = np.array([0] * 4 + [1] * 4)
    pos_counts = np.zeros((8, 8), dtype=np.int64)
    for epoch in range(600):
        t = create_pairs(labels, seed=5, epoch=epoch)
        np.add.at(pos_counts, (t[:, 0], t[:, 1]), 1)
    assert np.all(np.diag(pos_counts) == 0)
    block = pos_counts[:4, :4][~np.eye(4, dtype=bool)].reshape(4, 3)
    # Each anchor's positives spread over the 3 others (~1/3 each, n ~ 450).
    frac = block / block.sum(axis=1, keepdims=True)
    assert np.all(np.abs(frac - 1 / 3) < 0.08)


def test_one_class_rejected():
    with pytest.raises(ValueError) as excinfo:
        create_pairs(np.full(10, 4), seed=0)
    msg = str(excinfo.value)
    assert "at least 2 classes" in msg and "[4]" in msg


def test_single_sample_class_rejected():
    with pytest.raises(ValueError) as excinfo:
        ClassIndex(np.array([0, 0, 0, 6, 1, 1]))
    msg = str(excinfo.value)
    assert "class 6 has 1 sample" in msg and "distinct" in msg


def test_non_integer_labels_rejected():
    with pytest.raises(ValueError, match="integer"):
        ClassIndex(np.array([0.0, 1.0, 0.0, 1.0]))


def test_world_size_too_large():
    labels = _labels()  # smallest class 9 -> at most 8 ranks
    assert shard_length(labels, 8) == 4
    with pytest.raises(ValueError) as excinfo:
        create_pairs(labels, seed=0, rank=0, world_size=9)
    msg = str(excinfo.value)
    assert "world_size 9" in msg and "9 samples" in msg
    with pytest.raises(ValueError, match="world_size 9"):
        shard_length(labels, 9)


def test_bad_rank_rejected():
    with pytest.raises(ValueError, match="rank must be in"):
        create_pairs(_labels(), seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pk_batches_layout(world_size):
    labels = _labels()
    idx = ClassIndex(labels)
    p, k, steps = 3, 4, 50
    per_rank = []
    for r in range(world_size):
        b = pk_batches(idx, p=p, k=k, steps=steps, seed=2, epoch=1, rank=r,
                       world_size=world_size)
        assert b.shape == (steps, p * k) and b.dtype == np.int64
        blocks = labels[b].reshape(steps, p, k)
        assert np.all(blocks == blocks[:, :, :1])  # class-major: each block one class
        assert all(len(set(row)) == p for row in blocks[:, :, 0].tolist())  # distinct classes
        pos = np.empty(len(labels), dtype=np.int64)
        pos[idx.order] = np.arange(len(labels)) - np.repeat(idx.offsets[:-1], idx.counts)
        assert np.all(pos[b] % world_size == r)  # own part only
        parts = dict(zip(idx.classes.tolist(), idx.part_sizes(r, world_size).tolist()))
        for step in range(steps):
            for i in range(p):
                rows = b[step, i * k:(i + 1) * k]
                if parts[int(labels[rows[0]])] >= k:
                    assert len(set(rows.tolist())) == k  # without replacement
        per_rank.append(b)
        np.testing.assert_array_equal(b, pk_batches(labels, p=p, k=k, steps=steps, seed=2,
                                                    epoch=1, rank=r, world_size=world_size))
    for r in range(1, world_size):
        assert not np.array_equal(per_rank[0], per_rank[r])
    assert not np.array_equal(per_rank[0], pk_batches(idx, p=p, k=k, steps=steps, seed=2,
                                                      epoch=2, world_size=world_size))


def test_pk_batches_with_replacement_when_part_small():
    labels = np.array([0] * 3 + [1] * 3)
    b = pk_batches(labels, p=2, k=5, steps=20, seed=0)
    blocks = labels[b].reshape(20, 2, 5)
    assert np.all(blocks == blocks[:, :, :1])
    assert set(np.unique(b).tolist()) == set(range(6))


def test_pk_batches_class_choice_uniform():
    labels = np.repeat(np.arange(6), 5)
    b = pk_batches(labels, p=2, k=2, steps=3000, seed=9)
    counts = np.bincount(labels[b[:, ::2]].ravel(), minlength=6)
    assert np.all(np.abs(counts / counts.sum() - 1 / 6) < 0.02)


def test_pk_batches_errors():
    labels = _labels()
    with pytest.raises(ValueError) as excinfo:
        pk_batches(labels, p=5, k=2, steps=1, seed=0)
    assert "p=5" in str(excinfo.value) and "C=4" in str(excinfo.value)
    with pytest.raises(ValueError, match="k >= 2"):
        pk_batches(labels, p=2, k=1, steps=1, seed=0)
    with pytest.raises(ValueError, match="world_size 10"):
        pk_batches(labels, p=2, k=2, steps=1, seed=0, world_size=10)


def test_pk_steps_per_epoch():
    labels = _labels()  # N = 53
    assert pk_steps_per_epoch(labels, 2, 4, 1) == 6
    assert pk_steps_per_epoch(labels, 2, 4, 2) == 3
    assert pk_steps_per_epoch(labels, 4, 8, 4) == 1  # at least 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_create_pairs(seed):
    labels = _labels(seed)
    t = seed_create_pairs(labels, random.Random(seed))
    _check_invariants(labels, t)
    assert t.shape == (len(_COUNTS) * (min(_COUNTS.values()) - 1), 3)
    np.testing.assert_array_equal(t, seed_create_pairs(labels, random.Random(seed)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        seed_create_pairs(np.zeros(4, dtype=np.int64), random.Random(0))


def test_seed_create_pairs_matches_hand_trace():
    # Replay the article's loop with a twin RNG to pin the exact draw order.
    labels = np.array([1, 0, 1, 0, 1, 0])
    rng = np.random.RandomState(42)
    twin = np.random.RandomState(42)
    lists = [np.array([1, 3, 5]), np.array([0, 2, 4])]
    expected = []
    for d in range(2):
        for i in range(2):
            twin.shuffle(lists[d])
            dn = (d + twin.randint(1, 2)) % 2
            expected.append((lists[d][i], lists[d][i + 1], lists[dn][i]))
    np.testing.assert_array_equal(seed_create_pairs(labels, rng), expected)


def test_triplets_imports_neither_mxnet_nor_horovod():
    code = ("import sys, dist_triplet.triplets; "
            "print(any(m.split('.')[0] in ('mxnet', 'horovod') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_pk_distinct_classes_floyd_path_is_uniform(monkeypatch):
    """Many classes (steps x C above the key-sorting limit) take Floyd's algorithm: p
    distinct classes per batch, every class and every (position, class) about equally
    likely, and the batches keep their layout."""
    from dist_triplet import triplets
    rng = np.random.default_rng(5)
    monkeypatch.setattr(triplets, "_SORT_KEYS_MAX", 0)
    c, p, steps = 12, 5, 20000
    picks = triplets._distinct_classes(rng, steps, c, p)
    assert picks.shape == (steps, p) and picks.min() >= 0 and picks.max() < c
    assert all(len(set(row)) == p for row in picks[:500].tolist())
    assert np.all(np.sort(picks, axis=1)[:, 1:] != np.sort(picks, axis=1)[:, :-1])
    freq = np.bincount(picks.ravel(), minlength=c) / picks.size
    assert np.all(np.abs(freq - 1 / c) < 0.005)
    first = np.bincount(picks[:, 0], minlength=c) / steps       # order shuffled too
    assert np.all(np.abs(first - 1 / c) < 0.012)
    labels = np.repeat(np.arange(40), 6)
    b = pk_batches(labels, p=8, k=3, steps=50, seed=1, world_size=2, rank=1)
    blocks = labels[b].reshape(50, 8, 3)
    assert np.all(blocks == blocks[:, :, :1])
    assert all(len(set(row)) == 8 for row in blocks[:, :, 0].tolist())


def test_pk_small_runs_keep_the_sorted_key_stream():
    """Below the limit the classes are the first p of an argsort of random keys, as
    before the Floyd path existed: existing runs draw the same batches."""
    from dist_triplet import triplets
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    got = triplets._distinct_classes(rng_a, 40, 10, 4)
    np.testing.assert_array_equal(got, np.argsort(rng_b.random((40, 10)), axis=1)[:, :4])


def test_global_pk_serves_more_workers_than_the_smallest_class():
    """Adversarial trial: 5 workers over a smallest class of 3 were refused for global
    mining ("each worker needs its own member of every class"), though the global batch is
    drawn from the whole data set and one process with k = 5 x 2 was accepted. Local P x K
    still needs the disjoint parts."""
    from dist_triplet.triplets import EpochSampler
    labels = np.repeat([0, 1, 2], [3, 20, 20])
    common = dict(kind="pk", batch_size=0, p=3, k=2, steps_per_epoch=4, seed=1,
                  num_processes=5, num_workers=5)
    batches = [EpochSampler(labels, rank=r, worker_ranks=[r], scope="global", **common).epoch(0)
               for r in range(5)]
    whole = np.concatenate([b[:, 0] for b in batches], axis=1)       # (steps, 5 x p x k)
    one = EpochSampler(labels, rank=0, worker_ranks=[0], scope="global",
                       **dict(common, num_processes=1, num_workers=1, k=10)).epoch(0)
    assert whole.shape == (4, 30)
    # Every step: 3 classes x 10 images, the same rows one process with k = 10 draws.
    for s in range(4):
        assert sorted(np.bincount(labels[whole[s]], minlength=3)) == [10, 10, 10]
        assert sorted(whole[s]) == sorted(one[s, 0])
    with pytest.raises(ValueError, match="each worker needs its own member of every class"):
        EpochSampler(labels, rank=0, worker_ranks=[0], scope="local", **common)
