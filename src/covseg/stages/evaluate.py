"""Stage `evaluate`: the recipe's out-of-fold metrics (calibration.json), plots; with a held-out fold, its
scores there. Registering the model is a step of its own after the pipeline (`covseg register`)."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from covseg import calibration, plots, tracking
from covseg.atomic import atomic_output, write_json
from covseg.evaluation import dice_metrics, per_slice_table, score_model, summary_metrics, trivial_kaggle_f1
from covseg.model import load_checkpoint, pick_device
from covseg.names import (
    KAGGLE_F1,
    SHORT,
)
from covseg.params import Evaluate, Tracking
from covseg.preprocessing import load_processed, load_split


def run(data: str | Path, model: str | Path, history: str | Path, validation: str | Path,
        calibration_file: str | Path, metrics_path: str | Path, out: str | Path, ev: Evaluate, trk: Tracking,
        device: str = "auto") -> dict:
    """The model's metrics: the out-of-fold scores of its recipe and data from `calibration_file` (what
    `dvc metrics show` and the gate compare; none, and a warning, without a calibration), and with a held-out
    fold (split.fold k) its scores there with the calibrated choices (`val_*`); write `metrics_path` and the
    folder `out` (loss curves; with a held-out fold its per-slice table, confusion matrix and overlays).

    When the checkpoint came from a tracked training run, its MLflow run gets the metrics, `out` and the
    `validation` report. Returns the metrics.
    """
    dev = pick_device(device)
    net, ckpt = load_checkpoint(model, dev)
    key = ckpt.get("recipe_key", "")
    choices, entry = calibration.choices_for(calibration_file, key, f"the model {model}")
    net = calibration.apply(net, choices)
    split = load_split(data)
    metrics = {"calibrated": entry is not None, **calibration.oof_metrics(entry),
               "train_slices": len(split["train_slice_ids"]), "epoch": int(ckpt.get("epoch", 0)), "recipe_key": key,
               **{f"choice_{k}": v for k, v in choices.items()}}
    images, labels = load_processed(data, "val")

    with atomic_output(out, directory=True) as staging:
        plots.loss_curves(pd.read_csv(history), staging / "loss_curves.png")
        if len(labels):  # a held-out fold: score the model there
            preds, cm = score_model(net, images, labels, ev.batch_size, dev)
            held_out = {**summary_metrics(cm), **dice_metrics(labels, preds),
                        "trivial_kaggle_f1": trivial_kaggle_f1(labels)}
            metrics.update({f"val_{k}": v for k, v in held_out.items()}, val_slices=len(labels))
            table = per_slice_table(labels, preds, split["val_slice_ids"])
            table.to_csv(staging / "per_slice.csv", index=False)
            pd.DataFrame(cm, index=SHORT, columns=SHORT).rename_axis("label").to_csv(staging / "confusion_matrix.csv")
            plots.confusion(cm, staging / "confusion_matrix.png")
            burden = (labels <= 1).reshape(len(labels), -1).mean(1)
            for rank, i in enumerate(np.argsort(-burden)[: ev.overlays]):
                sid = split["val_slice_ids"][i]
                plots.overlay(images[i], labels[i], preds[i], f"slice {sid}: kaggle_f1 {table.loc[i, KAGGLE_F1]:.3f}",
                              staging / f"overlay_{rank:02d}_slice{sid}.png")
        if entry is not None:
            write_json(entry, staging / "calibration.json")

    run_id = ckpt.get("mlflow_run_id")
    if run_id:
        with tracking.resume(run_id, trk.experiment):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
            mlflow.log_artifacts(str(out), "evaluation")
            if Path(validation).is_file():
                mlflow.log_artifact(str(validation))
        metrics.update(mlflow_run_id=run_id)
    write_json(metrics, metrics_path)
    return metrics
