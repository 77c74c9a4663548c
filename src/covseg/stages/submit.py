"""Stage `submit`: predict the test images -> the competition CSV and the predicted masks."""
from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from covseg import tracking
from covseg.atomic import atomic_output
from covseg.data import index_to_one_hot
from covseg.model import pick_device, predict_labels
from covseg.modelstore import load_calibrated
from covseg.names import SCORED, SUBMISSION_CSV, TEST_MASKS
from covseg.params import Tracking
from covseg.preprocessing import load_processed
from covseg.submission import submission_table, write_submission
from covseg.validation import validate_submission


def run(data: str | Path, model: str | Path, calibration_file: str | Path, out: str | Path, batch_size: int,
        trk: Tracking, device: str = "auto") -> dict:
    """Write `out`/submission.csv (its contract checked first) and `out`/test_masks.npy (M, H, W, 4).

    `model` is a checkpoint, predicting with the choices `calibration_file` holds for its recipe (neutral ones
    and a warning without), or an MLflow model URI (models:/covseg-unet@champion), calibrated when it was
    registered. A checkpoint from a tracked run gets the CSV, gzipped, in its MLflow run.
    Returns {"csv", "masks", "rows", "report"}.
    """
    dev = pick_device(device)
    net, ckpt = load_calibrated(model, calibration_file, dev)
    images, _ = load_processed(data, "test")
    preds = predict_labels(net, images, batch_size, dev)
    out = Path(out)
    table = submission_table(preds)
    report = validate_submission(table, preds.size * len(SCORED), out / SUBMISSION_CSV)
    write_submission(table, out / SUBMISSION_CSV, preds.shape)
    with atomic_output(out / TEST_MASKS) as tmp:
        np.save(tmp, index_to_one_hot(preds))
    if ckpt.get("mlflow_run_id"):  # the CSV compresses ~20x; Kaggle takes it zipped as well
        with tempfile.TemporaryDirectory() as folder:
            gz = Path(folder) / f"{SUBMISSION_CSV}.gz"
            with open(out / SUBMISSION_CSV, "rb") as src, gzip.open(gz, "wb", compresslevel=3) as dst:
                shutil.copyfileobj(src, dst)
            with tracking.resume(ckpt["mlflow_run_id"], trk.experiment):
                mlflow.log_artifact(str(gz), "submission")
    return {"csv": out / SUBMISSION_CSV, "masks": out / TEST_MASKS, "rows": len(table), "report": report}
