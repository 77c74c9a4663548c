"""The pipeline once on real MedSeg slices (set COVSEG_REAL_DATA to a Kaggle-layout folder; CI does)."""
import json
import os
from pathlib import Path

import pytest

from covseg.names import ENV_REAL_DATA

REAL = os.environ.get(ENV_REAL_DATA)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not REAL, reason=f"{ENV_REAL_DATA} is not set (a Kaggle-layout folder)")]


def test_pipeline_on_real_data_beats_a_trivial_predictor(new_project, sh):
    # the project's own model and training params, as small as still shows it learns the real slices: one network
    # of 8 epochs at quarter size, 2 folds (2 folds and the shipped model: 3 trainings); tiny synthetic data only
    # until the import
    project = new_project({"synth.n_labelled": 5, "synth.n_test": 1, "synth.size": 64, "split.folds": 2},
                          tiny=False)
    quick = "-S train.epochs=8 -S train.members=1 -S train.scale=0.25"
    # the README's order for your data: import, the recipe's folds and choices, commit, the pipeline
    sh(f"covseg data import {REAL}", project)
    sh(f"covseg cv {quick} && covseg calibrate --cv reports/cv/default {quick}", project)
    sh("git add -A && git commit -qm 'real data'", project)
    sh(f"dvc exp run {quick}", project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    print(json.dumps(metrics, indent=1))
    ids = json.loads((Path(REAL) / "slice_ids.json").read_text())
    assert metrics["calibrated"] is True and metrics["oof_folds"] == 2
    assert metrics["oof_slices"] == metrics["train_slices"] == len(ids["train"])
    # nested out-of-fold scores: each slice scored by a model, and with choices, made without it
    assert metrics["kaggle_f1"] > max(0.15, 3 * metrics["trivial_kaggle_f1"])
    assert metrics["f1_ggo"] > 0.2
    with open(project / "submission/submission.csv") as f:
        rows = sum(1 for _ in f) - 1
    assert rows == len(ids["test"]) * 512 * 512 * 2
