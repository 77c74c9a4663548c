"""Per-class logit offsets chosen by nested cross-validation on saved held-out logits."""
import numpy as np
import pytest

from covseg import calibration
from covseg.errors import CovsegError


def fold(seed: int, n: int, ggo_shift: float) -> dict:
    """Slices with ground-glass and consolidation blobs in lung; the logits favour the truth, but the
    ground-glass logit is `ggo_shift` too low, so ground glass is under-called."""
    rng = np.random.default_rng(seed)
    labels = np.full((n, 32, 32), 3, dtype=np.uint8)
    labels[:, 4:28, 4:28] = 2
    for i in range(n):
        r, c = rng.integers(4, 16, 2)
        labels[i, r:r + 10, c:c + 10] = 0
        labels[i, 20:26, 20:26] = 1
    logits = np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2) + rng.normal(0, 0.6, (n, 4, 32, 32))
    logits[:, 0] -= ggo_shift
    return {"logits": logits.astype(np.float16), "labels": labels, "ids": np.arange(n) + 100 * seed}


def test_an_under_called_class_gets_a_positive_offset_that_helps():
    f = fold(0, 6, ggo_shift=1.0)
    bias = calibration.choose_bias(f["logits"], f["labels"])
    assert bias[0] > 0 and bias[2:] == [0.0, 0.0]
    before = calibration.scores(f["logits"], f["labels"], [0.0] * 4)
    after = calibration.scores(f["logits"], f["labels"], bias)
    assert after["dice_ggo"] > before["dice_ggo"] + 0.05
    assert calibration.choose_bias(f["logits"], f["labels"], classes=(0,))[1:] == [0.0, 0.0, 0.0]


def test_no_offset_when_none_does_strictly_better():
    f = fold(1, 4, ggo_shift=0.0)
    f["logits"] = (np.eye(4, dtype=np.float16)[f["labels"]].transpose(0, 3, 1, 2) * 5)  # perfect
    assert calibration.choose_bias(f["logits"], f["labels"]) == [0.0] * 4


def test_each_fold_is_scored_with_offsets_chosen_without_it(monkeypatch):
    folds = {k: fold(k, 2 + k, ggo_shift=1.0) for k in range(3)}
    seen = []
    choose = calibration.choose_bias

    def spy(logits, labels, *args):
        seen.append(len(labels))
        return choose(logits, labels, *args)

    monkeypatch.setattr(calibration, "choose_bias", spy)
    result = calibration.nested_cv(folds, grid=(0.0, 0.5, 1.0, 1.5))
    sizes = {k: len(f["labels"]) for k, f in folds.items()}
    assert seen == [sum(sizes.values()) - sizes[k] for k in sorted(folds)] + [sum(sizes.values())]
    assert [r["fold"] for r in result["per_fold"]] == [0, 1, 2]
    assert all(r["with"]["dice_ggo"] > r["without"]["dice_ggo"] for r in result["per_fold"])


def test_saved_logits_are_read_back_and_too_few_folds_is_one_clear_error(tmp_path):
    with pytest.raises(CovsegError, match="default.fold<k>.logits.npz"):
        calibration.load_fold_logits(tmp_path / "default.json")
    for k in (0, 3):
        np.savez_compressed(tmp_path / f"default.fold{k}.logits.npz", **fold(k, 2, 0.0))
    folds = calibration.load_fold_logits(tmp_path / "default.json")
    assert sorted(folds) == [0, 3] and folds[3]["ids"].tolist() == [300, 301]


def test_the_fast_search_scores_as_the_evaluation_does():
    f = fold(2, 5, ggo_shift=0.7)
    f["labels"][0][f["labels"][0] == 1] = 2  # a slice without consolidation, where it is still called
    search = calibration.Search(f["logits"], f["labels"])
    for bias in ([0.0] * 4, [1.0, -0.5, 0.0, 0.0], [-1.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]):
        assert search.objective(bias) == pytest.approx(
            calibration.objective(calibration.scores(f["logits"], f["labels"], bias)), abs=1e-9)


def test_the_fast_search_breaks_ties_as_argmax_does():
    f = fold(3, 3, ggo_shift=0.0)
    f["logits"] = np.round(f["logits"].astype(np.float32) * 4) / 4  # many exact ties on a 0.25 grid
    search = calibration.Search(f["logits"], f["labels"])
    for bias in ([0.25, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [-0.25, 0.0, 0.0, 0.0]):
        assert search.objective(bias) == pytest.approx(
            calibration.objective(calibration.scores(f["logits"], f["labels"], bias)), abs=1e-9)


def test_logits_of_different_recipes_are_not_mixed(tmp_path):
    for k, recipe in ((0, "aaa"), (1, "bbb")):
        np.savez_compressed(tmp_path / f"default.fold{k}.logits.npz", **fold(k, 2, 0.0), recipe=recipe)
    with pytest.raises(CovsegError, match="different recipes"):
        calibration.load_fold_logits(tmp_path / "default.json")


def test_two_recipes_are_compared_fold_by_fold():
    import sys

    from projects import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import class_bias

    def result(values):
        return {"per_fold": [{"fold": f, "with": {m: v for m in class_bias.MEASURES}} for f, v in enumerate(values)]}

    rows = class_bias.against(result([0.5, 0.6, 0.4]), result([0.4, 0.6, 0.5]), "base")
    assert "| base → this | 0.500 → 0.500 (Δ +0.000 ± 0.100, 1/3 up)" in rows[4]
    with pytest.raises(CovsegError, match=r"its folds \[0, 1\] are not these \[0, 1, 2\]"):
        class_bias.against(result([0.5, 0.6, 0.4]), result([0.4, 0.6]), "base")
