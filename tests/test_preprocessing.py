import json

import numpy as np
import pytest

from covseg.data import load_raw, one_hot_to_index
from covseg.preprocessing import (
    assign_folds,
    lesion_burden,
    load_processed,
    member_subsets,
    preprocess,
    stratified_subset,
    window,
)


def test_window_by_hand():
    hu = np.array([-2000, -1000, -300, 400, 1000], dtype=np.float64)
    assert np.allclose(window(hu, -1000, 400), [0, 0, 0.5, 1, 1])
    assert window(hu).dtype == np.float32
    with pytest.raises(ValueError, match="empty"):
        window(hu, 400, -1000)


def _labels(burdens):
    """Slices whose lesion burden is given: (ggo pixels, consolidation pixels) of 100."""
    out = np.full((len(burdens), 10, 10), 3, np.uint8)
    for i, (g, c) in enumerate(burdens):
        flat = out[i].reshape(-1)
        flat[:g] = 0
        flat[g:g + c] = 1
    return out


def test_folds_are_seeded_and_stratified():
    rng = np.random.default_rng(0)
    consolidation = rng.integers(0, 10, 50) * (rng.random(50) < 0.3)
    burdens = [(int(g), int(c)) for g, c in zip(rng.integers(0, 40, 50), consolidation)]
    labels = _labels(burdens)
    folds = assign_folds(labels, 5, seed=1)
    assert np.array_equal(folds, assign_folds(labels, 5, seed=1))
    assert not np.array_equal(folds, assign_folds(labels, 5, seed=2))
    assert np.bincount(folds).tolist() == [10] * 5
    has_cons = lesion_burden(labels)[:, 1] > 0
    for f in range(5):  # every fold sees consolidation and spans the burden range
        assert has_cons[folds == f].sum() >= has_cons.sum() // 5
    total = lesion_burden(labels).sum(1)
    means = [total[folds == f].mean() for f in range(5)]
    assert max(means) - min(means) < 0.05


def test_a_stratified_subset_spans_the_burden_range():
    rng = np.random.default_rng(0)
    consolidation = rng.integers(1, 10, 40) * (np.arange(40) < 12)
    burdens = [(int(g), int(c)) for g, c in zip(rng.integers(1, 40, 40), consolidation)]
    labels = _labels(burdens)
    kept = stratified_subset(labels, 0.75)
    assert len(kept) == 30 and len(set(kept.tolist())) == 30 and np.array_equal(kept, np.sort(kept))
    has_cons = lesion_burden(labels)[:, 1] > 0
    assert has_cons[kept].sum() == 9  # 3/4 of the 12 slices with consolidation, not by chance
    total = lesion_burden(labels).sum(1)
    assert abs(total[kept].mean() - total.mean()) < 0.02 and total[kept].max() == total[~has_cons].max()
    assert np.array_equal(stratified_subset(labels, 1.0), np.arange(40))
    assert len(stratified_subset(labels, 0.01)) == 1


def test_folds_reject_bad_counts():
    with pytest.raises(ValueError, match="split.folds"):
        assign_folds(_labels([(1, 0)] * 3), 5, 0)


def test_preprocess_writes_split(tmp_path, tiny_raw, params):
    raw = load_raw(tiny_raw)
    summary = preprocess(raw, tmp_path / "processed", params.window, params.split, params.seed)
    x_train, y_train = load_processed(tmp_path / "processed", "train")
    x_val, y_val = load_processed(tmp_path / "processed", "val")
    x_test, y_test = load_processed(tmp_path / "processed", "test")
    assert len(x_train) + len(x_val) == 12 and len(x_val) in (2, 3) and y_test is None
    assert x_train.dtype == np.float32 and x_train.min() >= 0 and x_train.max() <= 1
    assert set(summary["train_index"]).isdisjoint(summary["val_index"])
    labels = one_hot_to_index(raw.masks)
    assert np.array_equal(y_val, labels[summary["val_index"]])
    assert json.loads((tmp_path / "processed" / "split.json").read_text())["fold"] == params.split.fold


def test_member_subsets_leave_out_a_different_fold_each_and_together_cover_every_slice():
    labels = _labels([(i, i % 3) for i in range(15)])
    same = member_subsets(labels, 2, 0, seed=1)
    assert [s.tolist() for s in same] == [list(range(15))] * 2
    subsets = member_subsets(labels, 3, 5, seed=1)
    fold_of = assign_folds(labels, 5, 1)
    assert [len(s) for s in subsets] == [12, 12, 12]
    for k, s in enumerate(subsets):
        assert set(s) == set(np.flatnonzero(fold_of != k))
    assert set().union(*map(set, subsets)) == set(range(15))
