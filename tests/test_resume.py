"""End to end: a `dvc repro` killed during training resumes from its last epoch when run again."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from covseg.names import PATHS

pytestmark = pytest.mark.slow


def test_a_killed_dvc_repro_resumes_training(new_project, sh, tmp_path):
    project = new_project({"train.epochs": 200, "train.val_every": 50})
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
    assert 3 <= epoch < 200, f"the training was not caught mid-way (epoch {epoch})"
    assert not (project / PATHS.model).exists(), "a killed training publishes no model"

    out = sh("dvc repro", project)
    resumed_from = int(out.stdout.split("resuming from epoch ")[1].split()[0])
    assert resumed_from >= epoch
    history = pd.read_csv(project / PATHS.history)
    assert history["epoch"].tolist() == list(range(1, 201)), "the history is whole, earlier epochs included"
    assert (project / PATHS.model).is_file() and (project / PATHS.metrics).is_file()
