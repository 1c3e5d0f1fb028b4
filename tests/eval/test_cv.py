"""Stratified folds against their invariants and scikit-learn's StratifiedKFold; the fold summary's math."""

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from gptforge.eval.cv import folds_table, stratified_kfold, summarize_folds


def _label_sets():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5, 7):
        for n_classes in (1, 2, 4, 6):
            for _ in range(3):
                counts = rng.integers(k, 4 * k + 7, n_classes)
                y = np.repeat(rng.permutation(40)[:n_classes], counts)  # non-contiguous class ids
                yield rng.permutation(y), k


def test_invariants_and_per_class_sizes_equal_sklearn():
    for y, k in _label_sets():
        folds = stratified_kfold(y.tolist(), k, seed=3)
        assert len(folds) == k
        val_all = np.concatenate([v for _, v in folds])
        assert sorted(val_all.tolist()) == list(range(len(y)))  # each index in exactly one val fold
        sizes = [len(v) for _, v in folds]
        assert max(sizes) - min(sizes) <= 1
        classes = np.unique(y)
        per_class = np.array([[np.sum(y[v] == c) for c in classes] for _, v in folds])  # (k, classes)
        assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()
        for tr, va in folds:
            assert tr.dtype == np.int64 and va.dtype == np.int64
            assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == len(y)
            assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
        ref = StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(np.zeros(len(y)), y)
        ref_per_class = np.array([[np.sum(y[v] == c) for c in classes] for _, v in ref])
        np.testing.assert_array_equal(per_class, ref_per_class)


def test_deterministic_per_seed_and_different_across_seeds():
    y = np.random.default_rng(1).integers(0, 3, 60).tolist()
    a = stratified_kfold(y, 4, seed=7)
    b = stratified_kfold(y, 4, seed=7)
    c = stratified_kfold(y, 4, seed=8)
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b))
    assert any(not np.array_equal(x[1], z[1]) for x, z in zip(a, c))


@pytest.mark.parametrize(
    "y, k, match",
    [
        ([0, 1, 0, 1], 1, "k=1 folds: cross-validation needs k >= 2"),
        ([0, 1, 0], 4, "k=4 folds but only n=3 examples"),
        ([], 2, "k=2 folds but only n=0"),
        ([0, 0, 0, 1, 1, 2, 2, 2], 3, r"class 1 has only 2 example\(s\), fewer than k=3.*use k <= 2"),
        ([0, 0, 0, 5, 0], 2, r"class 5 has only 1 example.*merge or drop"),
        ([0.5, 1.0, 0.5, 1.0], 2, "integer class indices"),
    ],
)
def test_errors(y, k, match):
    with pytest.raises(ValueError, match=match):
        stratified_kfold(y, k, seed=0)


def test_summarize_folds_math():
    folds = [
        {"accuracy": 0.8, "f1_macro": 0.5, "only_here": 1.0},
        {"accuracy": 0.9, "f1_macro": 0.7},
        {"f1_macro": 0.6, "accuracy": 0.7, "loss": 2},
    ]
    s = summarize_folds(folds)
    assert list(s) == ["accuracy", "f1_macro"]  # only keys present in every fold, first fold's order
    assert s["accuracy"]["values"] == [0.8, 0.9, 0.7]
    assert s["accuracy"]["mean"] == pytest.approx(0.8)
    assert s["accuracy"]["std"] == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0.01) / 2)
    assert s["f1_macro"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1))
    one = summarize_folds([{"accuracy": 0.5}])
    assert one == {"accuracy": {"mean": 0.5, "std": 0.0, "values": [0.5]}}
    with pytest.raises(ValueError, match="no folds"):
        summarize_folds([])
    with pytest.raises(ValueError, match=r"fold 1: metric 'a' = 'x' is not a number"):
        summarize_folds([{"a": 1.0}, {"a": "x"}])


def test_folds_table():
    table = folds_table(summarize_folds([{"accuracy": 0.8}, {"accuracy": 0.9}]))
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | mean | std | per-fold values |"
    assert lines[2] == "| accuracy | 0.8500 | 0.0707 | 0.8000, 0.9000 |"
