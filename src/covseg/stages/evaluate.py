"""Stage `evaluate`: the recipe's out-of-fold metrics (calibration.json), plots; the calibrated model logged
and registered."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from covseg import calibration, plots, registry, tracking
from covseg.atomic import atomic_output, write_json
from covseg.data import data_version
from covseg.evaluation import dice_metrics, per_slice_table, score_model, summary_metrics, trivial_kaggle_f1
from covseg.model import load_checkpoint, pick_device
from covseg.names import (
    CV_METRICS,
    HEADLINE_METRICS,
    KAGGLE_F1,
    OOF_PREFIX,
    PATHS,
    SHORT,
    TAG_CALIBRATED,
    TAG_CHOICES,
    TAG_OOF_FOLDS,
    TAG_OOF_SLICES,
    TAG_OOF_TRIVIAL,
    TAG_RECIPE_KEY,
)
from covseg.params import Evaluate, Registry, Tracking
from covseg.preprocessing import load_processed, load_split


def oof_metrics(entry: dict | None) -> dict:
    """The recipe's nested out-of-fold scores of a calibration entry, as metrics (mean and _std of each
    measure, the slices and folds they come from, the constant predictor's kaggle_f1 on them); {} without."""
    if entry is None:
        return {}
    oof = entry["oof"]
    return {**{m: oof[f"{m}_mean"] for m in CV_METRICS}, **{f"{m}_std": oof[f"{m}_std"] for m in CV_METRICS},
            "oof_slices": oof["slices"], "oof_folds": oof["folds"], f"trivial_{KAGGLE_F1}": oof[f"trivial_{KAGGLE_F1}"]}


def version_tags(metrics: dict, key: str) -> dict:
    """What the gate reads on a registered version: its recipe key, whether it is calibrated and, if so,
    its out-of-fold scores."""
    choices = {k.removeprefix("choice_"): v for k, v in metrics.items() if k.startswith("choice_")}
    tags = {TAG_RECIPE_KEY: key, TAG_CALIBRATED: str(bool(metrics["calibrated"])).lower(),
            TAG_CHOICES: json.dumps(choices, sort_keys=True)}
    if metrics["calibrated"]:
        tags.update({f"{OOF_PREFIX}{m}": round(metrics[m], 6) for m in HEADLINE_METRICS},
                    **{TAG_OOF_SLICES: metrics["oof_slices"], TAG_OOF_FOLDS: metrics["oof_folds"],
                       TAG_OOF_TRIVIAL: round(metrics[f"trivial_{KAGGLE_F1}"], 6)})
    return tags


def run(data: str | Path, model: str | Path, history: str | Path, validation: str | Path,
        calibration_file: str | Path, metrics_path: str | Path, out: str | Path, ev: Evaluate, trk: Tracking,
        reg: Registry, device: str = "auto") -> dict:
    """The model's metrics: the out-of-fold scores of its recipe and data from `calibration_file` (what
    `dvc metrics show` and the gate compare; none, and a warning, without a calibration), and with a held-out
    fold (split.fold k) its scores there with the calibrated choices (`val_*`); write `metrics_path` and the
    folder `out` (loss curves; with a held-out fold its per-slice table, confusion matrix and overlays).

    When the checkpoint came from a tracked training run, its MLflow run gets the metrics, `out`, the
    `validation` report and the model with its calibrated choices, registered as a version of
    `reg.model_name` tagged with its out-of-fold scores and provenance (data version, training slice ids).
    Returns the metrics (with mlflow_run_id and model_version when registered).
    """
    dev = pick_device(device)
    net, ckpt = load_checkpoint(model, dev)
    key = ckpt.get("recipe_key", "")
    choices, entry = calibration.choices_for(calibration_file, key, f"the model {model}")
    net = calibration.apply(net, choices)
    split = load_split(data)
    metrics = {"calibrated": entry is not None, **oof_metrics(entry), "train_slices": len(split["train_slice_ids"]),
               "epoch": int(ckpt.get("epoch", 0)), "recipe_key": key, **{f"choice_{k}": v for k, v in choices.items()}}
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
            tags = version_tags(metrics, key)
            # a version per calibrated model: evaluating again with the same choices registers nothing new
            version = registry.find_version(reg.model_name, run_id, {TAG_CHOICES: tags[TAG_CHOICES]})
            if version is None:
                uri = tracking.log_model(net, load_processed(data, "test")[0].shape[1:])
                version = registry.register(uri, reg.model_name, tags)
            else:
                registry.tag(reg.model_name, version, tags)
            # what it was trained on
            registry.record_provenance(reg.model_name, version, run_id, data_version(Path(PATHS.dvc_file)),
                                       split["train_slice_ids"])
        metrics.update(mlflow_run_id=run_id, model_version=version)
    write_json(metrics, metrics_path)
    return metrics
