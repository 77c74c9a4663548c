"""Inference-time choices (class offsets, flip, island removal) chosen by nested cross-validation on the
out-of-fold logits `covseg cv` saves, written to the calibration file and applied where a model is used."""
import json

import numpy as np
import pytest

from covseg import calibration, modelstore
from covseg.errors import CovsegError
from covseg.model import Segmenter, UNet, save_checkpoint

GRID = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]


def fold(seed: int, n: int, ggo_shift: float, k: int = 0, recipe: str = "r1") -> dict:
    """Slices with ground-glass and consolidation blobs in lung; the logits favour the truth, but the
    ground-glass logit is `ggo_shift` too low, so ground glass is under-called. The flip-averaged logits
    are less noisy (as averaging two views is)."""
    rng = np.random.default_rng(seed)
    labels = np.full((n, 32, 32), 3, dtype=np.uint8)
    labels[:, 4:28, 4:28] = 2
    for i in range(n):
        r, c = rng.integers(4, 16, 2)
        labels[i, r:r + 10, c:c + 10] = 0
        labels[i, 20:26, 20:26] = 1
    clean = np.eye(4, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    logits = clean + rng.normal(0, 0.6, (n, 4, 32, 32))
    logits_tta = clean + rng.normal(0, 0.3, (n, 4, 32, 32))
    logits[:, 0] -= ggo_shift
    logits_tta[:, 0] -= ggo_shift
    return {"logits": logits.astype(np.float16), "logits_tta": logits_tta.astype(np.float16), "labels": labels,
            "ids": np.arange(n) + 100 * seed, "recipe": recipe, "data": "d1", "recipe_name": "default", "folds": k}


def cal(params, **update):
    return params.calibrate.model_copy(update={"offset_grid": GRID, **update})


def test_an_under_called_class_gets_a_positive_offset_that_helps():
    f = fold(0, 6, ggo_shift=1.0)
    bias, _ = calibration.choose_bias(f["logits"], f["labels"], GRID, [0, 1])
    assert bias[0] > 0 and bias[2:] == [0.0, 0.0]
    before = calibration.scores(f["labels"], calibration.labels_of(f["logits"], [0.0] * 4))
    after = calibration.scores(f["labels"], calibration.labels_of(f["logits"], bias))
    assert after["dice_ggo"] > before["dice_ggo"] + 0.05
    assert calibration.choose_bias(f["logits"], f["labels"], GRID, [0])[0][1:] == [0.0, 0.0, 0.0]


def test_no_choice_when_none_does_strictly_better(params):
    f = fold(1, 4, ggo_shift=0.0)
    f["logits"] = f["logits_tta"] = (np.eye(4, dtype=np.float16)[f["labels"]].transpose(0, 3, 1, 2) * 5)  # perfect
    assert calibration.choose([f], cal(params)) == calibration.NEUTRAL


def test_the_flip_is_chosen_where_its_logits_score_better(params):
    folds = [fold(k, 4, ggo_shift=0.0) for k in range(2)]
    assert calibration.choose(folds, cal(params))["tta"] is True
    assert calibration.choose(folds, cal(params, tta=[False]))["tta"] is False


def test_islands_smaller_than_the_chosen_size_are_removed(params):
    f = fold(2, 4, ggo_shift=0.0)
    f["logits"] = f["logits_tta"] = (np.eye(4, dtype=np.float16)[f["labels"]].transpose(0, 3, 1, 2) * 5)
    f["logits"][:, 0, 30, 30] = f["logits_tta"][:, 0, 30, 30] = 9  # a 1-pixel ground-glass speck in background
    chosen = calibration.choose([f], cal(params, min_island=[0, 5, 200]))
    assert chosen["min_island"] == 5, "the smallest size that removes the specks (200 would erase findings)"
    assert (calibration.predict(f, chosen) == f["labels"]).all()


def test_each_fold_is_scored_with_choices_made_without_it(monkeypatch, params):
    folds = {k: fold(k, 2 + k, ggo_shift=1.0, k=3) for k in range(3)}
    seen = []
    choose = calibration.choose

    def spy(chosen_on, c):
        seen.append(sum(len(f["labels"]) for f in chosen_on))
        return choose(chosen_on, c)

    monkeypatch.setattr(calibration, "choose", spy)
    result = calibration.nested(folds, cal(params))
    sizes = [len(folds[k]["labels"]) for k in range(3)]
    assert seen == [x for k in range(3) for x in [sum(sizes) - sizes[k]] * 2], "choices and offsets-only, per fold"
    assert [r["fold"] for r in result["per_fold"]] == [0, 1, 2]
    assert all(r["calibrated"]["dice_ggo"] > r["neutral"]["dice_ggo"] for r in result["per_fold"])
    assert result["calibrated"]["dice_ggo_mean"] == pytest.approx(
        np.mean([r["calibrated"]["dice_ggo"] for r in result["per_fold"]]))


def save_folds(folder, folds):
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in folds.items():
        np.savez_compressed(folder / f"fold{k}.npz", **f)


def test_calibrate_writes_an_entry_by_recipe_key_and_keeps_the_others(tmp_path, params):
    out = tmp_path / "calibration.json"
    out.write_text(json.dumps({"other": {"choices": calibration.NEUTRAL, "oof": {}}}))
    save_folds(tmp_path / "cv", {k: fold(k, 3, ggo_shift=1.0, k=3) for k in range(3)})
    entry = calibration.calibrate(tmp_path / "cv", cal(params), out, "default")
    written = json.loads(out.read_text())
    assert set(written) == {"other", "r1"} and written["r1"]["choices"] == entry["choices"]
    assert entry["choices"]["class_bias"][0] > 0 and entry["oof"]["slices"] == 9 and entry["oof"]["folds"] == 3
    assert entry["oof"]["dice_ggo_mean"] == entry["nested"]["calibrated"]["dice_ggo_mean"]
    assert calibration.lookup(out, "r1")["recipe"] == "default" and calibration.lookup(out, "nope") is None


def test_missing_folds_and_mixed_recipes_are_one_clear_error(tmp_path, params):
    with pytest.raises(CovsegError, match="no fold<k>.npz: run `covseg cv"):
        calibration.load_folds(tmp_path)
    save_folds(tmp_path, {0: fold(0, 2, 0.0, k=3), 2: fold(2, 2, 0.0, k=3)})
    with pytest.raises(CovsegError, match=r"folds \[1\] of 3 have no logits yet"):
        calibration.load_folds(tmp_path)
    save_folds(tmp_path, {1: fold(1, 2, 0.0, k=3, recipe="r2")})
    with pytest.raises(CovsegError, match="different recipes or data"):
        calibration.load_folds(tmp_path)


@pytest.mark.parametrize("choices", [{"class_bias": [0, 0, 0], "tta": False, "min_island": 0},
                                     {"class_bias": [0, 0, 0, 0], "tta": "yes", "min_island": 0},
                                     {"class_bias": [0, 0, 0, 0], "tta": False, "min_island": -1},
                                     {"class_bias": [99, 0, 0, 0], "tta": False, "min_island": 0},
                                     {"class_bias": [0, 0, 0, 0], "tta": False, "min_island": 0, "code": "x"}])
def test_a_calibration_file_holds_data_only(tmp_path, choices):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"k": {"choices": choices, "oof": {}}}))
    with pytest.raises(CovsegError, match=f"{path}: k: choices"):
        calibration.read(path)


def test_a_checkpoint_is_loaded_with_its_recipes_choices_or_neutral_ones_and_a_warning(tmp_path, capsys):
    save_checkpoint(Segmenter(UNet(base_channels=2, depth=1)), tmp_path / "m.pt", recipe_key="r1")
    path = tmp_path / "calibration.json"
    choices = {"class_bias": [1.0, 0.0, 0.0, 0.0], "tta": True, "min_island": 50}
    path.write_text(json.dumps({"r1": {"choices": choices, "oof": {}}}))
    net, _ = modelstore.load_calibrated(tmp_path / "m.pt", path)
    assert (net.class_bias, net.tta, net.min_island) == ([1.0, 0.0, 0.0, 0.0], True, 50)
    net, _ = modelstore.load_calibrated(tmp_path / "m.pt", tmp_path / "none.json")
    assert (net.class_bias, net.tta, net.min_island) == ([0.0] * 4, False, 0)
    assert "no calibration for the model" in capsys.readouterr().err


def test_the_fast_search_scores_as_the_evaluation_does():
    f = fold(2, 5, ggo_shift=0.7)
    f["labels"][0][f["labels"][0] == 1] = 2  # a slice without consolidation, where it is still called
    search = calibration.Search(f["logits"], f["labels"], GRID)
    for bias in ([0.0] * 4, [1.0, -0.5, 0.0, 0.0], [-1.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]):
        assert search.objective(bias) == pytest.approx(
            calibration.objective(calibration.scores(f["labels"], calibration.labels_of(f["logits"], bias))), abs=1e-9)


def test_the_fast_search_breaks_ties_as_argmax_does():
    f = fold(3, 3, ggo_shift=0.0)
    f["logits"] = np.round(f["logits"].astype(np.float32) * 4) / 4  # many exact ties on a 0.25 grid
    search = calibration.Search(f["logits"], f["labels"], GRID)
    for bias in ([0.25, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [-0.25, 0.0, 0.0, 0.0]):
        assert search.objective(bias) == pytest.approx(
            calibration.objective(calibration.scores(f["labels"], calibration.labels_of(f["logits"], bias))), abs=1e-9)
