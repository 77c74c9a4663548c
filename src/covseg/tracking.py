"""MLflow tracking: where runs go, what ties a run to git, data and DVC, and logging the model.

The store is `MLFLOW_TRACKING_URI` when set (a team server), else an embedded SQLite file at the
project root (`mlflow.db`, artifacts in `mlartifacts/`). The root is DVC's `DVC_ROOT` when a stage runs
under DVC, so runs made by `dvc exp run --temp` or `--queue` in a temporary copy land in the same store.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np

from covseg.config import flatten
from covseg.data import data_version

ARTIFACTS = "mlartifacts"


def project_root() -> Path:
    """DVC_ROOT under DVC, else the nearest folder upwards that holds .dvc/, else the current folder."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def configure(experiment: str) -> str:
    """Point MLflow at the store and the experiment (created with artifacts beside an embedded store)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        # an embedded SQLite store keeps artifacts beside it; a server decides for itself
        location = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS).as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


def _git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_tags() -> dict:
    """Tags that tie a run to its code, data version and DVC experiment."""
    here = Path.cwd()
    return {"git_commit": _git_commit(here), "data_version": data_version(here / "data.dvc"),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "dvc_root": str(project_root()),
            "prefect_flow_run_id": os.environ.get("COVSEG_PREFECT_FLOW_RUN_ID", "")}


def start_training_run(params: dict):
    """Start the training stage's run with all params (flattened) and the tags above."""
    configure(params["tracking"]["experiment"])
    run = mlflow.start_run(run_name=os.environ.get("DVC_EXP_NAME") or None, tags=run_tags())
    mlflow.log_params(flatten(params))
    return run


def log_epoch(row: dict) -> None:
    """Per-epoch metrics (losses, learning rate, per-class validation F1) at step = epoch."""
    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_model(model, example_shape: tuple[int, int]) -> str:
    """Log the full-size model with a signature and a (1, 1, H, W) input example; returns its URI.

    Saved with pickle serialization: MLflow 3's default `pt2` export freezes the example's batch
    size, and the registry model must take any batch.
    """
    import torch
    from mlflow.models import infer_signature

    example = np.zeros((1, 1, *example_shape), dtype=np.float32)
    with torch.no_grad():
        output = model.cpu()(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model, name="model", serialization_format="pickle", input_example=example,
        signature=infer_signature(example, output),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", "covseg"],
    )
    return info.model_uri


def resume(run_id: str, experiment: str):
    """Re-open a finished run to add what a later stage made."""
    configure(experiment)
    return mlflow.start_run(run_id=run_id)


def load_model(uri: str, device="cpu"):
    """Load a logged or registered model (`models:/covseg-unet@champion`, `runs:/...`)."""
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.pytorch.load_model(uri, map_location=device).to(device).eval()
