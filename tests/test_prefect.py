"""Prefect for real: a server, pools, the deployments of infra/prefect.yaml, process workers, runs."""
import json
import os
import sys
import time

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from covseg import shell
from covseg.names import ENV_DEPLOYMENT, ENV_REPO, ENV_TRACKING_URI, PATHS, PREDICT_REPORT_JSON

pytestmark = pytest.mark.slow


def _prefect(args, cwd, env, check=True):
    proc = shell.run(["prefect", *args], cwd, env, check=False, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _watch(run, cwd, env):
    """`prefect deployment run NAME --params JSON --watch`, as the README gives it; asserts it completed."""
    name, parameters = run
    done = _prefect(["deployment", "run", name, "--params", json.dumps(parameters), "--watch"], cwd, env)
    assert "Completed" in done.stdout, done.stdout[-3000:]


FLOW_RUNS = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[sys.argv[1]])))
    print(json.dumps([[r.state_name, str(r.id)] for r in runs]))
asyncio.run(main())
"""


def _flow_runs(flow_name, cwd, env):
    """[(state, id)] of the flow's runs, from the Prefect server in `env`."""
    return json.loads(shell.run([sys.executable, "-c", FLOW_RUNS, flow_name], cwd, env).stdout)


def _gone(pid, timeout=15):
    """Whether process `pid` has exited (and been reaped) within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def test_deployments_run_on_the_pools_workers(new_project, prefect_env, tmp_path):
    project = new_project({"train.epochs": 1, "split.folds": 2})  # 2 folds of 5 slices: a cross-validation is 2 runs
    server_env, workers = prefect_env
    env = {**server_env, ENV_REPO: str(project)}
    for pool in ("gpu", "control"):
        _prefect(["work-pool", "create", pool, "--type", "process"], project, env)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], project, env)
    shown = _prefect(["deployment", "ls"], project, env).stdout
    for deployment in ("train/gpu", "train/nightly", "cv_fold/gpu", "sweep/control", "cross_validate/control",
                       "predict/control", "predict-chunk/gpu"):
        assert deployment in shown, shown

    pins = ["", "1"]  # a CPU-only worker and a worker pinned to GPU 1 (no GPU here: both run on the CPU)
    started = shell.run(["bash", "infra/start-control-worker.sh"], project, env)
    assert "control started" in started.stdout
    control_pid = int((project / ".servers" / "worker-control.pid").read_text())
    try:
        with workers(env, "gpu", 2, pins):
            uri = env["MLFLOW_TRACKING_URI"]
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)

            # cross-validation as a user triggers it: the folds as cv_fold/gpu runs on the two gpu workers, their
            # logits and records collected into reports/cv/<recipe>/ of the checkout, then covseg calibrate there
            start = time.time()
            _watch(["cross_validate/control", {"overrides": []}], project, env)
            cv_time = time.time() - start
            cv_experiment = client.get_experiment_by_name("covseg-cv").experiment_id
            folds = client.search_runs([cv_experiment])
            assert sorted(r.data.tags["cv_fold"] for r in folds) == ["0", "1"]
            assert all(r.data.tags["prefect_flow_run_id"] for r in folds)
            for r in folds:
                k = r.data.tags["cv_fold"]
                listed = sorted(a.path for a in client.list_artifacts(r.info.run_id, "cv"))
                assert listed == [f"cv/fold{k}.json", f"cv/fold{k}.npz"], listed
            cv = project / PATHS.cv / "default"
            assert {"fold0.json", "fold0.npz", "fold1.json", "fold1.npz"} <= {p.name for p in cv.iterdir()}
            key = json.loads((cv / "fold0.json").read_text())["recipe"]
            entries = json.loads((project / PATHS.calibration).read_text())
            assert list(entries) == [key] and entries[key]["oof"]["folds"] == 2 and entries[key]["oof"]["slices"] == 10
            assert client.search_model_versions("name='covseg-unet'") == [], "a fold is a measurement, not a model"

            # the user commits the calibration; a training of the same recipe on every slice, triggered as a user
            # would, is registered with those out-of-fold scores and judged by the gate
            shell.run(["git", "add", PATHS.calibration], project)
            shell.run(["git", "commit", "-qm", "calibration"], project)
            start = time.time()
            done = _prefect(["deployment", "run", "train/gpu", "--params", json.dumps({"overrides": []}), "--watch"],
                            project, env)
            one_run = time.time() - start
            assert "Completed" in done.stdout, done.stdout
            runs = client.search_runs([client.get_experiment_by_name("covseg").experiment_id])
            assert len(runs) == 1 and runs[0].data.tags["prefect_flow_run_id"]
            assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 1
            version = client.get_model_version("covseg-unet", "1")
            assert version.tags["calibrated"] == "true" and version.tags["recipe_key"] == key
            oof = entries[key]["oof"]
            assert float(version.tags["oof_kaggle_f1"]) == pytest.approx(oof["kaggle_f1_mean"], abs=1e-5)
            decision = json.loads(version.tags["promotion"])
            aliases = client.get_registered_model("covseg-unet").aliases
            assert aliases == ({"challenger": "1", "champion": "1"} if decision["promoted"] else {"challenger": "1"})
            refs = shell.run(["git", "for-each-ref", "refs/exps"], project).stdout
            assert "refs/exps" in refs, "the experiment came back to the repository"

            # a bad override is refused before anything runs: no experiment, run or version; champion unchanged
            failed = _prefect(["deployment", "run", "train/gpu", "--params",
                               json.dumps({"overrides": ["dvc.yaml:stages.train.cmd=touch pwned"]}), "--watch"],
                              project, env, check=False)
            assert "Failed" in failed.stdout + failed.stderr
            assert shell.run(["git", "for-each-ref", "refs/exps"], project).stdout == refs
            assert len(client.search_runs([runs[0].info.experiment_id])) == 1
            assert len(client.search_model_versions("name='covseg-unet'")) == 1
            assert client.get_registered_model("covseg-unet").aliases == aliases

            # (sweep/control fans out these same cv_fold/gpu and train/gpu deployments: tests/test_flows.py)
            # each run used its worker's pinning, never a deployment's
            seen = [r.data.tags["cuda_visible_devices"]
                    for r in client.search_runs([runs[0].info.experiment_id, cv_experiment])]
            assert len(seen) == 3 and set(seen) <= set(pins), seen

            # batch prediction: 4 volumes in chunks of 1, each chunk a predict-chunk/gpu run on the gpu pool
            scans = tmp_path / "scans"
            scans.mkdir()
            rng = np.random.default_rng(0)
            for i in range(4):
                volume = rng.choice([-1000, -700, -200, 100], size=(48, 40, 3)).astype(np.int16)
                nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1])), scans / f"ct{i}.nii.gz")
            start = time.time()
            _watch(["predict/control", {"inputs": [str(scans)], "out": str(tmp_path / "pred"),
                                        "model": "models:/covseg-unet/1", "chunk_size": 1}], project, env)
            predict_time = time.time() - start
            report = json.loads((tmp_path / "pred" / PREDICT_REPORT_JSON).read_text())
            assert report["summary"]["failed"] == 0 and len(report["scans"]) == 4
            assert all(nib.load(tmp_path / "pred" / s["labels"]).shape == (48, 40, 3) for s in report["scans"])
            chunk_runs = _flow_runs("predict-chunk", project, env)
            assert len(chunk_runs) == 4 and all(state == "Completed" for state, _ in chunk_runs)
            for log in ("worker-0.log", "worker-1.log"):  # the pool's two workers share the batch
                took = (tmp_path / log).read_text()
                assert any(f"submitting flow run '{run_id}'" in took for _, run_id in chunk_runs), log
            print(f"cross-validation of 2 folds over 2 workers {cv_time:.0f}s; one run {one_run:.0f}s; "
                  f"4 volumes predicted in 4 chunks over 2 workers {predict_time:.0f}s")
    finally:
        shell.run(["bash", "infra/stop.sh"], project, env)
    assert _gone(control_pid), "infra/stop.sh stopped the control worker"


def test_cross_validate_runs_locally_without_a_server(new_project, tmp_path):
    project = new_project({"train.epochs": 1, "split.folds": 2})
    env = {k: None for k in os.environ if k.startswith(("PREFECT_API", ENV_DEPLOYMENT, ENV_REPO, ENV_TRACKING_URI))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"))  # no server; the project's own MLflow store
    proc = shell.run([sys.executable, "-m", "flows.pipeline", "cross_validate", "[]"], project, env,
                     check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert result["calibrated"] and [r["fold"] for r in result["per_fold"]] == [0, 1]
    entry = json.loads((project / PATHS.calibration).read_text())[result["recipe_key"]]
    assert entry["choices"] == result["choices"] and entry["oof"]["folds"] == 2
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    cv_experiment = client.get_experiment_by_name("covseg-cv").experiment_id
    assert sorted(r.data.tags["cv_fold"] for r in client.search_runs([cv_experiment])) == ["0", "1"]
    assert client.search_model_versions("name='covseg-unet'") == []
    # the folds landed where `covseg cv` keeps them: it has none left to train
    shell.run(["covseg", "cv"], project, env)
    assert len(client.search_runs([cv_experiment])) == 2
