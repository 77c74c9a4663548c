import json

import numpy as np
import pytest

from covseg.data import load_raw, one_hot_to_index
from covseg.preprocessing import assign_folds, lesion_burden, load_processed, preprocess, window


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
