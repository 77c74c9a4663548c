"""Stage `evaluate`: validation metrics, per-slice table, plots and overlays; the model registered."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from covseg import plots, registry, tracking
from covseg.atomic import atomic_output, write_json
from covseg.data import data_version
from covseg.evaluation import dice_metrics, per_slice_table, score_model, summary_metrics, trivial_kaggle_f1
from covseg.model import load_model, pick_device
from covseg.names import HEADLINE_METRICS, KAGGLE_F1, PATHS, SHORT
from covseg.params import Evaluate, Registry, Tracking
from covseg.preprocessing import load_processed, load_split


def run(data: str | Path, model: str | Path, history: str | Path, validation: str | Path,
        metrics_path: str | Path, out: str | Path, ev: Evaluate, trk: Tracking, reg: Registry,
        device: str = "auto") -> dict:
    """Score `model` on the validation fold of `data`; write `metrics_path` and the folder `out`.

    When the checkpoint came from a tracked training run, its MLflow run gets the metrics, `out` and
    the `validation` report, and the model is registered as a version of `reg.model_name`, tagged with
    its provenance (data version, training slice ids of `data`'s split.json).
    Returns the metrics (with mlflow_run_id and model_version when registered).
    """
    dev = pick_device(device)
    net, ckpt = load_model(model, dev)
    images, labels = load_processed(data, "val")
    preds, cm = score_model(net, images, labels, ev.batch_size, dev)
    split = load_split(data)
    metrics = {**summary_metrics(cm), **dice_metrics(labels, preds), "trivial_kaggle_f1": trivial_kaggle_f1(labels),
               "best_epoch": int(ckpt.get("epoch", 0)), "val_slices": len(labels)}

    with atomic_output(out, directory=True) as staging:
        table = per_slice_table(labels, preds, split["val_slice_ids"])
        table.to_csv(staging / "per_slice.csv", index=False)
        pd.DataFrame(cm, index=SHORT, columns=SHORT).rename_axis("label").to_csv(staging / "confusion_matrix.csv")
        plots.loss_curves(pd.read_csv(history), staging / "loss_curves.png")
        plots.confusion(cm, staging / "confusion_matrix.png")
        burden = (labels <= 1).reshape(len(labels), -1).mean(1)
        for rank, i in enumerate(np.argsort(-burden)[: ev.overlays]):
            sid = split["val_slice_ids"][i]
            plots.overlay(images[i], labels[i], preds[i], f"slice {sid}: kaggle_f1 {table.loc[i, KAGGLE_F1]:.3f}",
                          staging / f"overlay_{rank:02d}_slice{sid}.png")

    run_id = ckpt.get("mlflow_run_id")
    if run_id:
        with tracking.resume(run_id, trk.experiment):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_artifacts(str(out), "evaluation")
            if Path(validation).is_file():
                mlflow.log_artifact(str(validation))
            tags = {k: round(metrics[k], 6) for k in HEADLINE_METRICS}
            version = registry.register(ckpt["mlflow_model_uri"], run_id, reg.model_name, tags)
            # what it was trained on: the gate scores it only on slices it never saw
            registry.record_provenance(reg.model_name, version, run_id, data_version(Path(PATHS.dvc_file)),
                                       split["train_slice_ids"])
        metrics.update(mlflow_run_id=run_id, model_version=version)
    write_json(metrics, metrics_path)
    return metrics
