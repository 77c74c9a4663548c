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
from covseg.names import ENV_DEPLOYMENT, ENV_REPO, PREDICT_REPORT_JSON

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
    project = new_project({"train.epochs": 1})
    server_env, workers = prefect_env
    env = {**server_env, ENV_REPO: str(project)}
    for pool in ("gpu", "control"):
        _prefect(["work-pool", "create", pool, "--type", "process"], project, env)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], project, env)
    shown = _prefect(["deployment", "ls"], project, env).stdout
    for deployment in ("train/gpu", "train/nightly", "sweep/control", "cross_validate/control", "predict/control",
                       "predict-chunk/gpu"):
        assert deployment in shown, shown

    pins = ["", "1"]  # a CPU-only worker and a worker pinned to GPU 1 (no GPU here: both run on the CPU)
    started = shell.run(["bash", "infra/start-control-worker.sh"], project, env)
    assert "control started" in started.stdout
    control_pid = int((project / ".servers" / "worker-control.pid").read_text())
    try:
        with workers(env, "gpu", 2, pins):
            # one run, triggered as a user would
            start = time.time()
            done = _prefect(["deployment", "run", "train/gpu", "--params",
                             json.dumps({"overrides": ["train.epochs=2"]}), "--watch"], project, env)
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
                               json.dumps({"overrides": ["dvc.yaml:stages.train.cmd=touch pwned"]}), "--watch"],
                              project, env, check=False)
            assert "Failed" in failed.stdout + failed.stderr
            assert shell.run(["git", "for-each-ref", "refs/exps"], project).stdout == refs
            assert len(client.search_runs([runs[0].info.experiment_id])) == 1
            assert len(client.search_model_versions("name='covseg-unet'")) == 1
            assert client.get_registered_model("covseg-unet").aliases == aliases

            # the README's fan-out deployments, run by the control pool's worker on the gpu pool's two workers
            start = time.time()
            sets = [["train.epochs=2", f"train.lr={lr}"] for lr in (0.002, 0.004)]
            _watch(["sweep/control", {"param_sets": sets}], project, env)
            sweep_time = time.time() - start
            experiment = runs[0].info.experiment_id
            swept = [r for r in client.search_runs([experiment]) if r.info.run_id != runs[0].info.run_id]
            assert sorted(float(r.data.params["train.lr"]) for r in swept) == [0.002, 0.004]
            versions = client.search_model_versions("name='covseg-unet'")
            assert len(versions) == 3
            f1 = {r.info.run_id: r.data.metrics["kaggle_f1"] for r in swept}
            gated = [v for v in versions if v.run_id in f1 and "promotion" in v.tags]
            assert len(gated) == 1, "the sweep sends its best version, and only it, to the gate"
            assert f1[gated[0].run_id] == max(f1.values())
            assert client.get_registered_model("covseg-unet").aliases["challenger"] == gated[0].version

            before = {r.info.run_id for r in client.search_runs([runs[0].info.experiment_id])}
            _watch(["cross_validate/control", {"folds": [0, 1], "overrides": ["train.epochs=1"]}], project, env)
            folds = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.info.run_id not in before]
            assert sorted(r.data.params["split.fold"] for r in folds) == ["0", "1"]
            assert len(client.search_model_versions("name='covseg-unet'")) == 5

            # each run used its worker's pinning, never a deployment's
            seen = [r.data.tags["cuda_visible_devices"] for r in client.search_runs([runs[0].info.experiment_id])]
            assert len(seen) == 5 and set(seen) <= set(pins), seen

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
            print(f"one run {one_run:.0f}s; sweep of 2 over 2 workers {sweep_time:.0f}s; "
                  f"4 volumes predicted in 4 chunks over 2 workers {predict_time:.0f}s")
    finally:
        shell.run(["bash", "infra/stop.sh"], project, env)
    assert _gone(control_pid), "infra/stop.sh stopped the control worker"


def test_cross_validate_runs_locally_without_a_server(new_project, tmp_path):
    project = new_project({"train.epochs": 1})
    env = {k: None for k in os.environ if k.startswith(("PREFECT_API", ENV_DEPLOYMENT, ENV_REPO))}  # removed
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = shell.run([sys.executable, "-m", "flows.pipeline", "cross_validate", "[]", "[0, 1]"], project, env,
                     check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["folds"] == 2 and sorted(r["params"][-1] for r in summary["runs"]) == ["split.fold=0",
                                                                                        "split.fold=1"]
    assert summary["kaggle_f1_mean"] == pytest.approx(sum(r["kaggle_f1"] for r in summary["runs"]) / 2)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name='covseg-unet'")) == 2
