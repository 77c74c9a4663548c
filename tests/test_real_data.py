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
    # the project's own model and training params (10 epochs); tiny synthetic data only until the import
    project = new_project({"synth.n_labelled": 5, "synth.n_test": 1, "synth.size": 64}, tiny=False)
    sh(f"covseg data import {REAL}", project)
    sh("git add -A && git commit -qm 'real data'", project)
    sh("dvc exp run -S train.epochs=10", project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    print(json.dumps(metrics, indent=1))
    assert metrics["kaggle_f1"] > max(0.15, 3 * metrics["trivial_kaggle_f1"])
    assert metrics["f1_ggo"] > 0.2
    with open(project / "submission/submission.csv") as f:
        rows = sum(1 for _ in f) - 1
    test_images = json.loads((Path(REAL) / "slice_ids.json").read_text())["test"]
    assert rows == len(test_images) * 512 * 512 * 2
