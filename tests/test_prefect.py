"""Prefect: flow helpers as plain functions, and one real run on a `gpu` pool worker."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.pipeline import fold_summary, override_args, results_table  # noqa: E402
from servers import BIN, mlflow_server, prefect_server, prefect_workers  # noqa: E402
from test_pipeline import TINY, make_project  # noqa: E402


def test_override_args():
    assert override_args({"train.epochs": 3, "train.class_weights": [1, 2, 1, 1], "train.augment": False}) == [
        "-S", "train.augment=false", "-S", "train.class_weights=[1, 2, 1, 1]", "-S", "train.epochs=3"]
    assert override_args(None) == []


def test_results_table_best_first():
    table = results_table([{"kaggle_f1": 0.2, "v": 1}, {"kaggle_f1": None, "v": 3}, {"kaggle_f1": 0.5, "v": 2}])
    assert table["v"].tolist() == [2, 1, 3]


def test_fold_summary():
    s = fold_summary([0.4, 0.5, 0.6])
    assert s["kaggle_f1_mean"] == pytest.approx(0.5) and s["kaggle_f1_std"] == pytest.approx(0.1)
    assert s["folds"] == 3


def _prefect(args, cwd, env, check=True, timeout=600):
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_train_deployment_runs_on_gpu_pool_workers(tmp_path):
    project = make_project(tmp_path / "project", {**TINY, "train": {"epochs": 1, "scale": 1.0}})
    env = {"COVSEG_REPO": str(project)}
    with mlflow_server(tmp_path) as mlflow_uri, prefect_server(tmp_path, env):
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
        for pool in ("gpu", "control"):
            _prefect(["work-pool", "create", pool, "--type", "process"], project, env)
        _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], project, env)
        shown = _prefect(["deployment", "ls"], project, env).stdout
        assert "train/gpu" in shown and "train/nightly" in shown

        with prefect_workers(tmp_path, env, "gpu", count=2):
            # one run, triggered as a user would
            start = time.time()
            done = _prefect(["deployment", "run", "train/gpu", "--params", json.dumps({"overrides": {"train.epochs": 2}}),
                             "--watch"], project, env)
            one_run = time.time() - start
            assert "Completed" in done.stdout, done.stdout
            mlflow.set_tracking_uri(mlflow_uri)
            client = MlflowClient(mlflow_uri)
            runs = client.search_runs([client.get_experiment_by_name("covseg").experiment_id])
            assert len(runs) == 1 and runs[0].data.tags["prefect_flow_run_id"]
            assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
            assert client.get_registered_model("covseg-unet").aliases == {"challenger": "1", "champion": "1"}
            assert "refs/exps" in subprocess.run(["git", "for-each-ref"], cwd=project, capture_output=True,
                                                 text=True).stdout, "the experiment came back to the repository"

            # a failing run registers nothing and leaves the champion alone
            failed = _prefect(["deployment", "run", "train/gpu", "--params",
                               json.dumps({"overrides": {"train.loss": "bogus"}}), "--watch"], project, env, check=False)
            assert "Failed" in failed.stdout + failed.stderr
            assert len(client.search_model_versions("name='covseg-unet'")) == 1
            assert client.get_registered_model("covseg-unet").aliases["champion"] == "1"

            # a sweep fans out over both workers
            start = time.time()
            sets = [{"train.epochs": 2, "train.lr": lr} for lr in (0.002, 0.004)]
            proc = subprocess.run([sys.executable, "flows/pipeline.py", "sweep", json.dumps(sets)], cwd=project,
                                  env={**os.environ, **env, "COVSEG_DEPLOYMENT": "train/gpu"},
                                  capture_output=True, text=True, timeout=900)
            sweep_time = time.time() - start
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert len(client.search_model_versions("name='covseg-unet'")) == 3
            assert "promoted" in proc.stdout and "kaggle_f1" in proc.stdout
            print(f"one run {one_run:.0f}s; sweep of 2 over 2 workers {sweep_time:.0f}s")


@pytest.mark.slow
def test_cross_validate_runs_locally_without_a_server(tmp_path):
    project = make_project(tmp_path / "project", {**TINY, "train": {"epochs": 1, "scale": 1.0}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "COVSEG_DEPLOYMENT"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "flows/pipeline.py", "cross_validate", "3"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["folds"] == 3 and len(summary["runs"]) == 3
    assert sorted(r["params"]["split.fold"] for r in summary["runs"]) == [0, 1, 2]
    assert summary["kaggle_f1_min"] <= summary["kaggle_f1_mean"] <= summary["kaggle_f1_max"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name='covseg-unet'")) == 3
