"""Prefect flows that orchestrate the one pipeline in dvc.yaml and the model registry.

They never re-implement a stage: each training is `dvc exp run -S ...` in a working copy of its own
(a git clone sharing the repository's DVC cache and remote), its metrics are read from the DVC metrics
file, the promotion gate is `covseg promote`, and results go back with `dvc exp push`.

    train           one run (the `train/gpu` deployment; `train/nightly` retrains when the data changed)
    sweep           a list of param sets, each its own `train/gpu` run on the pool; best one promoted
    cross_validate  k folds in parallel on the pool; mean and spread of kaggle_f1

With no PREFECT_API_URL the same flows run locally (sweep and cross_validate then run the trainings
one after another in this process).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# before Prefect reads its settings: telemetry off, and time for a local (ephemeral) server's first start
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

FLOW_RUN_ENV = "COVSEG_PREFECT_FLOW_RUN_ID"  # becomes an MLflow tag, so a sweep finds its runs


# ------------------------------------------------------------------------------- plain helpers


def override_args(overrides: dict | None) -> list[str]:
    """{'train.epochs': 3} -> ['-S', 'train.epochs=3'] for `dvc exp run` (lists as YAML flow lists)."""
    args = []
    for key, value in sorted((overrides or {}).items()):
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        args += ["-S", f"{key}={text}"]
    return args


def tracking_uri(repo: Path) -> str:
    """The team server when MLFLOW_TRACKING_URI is set, else the repository's embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"


def results_table(rows: list[dict], metric: str = "kaggle_f1"):
    """One row per training, best first."""
    import pandas as pd

    table = pd.DataFrame(rows)
    return table.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def fold_summary(scores: list[float]) -> dict:
    import numpy as np

    values = np.asarray(scores, dtype=float)
    return {"folds": len(values), "kaggle_f1_mean": float(values.mean()),
            "kaggle_f1_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "kaggle_f1_min": float(values.min()), "kaggle_f1_max": float(values.max())}


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run a command; on failure raise with the end of its output."""
    bindir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **(env or {}), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def _remote_url(repo: Path) -> tuple[str, str] | None:
    """The default DVC remote of the repository, with a local path made absolute."""
    name = sh(["dvc", "config", "core.remote"], repo).strip()
    if not name:
        return None
    url = sh(["dvc", "config", f"remote.{name}.url"], repo).strip()
    if "://" not in url and not os.path.isabs(url):
        url = str((repo / ".dvc" / url).resolve())
    return name, url


# ------------------------------------------------------------------------------- tasks


@task(retries=2, retry_delay_seconds=5)
def make_working_copy(repo: str) -> str:
    """A git clone of the repository's HEAD that shares its DVC cache and remote."""
    repo_path = Path(repo)
    work = Path(tempfile.mkdtemp(prefix="covseg-run-")) / "work"
    sh(["git", "clone", "-q", "--shared", str(repo_path), str(work)], repo_path)
    sh(["dvc", "cache", "dir", "--local", str(repo_path / ".dvc" / "cache")], work)
    remote = _remote_url(repo_path)
    if remote:
        sh(["dvc", "remote", "modify", "--local", remote[0], "url", remote[1]], work)
    return str(work)


@task(retries=2, retry_delay_seconds=10)
def pull_data(work: str) -> str:
    """The data version that data.dvc records, from the shared cache or the remote."""
    sh(["dvc", "pull", "-q", "data.dvc"], Path(work))
    from covseg.data import data_version

    return data_version(Path(work) / "data.dvc")


@task
def run_pipeline(work: str, overrides: dict, name: str, uri: str) -> dict:
    """`dvc exp run` with the given params; returns the DVC metrics and the pipeline's wall time."""
    start = time.time()
    env = {"MLFLOW_TRACKING_URI": uri, FLOW_RUN_ENV: str(flow_run.get_id() or "")}
    out = sh(["dvc", "exp", "run", "-n", name, *override_args(overrides)], Path(work), env)
    get_run_logger().info("pipeline output (end):\n%s", out[-2000:])
    metrics = json.loads((Path(work) / "reports" / "metrics.json").read_text())
    return {**metrics, "pipeline_seconds": time.time() - start, "pipeline_start": start, "pipeline_end": time.time()}


@task
def promotion_gate(work: str, version: int, uri: str) -> dict:
    """`covseg promote --version N` against the champion, on this copy's validation data."""
    decision = Path(work) / "promotion.json"
    sh(["covseg", "promote", "--version", str(version), "--output", str(decision)], Path(work),
       {"MLFLOW_TRACKING_URI": uri})
    return json.loads(decision.read_text())


@task(retries=2, retry_delay_seconds=10)
def push_results(work: str, name: str) -> None:
    """The experiment (git ref and DVC outputs) back to the repository and its DVC remote."""
    sh(["dvc", "exp", "push", "origin", name], Path(work))


@task
def champion_data_version(uri: str, model_name: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    from covseg import registry

    mlflow.set_tracking_uri(uri)
    champion = registry.aliases(model_name).get(registry.CHAMPION)
    if champion is None:
        return ""
    return MlflowClient(uri).get_model_version(model_name, str(champion)).tags.get("data_version", "")


@task
def find_result(uri: str, experiment: str, run_id: str) -> dict:
    """The metrics of the MLflow run made under a Prefect flow run (tagged with its id)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{run_id}'") if exp else []
    if not runs:
        return {"flow_run_id": run_id, "kaggle_f1": None}
    versions = client.search_model_versions(f"run_id='{runs[0].info.run_id}'")
    return {"flow_run_id": run_id, "mlflow_run_id": runs[0].info.run_id,
            "model_version": int(versions[0].version) if versions else None,
            **{k: runs[0].data.metrics.get(k) for k in ("kaggle_f1", "f1_ggo", "f1_consolidation", "pooled_f1")}}


@task
def launch(deployment: str, parameters: dict) -> str:
    """One deployment run on the pool; waits for it and returns its id (raises if it did not complete)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2)
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ({run.id}) ended {run.state.type.value}: {run.state.message}")
    return str(run.id)


# ------------------------------------------------------------------------------- flows


def _params(repo: Path) -> dict:
    from covseg.config import load_params

    return load_params(repo / "params.yaml")


@flow(name="train", log_prints=True)
def train(overrides: dict | None = None, repo: str | None = None, promote: bool = True,
          only_if_data_changed: bool = False) -> dict:
    """One training run of the DVC pipeline with `overrides` (e.g. {"train.epochs": 3})."""
    t0 = time.time()
    repo_path = Path(repo or os.environ.get("COVSEG_REPO") or Path.cwd()).resolve()
    params = _params(repo_path)
    uri = tracking_uri(repo_path)
    name = f"{flow_run.get_name() or 'local'}-{int(t0)}".replace("_", "-")
    work = make_working_copy(str(repo_path))
    try:
        data = pull_data(work)
        if only_if_data_changed and data == champion_data_version(uri, params["registry"]["model_name"]):
            print(f"data version {data} is the champion's: nothing to retrain")
            return {"skipped": True, "data_version": data}
        result = run_pipeline(work, overrides or {}, name, uri)
        t_end = result.pop("pipeline_end")
        if promote:
            result["promotion"] = promotion_gate(work, result["model_version"], uri)
        push_results(work, name)
    finally:
        shutil.rmtree(Path(work).parent, ignore_errors=True)
    result.update(experiment=name, overrides=overrides or {},
                  overhead_before_pipeline_s=result.pop("pipeline_start") - t0,
                  overhead_after_pipeline_s=time.time() - t_end)
    print(f"{name}: kaggle_f1 {result['kaggle_f1']:.4f}, {params['registry']['model_name']} "
          f"v{result['model_version']}" + (f"; {result['promotion']['reason']}" if promote else ""))
    return result


def _fan_out(param_sets: list[dict], repo: Path, deployment: str | None) -> list[dict]:
    """Each param set as its own train run: deployment runs on the pool at once, or local subflows."""
    params = _params(repo)
    if not deployment:
        return [{**train(overrides=ps, repo=str(repo), promote=False), "params": ps} for ps in param_sets]
    futures = [launch.submit(deployment, {"overrides": ps, "repo": str(repo), "promote": False})
               for ps in param_sets]
    uri = tracking_uri(repo)
    return [{**find_result(uri, params["tracking"]["experiment"], f.result()), "params": ps}
            for f, ps in zip(futures, param_sets)]


@flow(name="sweep", log_prints=True)
def sweep(param_sets: list[dict], repo: str | None = None, deployment: str | None = "train/gpu",
          promote: bool = True) -> list[dict]:
    """Train every param set (in parallel over the pool's workers), tabulate, promote the best."""
    repo_path = Path(repo or os.environ.get("COVSEG_REPO") or Path.cwd()).resolve()
    table = results_table(_fan_out(param_sets, repo_path, deployment))
    print(table.to_string())
    rows = table.to_dict(orient="records")
    if promote and rows and rows[0].get("model_version"):
        work = make_working_copy(str(repo_path))
        try:
            pull_data(work)
            sh(["dvc", "repro", "preprocess"], Path(work))  # the validation data to compare on
            rows[0]["promotion"] = promotion_gate(work, int(rows[0]["model_version"]), tracking_uri(repo_path))
            print(rows[0]["promotion"]["reason"])
        finally:
            shutil.rmtree(Path(work).parent, ignore_errors=True)
    return rows


@flow(name="cross_validate", log_prints=True)
def cross_validate(folds: int = 5, overrides: dict | None = None, repo: str | None = None,
                   deployment: str | None = "train/gpu") -> dict:
    """k-fold cross-validation: fold i of `split.folds` = k as validation, all folds at once."""
    repo_path = Path(repo or os.environ.get("COVSEG_REPO") or Path.cwd()).resolve()
    sets = [{**(overrides or {}), "split.folds": folds, "split.fold": i} for i in range(folds)]
    rows = _fan_out(sets, repo_path, deployment)
    summary = {**fold_summary([r["kaggle_f1"] for r in rows]), "runs": rows}
    print(f"{folds}-fold kaggle_f1 {summary['kaggle_f1_mean']:.4f} +- {summary['kaggle_f1_std']:.4f}")
    return summary


if __name__ == "__main__":
    # python flows/pipeline.py train '{"train.epochs": 3}'   |   sweep '[{...}, {...}]'   |   cross_validate 5
    command, arg = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    if command == "train":
        print(json.dumps(train(overrides=json.loads(arg) if arg else None), indent=1, default=str))
    elif command == "sweep":
        print(json.dumps(sweep(json.loads(arg), deployment=os.environ.get("COVSEG_DEPLOYMENT")), indent=1, default=str))
    elif command == "cross_validate":
        print(json.dumps(cross_validate(int(arg or 5), deployment=os.environ.get("COVSEG_DEPLOYMENT")), indent=1,
                         default=str))
    else:
        raise SystemExit(f"unknown flow {command!r}: train, sweep or cross_validate")
