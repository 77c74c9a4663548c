"""Cross-validation by the pipeline's own stages: one tracked run per fold, the held-out logits saved for
`covseg calibrate`, folds found done for the same recipe and data, and the recipe key they are found by."""
import json
import re

import numpy as np
import pytest
from mlflow import MlflowClient

from covseg import crossval
from covseg.errors import ParamsError
from covseg.params import recipe_key

TINY_TRAIN = {"model.base_channels": 4, "model.depth": 2, "train.epochs": 1, "train.members": 1,
              "train.scale": 1.0, "split.folds": 3}


def test_cross_validation_by_the_stages_saves_held_out_logits_and_resumes(params, tiny_raw, tmp_path, monkeypatch,
                                                                          tiny_folds, mlflow_store, capsys):
    folds3 = tiny_folds(3)
    p = params.override(TINY_TRAIN)
    out = tmp_path / "cv" / "tiny"
    summary = crossval.cross_validate(tiny_raw, p, out, folds=[0, 2], folds_file=folds3)
    said = capsys.readouterr().out
    assert re.search(r"^fold 0 \(1 of 2; about \d+\.\d min left\): dice_ggo", said, re.M), said[-2000:]
    assert re.search(r"^fold 2 \(2 of 2\): dice_ggo", said, re.M), "the last fold: no time left to tell"
    assert summary["folds"] == 3 and summary["folds_run"] == [0, 2] and summary["recipe"] == "default"
    f1 = [f["kaggle_f1"] for f in summary["per_fold"]]
    assert summary["kaggle_f1_mean"] == pytest.approx(np.mean(f1))
    assert summary["kaggle_f1_std"] == pytest.approx(np.std(f1, ddof=1))
    with np.load(out / "fold0.npz") as saved:
        n = len(saved["ids"])
        assert saved["logits"].shape == saved["logits_tta"].shape == (n, 4, *saved["labels"].shape[1:])
        assert str(saved["recipe"]) == summary["recipe_key"] and int(saved["folds"]) == 3
        assert sorted(saved["ids"].tolist()) == sorted(json.loads(folds3.read_text())["folds"][0]["val"])
    record = json.loads((out / "fold0.json").read_text())
    assert len(record["per_slice"]["slice_id"]) == record["metrics"]["val_slices"] == n
    assert not list(out.glob("*.state*")), "a finished fold's training state is cleared"
    run = MlflowClient(mlflow_store).get_run(record["metrics"]["mlflow_run_id"])  # the train stage's own run
    assert run.data.tags["cv_fold"] == "0" and run.data.params["split.fold"] == "0"
    assert run.data.tags["recipe_key"] == summary["recipe_key"] and "oof_kaggle_f1" in run.data.metrics

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(crossval.train_stage, "run", no_training)
    again = crossval.cross_validate(tiny_raw, p, out, folds=[0, 2], folds_file=folds3)
    assert again["kaggle_f1_mean"] == summary["kaggle_f1_mean"]
    assert re.search(r"^fold 0 \(1 of 2\): ", capsys.readouterr().out, re.M), "nothing trained: no estimate"
    with pytest.raises(AssertionError, match="trained again"):  # other params: the folds are stale
        crossval.cross_validate(tiny_raw, p.override({"train.lr": 0.01}), out, folds=[0], folds_file=folds3)
    with pytest.raises(ParamsError, match=r"folds \[3\]"):
        crossval.cross_validate(tiny_raw, p, out, folds=[3], folds_file=folds3)
    with pytest.raises(ParamsError, match="split.folds = 5, but .* has 3 folds"):
        crossval.cross_validate(tiny_raw, p.override({"split.folds": 5}), out, folds_file=folds3)


def test_flipped_logits_are_the_mean_of_the_slice_and_its_mirror():
    class Net:
        def eval(self):
            return self

        def __call__(self, x):
            return x.repeat(1, 4, 1, 1) * x.new_tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]

    images = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    saved = crossval.fold_logits(Net(), images, 2, "cpu")
    np.testing.assert_allclose(saved["logits"][:, 1], 2 * images, atol=1e-2)
    np.testing.assert_allclose(saved["logits_tta"][:, 0], images, atol=1e-2), "the mirror's logits mirrored back"


def test_a_recipe_key_is_the_params_training_reads_and_the_data(params):
    """One hash of seed, model and train (less device and amp) and the data key (raw data, window, folds):
    a fold is found done, and a model finds its calibration, only for the same."""
    def key(p, data="data"):
        return recipe_key(p.seed, p.model, p.train, data)

    base = key(params)
    for other in ({"seed": 1}, {"model.depth": 3}, {"train.epochs": 7}, {"train.members": 1}, {"train.init": "a.pt"}):
        assert key(params.override(other)) != base, other
    assert key(params, "other data") != base
    for same in ({"split.fold": 1}, {"train.device": "cpu"}, {"train.amp": not params.train.amp},
                 {"evaluate.overlays": 1}, {"calibrate.tta": [False]}):
        assert key(params.override(same)) == base, same
