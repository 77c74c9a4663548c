import json

import numpy as np
import pytest
from projects import ROOT

from covseg.data import load_raw, one_hot_to_index
from covseg.errors import DataError, ParamsError
from covseg.preprocessing import (
    assign_folds,
    lesion_burden,
    load_processed,
    make_folds,
    preprocess,
    read_folds,
    window,
    write_folds,
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


def test_folds_reject_bad_counts():
    with pytest.raises(ValueError, match="split.folds"):
        assign_folds(_labels([(1, 0)] * 3), 5, 0)


def test_preprocess_holds_out_no_slice_for_the_shipped_model(tmp_path, tiny_raw, params, tiny_folds):
    raw = load_raw(tiny_raw)
    assert params.split.fold == "all"
    summary = preprocess(raw, tmp_path / "processed", params.window, params.split,
                         read_folds(tiny_folds(params.split.folds), raw), key="k")
    x_train, y_train = load_processed(tmp_path / "processed", "train")
    x_val, y_val = load_processed(tmp_path / "processed", "val")
    assert len(x_train) == 12 and x_val.shape == (0, *x_train.shape[1:]) and len(y_val) == 0
    assert summary["val_slice_ids"] == [] and summary["data_key"] == "k"
    assert np.array_equal(y_train, one_hot_to_index(raw.masks))


def test_preprocess_writes_split(tmp_path, tiny_raw, params, tiny_folds):
    raw = load_raw(tiny_raw)
    params = params.override({"split.fold": 0})
    summary = preprocess(raw, tmp_path / "processed", params.window, params.split,
                         read_folds(tiny_folds(params.split.folds), raw))
    x_train, y_train = load_processed(tmp_path / "processed", "train")
    x_val, y_val = load_processed(tmp_path / "processed", "val")
    x_test, y_test = load_processed(tmp_path / "processed", "test")
    assert len(x_train) + len(x_val) == 12 and len(x_val) in (2, 3) and y_test is None
    assert x_train.dtype == np.float32 and x_train.min() >= 0 and x_train.max() <= 1
    assert set(summary["train_index"]).isdisjoint(summary["val_index"])
    labels = one_hot_to_index(raw.masks)
    assert np.array_equal(y_val, labels[summary["val_index"]])
    assert json.loads((tmp_path / "processed" / "split.json").read_text())["fold"] == params.split.fold


# ----------------------------------------------------------------------------------------- the folds file


def test_the_folds_file_names_every_labelled_slice_once_in_the_seeded_stratified_folds(tmp_path, tiny_raw):
    raw = load_raw(tiny_raw)
    folds = make_folds(raw, 3, seed=42)
    assert len(folds["folds"]) == 3
    val = [sid for f in folds["folds"] for sid in f["val"]]
    assert sorted(val) == sorted(raw.train_ids)
    for f in folds["folds"]:
        assert sorted(f["train"] + f["val"]) == sorted(raw.train_ids) and not set(f["train"]) & set(f["val"])
    assert write_folds(tiny_raw, tmp_path / "folds.json", 3, 42)
    fold_of = read_folds(tmp_path / "folds.json", raw)
    assert np.array_equal(fold_of, assign_folds(one_hot_to_index(raw.masks), 3, 42)), "the seed's folds, by id"


def test_the_folds_file_is_written_once_and_read_by_slice_id(tmp_path, tiny_raw):
    path = tmp_path / "folds.json"
    assert write_folds(tiny_raw, path, 3, seed=42)
    first = path.read_text()
    assert not write_folds(tiny_raw, path, 3, seed=7), "a file that fits the data is kept, whatever the seed"
    assert path.read_text() == first
    assert write_folds(tiny_raw, path, 4, seed=42), "another fold count deals them again"
    assert write_folds(tiny_raw, path, 3, seed=7, force=True) and path.read_text() != first


@pytest.mark.parametrize("edit,message", [
    (lambda f: f["folds"][0]["val"].pop(), r"1 slice\(s\) in no fold"),
    (lambda f: f["folds"][0]["val"].append(999), r"1 unknown \[999\]"),
    (lambda f: f["folds"][1]["val"].append(f["folds"][0]["val"][0]), r"is in folds 0 and 1"),
    (lambda f: f.pop("folds"), "not a folds file"),
])
def test_a_folds_file_that_does_not_fit_the_data_is_one_error_naming_it(tmp_path, tiny_raw, edit, message):
    raw = load_raw(tiny_raw)
    folds = make_folds(raw, 3, seed=42)
    edit(folds)
    path = tmp_path / "folds.json"
    path.write_text(json.dumps(folds))
    with pytest.raises(DataError, match=message) as info:
        read_folds(path, raw)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="no folds file; run `covseg folds`"):
        read_folds(tmp_path / "missing.json", raw)


def test_preprocess_refuses_a_folds_file_of_another_fold_count(tmp_path, tiny_raw, params, tiny_folds):
    raw = load_raw(tiny_raw)
    with pytest.raises(ParamsError, match="split.folds = 5, but the folds file has 3 folds"):
        preprocess(raw, tmp_path / "processed", params.window, params.split, read_folds(tiny_folds(3), raw))


def test_covseg_folds_writes_the_file_once(tmp_path, monkeypatch, capsys):
    from covseg.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["--params", str(ROOT / "params.yaml")]
    assert main([*args, "data", "synth", "--n-labelled", "6", "--n-test", "2", "--size", "32", "--no-record"]) == 0
    assert not (tmp_path / "folds.json").exists(), "--no-record writes no folds file either"
    assert main([*args, "folds"]) == 0
    assert "dealt the labelled slices of data/raw into 5 folds" in capsys.readouterr().out
    first = (tmp_path / "folds.json").read_text()
    assert main([*args, "folds"]) == 0 and "already fits" in capsys.readouterr().out
    assert (tmp_path / "folds.json").read_text() == first
