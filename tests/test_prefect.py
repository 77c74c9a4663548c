"""Prefect for real: a server, pools, the deployments of infra/prefect.yaml, process workers, runs."""
import json
import os
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from covseg import shell
from covseg.names import ENV_DEPLOYMENT, ENV_REPO

pytestmark = pytest.mark.slow


def _prefect(args, cwd, env, check=True):
    proc = shell.run(["prefect", *args], cwd, env, check=False, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_deployment_runs_on_gpu_pool_workers(new_project, prefect_env):
    project = new_project({"train.epochs": 1})
    server_env, workers = prefect_env
    env = {**server_env, ENV_REPO: str(project)}
    for pool in ("gpu", "control"):
        _prefect(["work-pool", "create", pool, "--type", "process"], project, env)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], project, env)
    shown = _prefect(["deployment", "ls"], project, env).stdout
    assert "train/gpu" in shown and "train/nightly" in shown

    pins = ["", "1"]  # a CPU-only worker and a worker pinned to GPU 1 (no GPU here: both run on the CPU)
    with workers(env, "gpu", 2, pins):
        # one run, triggered as a user would
        start = time.time()
        done = _prefect(["deployment", "run", "train/gpu", "--params",
                         json.dumps({"overrides": {"train.epochs": 2}}), "--watch"], project, env)
        one_run = time.time() - start
        assert "Completed" in done.stdout, done.stdout
        uri = env["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("covseg").experiment_id])
        assert len(runs) == 1 and runs[0].data.tags["prefect_flow_run_id"]
        assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
        decision = json.loads(client.get_model_version("covseg-unet", "1").tags["promotion"])
        aliases = client.get_registered_model("covseg-unet").aliases
        assert aliases == ({"challenger": "1", "champion": "1"} if decision["promoted"] else {"challenger": "1"})
        refs = shell.run(["git", "for-each-ref", "refs/exps"], project).stdout
        assert "refs/exps" in refs, "the experiment came back to the repository"

        # a bad override is refused before anything runs: no experiment, run or version; champion unchanged
        failed = _prefect(["deployment", "run", "train/gpu", "--params",
                           json.dumps({"overrides": {"dvc.yaml:stages.train.cmd": "touch pwned"}}), "--watch"],
                          project, env, check=False)
        assert "Failed" in failed.stdout + failed.stderr
        assert shell.run(["git", "for-each-ref", "refs/exps"], project).stdout == refs
        assert len(client.search_runs([runs[0].info.experiment_id])) == 1
        assert len(client.search_model_versions("name='covseg-unet'")) == 1
        assert client.get_registered_model("covseg-unet").aliases == aliases

        # a sweep fans out over both workers and promotes the best
        start = time.time()
        sets = [{"train.epochs": 2, "train.lr": lr} for lr in (0.002, 0.004)]
        proc = shell.run([sys.executable, "-m", "flows.pipeline", "sweep", json.dumps(sets)], project,
                         {**env, ENV_DEPLOYMENT: "train/gpu"}, check=False, timeout=900)
        sweep_time = time.time() - start
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = json.loads(proc.stdout[proc.stdout.index("[\n"):])
        assert sorted(r["params"]["train.lr"] for r in rows) == [0.002, 0.004]
        for row in rows:  # each row is its own MLflow run's result
            assert client.get_run(row["mlflow_run_id"]).data.metrics["kaggle_f1"] == row["kaggle_f1"]
            assert client.get_run(row["mlflow_run_id"]).data.params["train.lr"] == str(row["params"]["train.lr"])
        assert rows[0]["promotion"]["challenger"] == rows[0]["model_version"]
        # each run used its worker's pinning, never a deployment's
        seen = [client.get_run(r.info.run_id).data.tags["cuda_visible_devices"]
                for r in client.search_runs([runs[0].info.experiment_id])]
        assert len(seen) == 3 and set(seen) <= set(pins), seen
        assert isinstance(rows[0]["promotion"]["promoted"], bool)
        assert len(client.search_model_versions("name='covseg-unet'")) == 3
        print(f"one run {one_run:.0f}s; sweep of 2 over 2 workers {sweep_time:.0f}s")


def test_cross_validate_runs_locally_without_a_server(new_project, tmp_path):
    project = new_project({"train.epochs": 1})
    env = {k: None for k in os.environ if k.startswith(("PREFECT_API", ENV_DEPLOYMENT, ENV_REPO))}  # removed
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = shell.run([sys.executable, "-m", "flows.pipeline", "cross_validate", "2"], project, env, check=False,
                     timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["folds"] == 2 and sorted(r["params"]["split.fold"] for r in summary["runs"]) == [0, 1]
    assert summary["kaggle_f1_mean"] == pytest.approx(sum(r["kaggle_f1"] for r in summary["runs"]) / 2)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name='covseg-unet'")) == 2
