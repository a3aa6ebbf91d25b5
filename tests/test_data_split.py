"""Splitting rules (dist_triplet/data/split.py): the stratified and by-class splits against
plain-loop references, and the rules for 1-sample classes (never an anchor; a query only
in the by-class protocol)."""
import numpy as np
import pytest

from _data_util import data_cfg
from dist_triplet.data import (Split, anchor_rows, check_sampler_classes, check_test,
                               check_training, class_split, load_data, stratified_split)
from dist_triplet.triplets import create_pairs


def _reference_test_count(n, f):
    """The stratified rule, one class at a time, as the docstring states it."""
    t = int(np.floor(n * f + 0.5))
    t = max(0, min(t, n - 2))
    if t == 1:
        t = 2 if n >= 4 else 0
    return t


@pytest.mark.parametrize("f", [0.1, 0.2, 0.5, 0.9])
def test_stratified_counts_match_reference(f):
    sizes = [10, 5, 4, 3, 2, 40, 7]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    labels = np.random.default_rng(0).permutation(labels)
    train, test = stratified_split(labels, f, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    got = np.bincount(labels[test], minlength=len(sizes))
    assert got.tolist() == [_reference_test_count(n, f) for n in sizes]
    assert np.bincount(labels[train], minlength=len(sizes)).min() >= 2
    assert 1 not in got  # never a 1-sample test class


def test_stratified_split_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(5), 20)
    a = stratified_split(labels, 0.3, seed=0)
    b = stratified_split(labels.copy(), 0.3, seed=0)
    c = stratified_split(labels, 0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert np.array_equal(np.bincount(labels[a[1]]), np.bincount(labels[c[1]]))


def test_stratified_one_sample_class_is_an_error():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    with pytest.raises(ValueError) as exc:
        stratified_split(labels, 0.5, seed=0, class_names=("a", "b", "lonely"), source="X")
    msg = str(exc.value)
    assert "X" in msg and "'lonely'" in msg and "1 sample" in msg and "data.split=classes" in msg


def test_class_split_last_classes_are_test_classes():
    # 6 classes with >= 2 samples, one 1-sample class (id 3).
    sizes = {0: 3, 1: 4, 2: 2, 3: 1, 4: 5, 5: 2, 6: 3}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    train, test = class_split(labels, 0.5)
    # round(6 * 0.5) = 3 test classes: the last three multi-sample classes (4, 5, 6),
    # plus the 1-sample class 3.
    assert sorted(set(labels[train])) == [0, 1, 2]
    assert sorted(set(labels[test])) == [3, 4, 5, 6]
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    # CUB-200 convention: 0.5 of 200 classes -> the second hundred are test classes.
    cub = np.repeat(np.arange(200), 3)
    tr, te = class_split(cub, 0.5)
    assert set(cub[tr]) == set(range(100)) and set(cub[te]) == set(range(100, 200))


def test_class_split_needs_four_classes():
    with pytest.raises(ValueError, match="at least 4 classes with >= 2 samples.*found 3"):
        class_split(np.array([0, 0, 1, 1, 2, 2, 3]), 0.5)


def _split(labels, source="S"):
    labels = np.asarray(labels)
    return Split(np.zeros((len(labels), 2), np.float32), labels,
                 tuple(f"c{i}" for i in range(labels.max() + 1)), source)


def test_training_rules():
    check_training(_split([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"training split \(S\): class 2 \('c2'\) has 1 sample"):
        check_training(_split([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="at least 2 classes.*found 1"):
        check_training(_split([0, 0, 0]))


def test_test_rules_one_sample_class_only_by_class():
    split = _split([0, 0, 1, 1, 2])
    with pytest.raises(ValueError) as exc:
        check_test(split, "fraction")
    assert "class 2 ('c2') has 1 sample" in str(exc.value) and "data.split=classes" in str(exc.value)
    check_test(split, "classes")  # a query there
    with pytest.raises(ValueError, match="at least 2 classes with >= 2 samples"):
        check_test(_split([0, 0, 1, 2]), "classes")


def test_one_sample_class_never_anchors_a_test_triplet():
    labels = np.array([0, 3, 0, 1, 1, 2, 0, 1, 4])   # classes 2, 3, 4: one sample each
    rows = anchor_rows(labels)
    assert rows.tolist() == [0, 2, 3, 4, 6, 7]
    trip = rows[create_pairs(labels[rows], seed=0)]  # as the evaluator makes them
    lone = {1, 5, 8}
    assert len(trip) and not (set(trip.reshape(-1).tolist()) & lone)
    assert np.all(labels[trip[:, 0]] == labels[trip[:, 1]])
    assert np.all(labels[trip[:, 0]] != labels[trip[:, 2]])


def test_by_class_protocol_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    y = np.concatenate([np.repeat(np.arange(8), 4), [8, 9]])   # classes 8, 9: 1 sample
    x = rng.normal(size=(len(y), 3))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    train, test = load_data(data_cfg(path=str(tmp_path / "d.npz"), split="classes",
                                     test_fraction=0.25))
    assert set(train.labels.tolist()) == set(range(6))        # 8 * 0.25 = 2 test classes
    assert set(test.labels.tolist()) == {6, 7, 8, 9}
    assert not set(train.labels.tolist()) & set(test.labels.tolist())
    with pytest.raises(ValueError, match=r"d\.npz: class 8 has 1 sample"):
        load_data(data_cfg(path=str(tmp_path / "d.npz"), split="fraction"))


def test_fewer_classes_than_sampler_p():
    split = _split([0, 0, 1, 1, 2, 2])
    check_sampler_classes(split, "pk", 3)
    check_sampler_classes(split, "offline", 16)  # offline sampling takes no p
    with pytest.raises(ValueError) as exc:
        check_sampler_classes(split, "pk", 4)
    msg = str(exc.value)
    assert "sampler.p=4" in msg and "only 3 classes (S)" in msg
