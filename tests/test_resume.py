"""End to end: what a failed or killed `dvc repro` leaves, how training resumes and how the last good outputs
come back (docs/operations.md, "When a run fails or is killed")."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from covseg.names import PATHS

pytestmark = pytest.mark.slow


def test_a_killed_dvc_repro_resumes_training(new_project, sh, tmp_path):
    epochs = 50  # every labelled slice trains (split.fold all): no validation between epochs
    project = new_project({"train.epochs": epochs})
    sh("dvc repro preprocess", project)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=env, stdout=log, stderr=log,
                                start_new_session=True)
    state, epoch, deadline = project / PATHS.train_state, 0, time.time() + 300
    while epoch < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if state.is_file():
            epoch = torch.load(state, weights_only=True)["epoch"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= epoch < epochs, f"the training was not caught mid-way (epoch {epoch})"
    assert not (project / PATHS.model).exists(), "a killed training publishes no model"

    out = sh("dvc repro", project)
    resumed_from = int(out.stdout.split("resuming from epoch ")[1].split()[0])
    assert resumed_from >= epoch
    history = pd.read_csv(project / PATHS.history)
    assert history["epoch"].tolist() == list(range(1, epochs + 1)), "the history is whole, earlier epochs included"
    assert (project / PATHS.model).is_file() and (project / PATHS.metrics).is_file()


def test_the_last_good_outputs_come_back_after_a_failed_training(new_project, sh, mlflow_store):
    project = new_project({"train.epochs": 1})
    client = MlflowClient(mlflow_store)
    outputs = [project / p for p in (PATHS.model, PATHS.history, PATHS.metrics)]

    def md5s():
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else None for p in outputs}

    def runs():
        return (len(client.search_runs([client.get_experiment_by_name("covseg").experiment_id])),
                len(client.search_model_versions("name='covseg-unet'")))

    sh("dvc repro && git add -A && git commit -qm good", project)
    good, good_runs = md5s(), runs()

    # a failed training: a warm start from a checkpoint that is not there
    sh("sed -i 's|^  init: .*|  init: models/missing.pt|' params.yaml", project)
    failed = sh("dvc repro", project, check=False)
    assert failed.returncode != 0 and "No such file or directory: 'models/missing.pt'" in failed.stdout + failed.stderr
    assert md5s() == {**good, "model.pt": None, "train_history.csv": None}, "DVC removed train's outputs first"
    assert "deleted:            models/model.pt" in sh("dvc status", project).stdout

    # the recovery the README gives: the outputs dvc.lock records, from the DVC cache and git
    sh("dvc checkout && git checkout reports/train_history.csv", project)
    assert md5s() == good
    status = sh("dvc status", project).stdout
    assert "deleted" not in status and "modified:           train" in status, status  # the edit is still there
    sh("git checkout params.yaml", project)
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout

    # another training, then the edit reverted: the run cache restores the good outputs without training
    sh("sed -i 's|^  lr: .*|  lr: 0.003|' params.yaml && dvc repro", project)
    assert md5s()["model.pt"] != good["model.pt"]
    trained_runs = runs()
    restored = sh("git checkout params.yaml && dvc repro", project).stdout
    assert "Stage 'train' is cached - skipping run" in restored and "Running stage 'train'" not in restored
    assert "Stage 'evaluate' is cached - skipping run" in restored, restored
    assert md5s() == good and runs() == trained_runs, "no training, no new MLflow run"
    assert trained_runs == (good_runs[0] + 2, 0)  # the failed run and the lr=0.003 run; the pipeline registers none
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout
    # registering is a step of its own: the restored model is registered though DVC ran no stage
    sh("covseg register --output registered.json", project)
    registered = json.loads((project / "registered.json").read_text())
    assert registered["mlflow_run_id"] == json.loads((project / PATHS.metrics).read_text())["mlflow_run_id"]
    version = client.get_model_version("covseg-unet", str(registered["model_version"]))
    assert version.run_id == registered["mlflow_run_id"]
