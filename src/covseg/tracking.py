"""MLflow tracking: where runs go, what ties a run to git, data and DVC, logging and finding runs.

The store is `MLFLOW_TRACKING_URI` when set (a team server), else an embedded SQLite file at the
project root (`mlflow.db`, artifacts in `mlartifacts/`). The root is DVC's `DVC_ROOT` when a stage runs
under DVC, so runs made by `dvc exp run --temp` or `--queue` in a temporary copy land in the same store.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from covseg import shell
from covseg.data import data_version
from covseg.names import (
    ENV_CUDA_DEVICES,
    ENV_DVC_EXP_NAME,
    ENV_DVC_ROOT,
    ENV_FLOW_RUN,
    ENV_TRACKING_URI,
    HEADLINE_METRICS,
    PATHS,
    TAG_CUDA_DEVICES,
    TAG_DATA_VERSION,
    TAG_DVC_EXP,
    TAG_DVC_ROOT,
    TAG_FLOW_RUN,
    TAG_GIT_COMMIT,
)


def project_root(start: str | Path | None = None) -> Path:
    """DVC_ROOT under DVC, else the nearest folder upwards from `start` (default: the current folder)
    that holds .dvc/, else `start` itself."""
    if start is None and os.environ.get(ENV_DVC_ROOT):
        return Path(os.environ[ENV_DVC_ROOT]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded store of the project at `root`."""
    return os.environ.get(ENV_TRACKING_URI) or f"sqlite:///{project_root(root) / PATHS.mlflow_db}"


def configure(experiment: str, uri: str | None = None) -> str:
    """Point MLflow at the store and the experiment (created with artifacts beside an embedded store)."""
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        # an embedded SQLite store keeps artifacts beside it; a server decides for itself
        location = ((Path(uri.removeprefix("sqlite:///")).parent / PATHS.mlflow_artifacts).as_uri()
                    if uri.startswith("sqlite:") else None)
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException as error:  # another run created it since: use that one
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(experiment)
    return uri


def run_tags() -> dict:
    """Tags that tie a run to its code, data version and DVC experiment."""
    here = Path.cwd()
    try:
        commit = shell.run(["git", "rev-parse", "HEAD"], here, check=False).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return {TAG_GIT_COMMIT: commit, TAG_DATA_VERSION: data_version(here / PATHS.dvc_file),
            TAG_DVC_EXP: os.environ.get(ENV_DVC_EXP_NAME, ""), TAG_DVC_ROOT: str(project_root()),
            TAG_FLOW_RUN: os.environ.get(ENV_FLOW_RUN, ""),
            TAG_CUDA_DEVICES: os.environ.get(ENV_CUDA_DEVICES, "(unset)")}


def start_training_run(experiment: str, logged_params: dict):
    """Start the training stage's run in `experiment` with `logged_params` ({"train.lr": ...}) and the
    tags above."""
    configure(experiment)
    run = mlflow.start_run(run_name=os.environ.get(ENV_DVC_EXP_NAME) or None, tags=run_tags())
    mlflow.log_params(logged_params)
    return run


def log_epoch(row: dict) -> None:
    """Per-epoch metrics (losses, learning rate, per-class validation F1) at step = epoch."""
    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def resume(run_id: str, experiment: str):
    """Re-open a finished run to add what a later stage made."""
    configure(experiment)
    return mlflow.start_run(run_id=run_id)


def find_flow_run_result(uri: str, experiment: str, flow_run_id: str) -> dict:
    """The headline metrics and model version of the MLflow run made under a Prefect flow run."""
    flow_run_id = str(uuid.UUID(str(flow_run_id)))  # an id, never text spliced into the filter
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.{TAG_FLOW_RUN} = '{flow_run_id}'") if exp else []
    if not runs:
        return {"flow_run_id": flow_run_id, **{k: None for k in HEADLINE_METRICS}}
    # the newest of the run's versions (a new calibration, or a model logged again, adds one)
    versions = [int(v.version) for v in client.search_model_versions(f"run_id='{runs[0].info.run_id}'")]
    return {"flow_run_id": flow_run_id, "mlflow_run_id": runs[0].info.run_id,
            "model_version": max(versions) if versions else None,
            **{k: runs[0].data.metrics.get(k) for k in HEADLINE_METRICS}}
