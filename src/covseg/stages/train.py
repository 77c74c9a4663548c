"""Stage `train`: the U-Net on the training slices, its checkpoint and history, an MLflow run."""
from __future__ import annotations

from pathlib import Path

import mlflow

from covseg import tracking
from covseg.atomic import atomic_output
from covseg.model import load_checkpoint, save_checkpoint
from covseg.names import TAG_BEST_EPOCH, TAG_RECIPE_KEY
from covseg.params import ModelParams, Tracking, Train, recipe_key
from covseg.preprocessing import load_processed, load_split
from covseg.training import train


def run(data: str | Path, model: str | Path, history: str | Path, seed: int, m: ModelParams, t: Train,
        trk: Tracking, logged_params: dict, state: str | Path | None = None) -> dict:
    """Train on `data`; write the checkpoint to `model` and the per-epoch history to `history`.
    With `state`, a killed run resumes from its last finished epoch (covseg.training.TrainingState).
    The checkpoint records its recipe key (params.recipe_key), by which its calibration is found.

    An MLflow run in `trk.experiment` records `logged_params` (the command line passes all of
    params.yaml, flattened), every epoch's metrics and the history (the model is logged by evaluate,
    with its calibration). Returns {"model", "history", "best_epoch", "val_kaggle_f1", "recipe_key",
    "mlflow_run_id"}.
    """
    x_train, y_train = load_processed(data, "train")
    x_val, y_val = load_processed(data, "val")
    key = recipe_key(seed, m, t, load_split(data).get("data_key", ""))
    with tracking.start_training_run(trk.experiment, logged_params) as mlflow_run:
        mlflow.set_tag(TAG_RECIPE_KEY, key)
        with atomic_output(model) as partial, atomic_output(history) as history_tmp:
            table = train(t, m, seed, x_train, y_train, x_val, y_val, partial, on_epoch=tracking.log_epoch,
                          state=state)
            net, ckpt = load_checkpoint(partial)
            save_checkpoint(net, partial, epoch=ckpt["epoch"], val_kaggle_f1=ckpt["val_kaggle_f1"],
                            recipe_key=key, mlflow_run_id=mlflow_run.info.run_id)
            table.to_csv(history_tmp, index=False)
        mlflow.log_artifact(str(history))
        mlflow.set_tag(TAG_BEST_EPOCH, ckpt["epoch"])
    return {"model": Path(model), "history": Path(history), "best_epoch": int(ckpt["epoch"]),
            "val_kaggle_f1": ckpt["val_kaggle_f1"], "recipe_key": key, "mlflow_run_id": mlflow_run.info.run_id}
