"""End to end: the project's own dvc.yaml and params.yaml, run by DVC in a temporary git repo."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from covseg.data import synthesize, write_raw

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {"synth": {"n_labelled": 10, "n_test": 2, "size": 64},
        "model": {"base_channels": 4, "depth": 2},
        "train": {"epochs": 2, "scale": 1.0},
        "evaluate": {"overlays": 2}}


def run(cmd, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(root: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository with the project's pipeline files and shrunk params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "data.dvc", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    for folder in ("src", "flows", "infra"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, root / ".dvc" / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q && git config user.email t@t && git config user.name t", root)
    run("covseg data synth", root)
    run("git add -A && git commit -qm init", root)
    return root


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("e2e") / "project", TINY)
    run("dvc repro", root)
    return root


def test_repro_writes_every_output(project):
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for key in ("f1_ggo", "f1_consolidation", "kaggle_f1", "pooled_f1", "iou_ggo", "precision_consolidation"):
        assert 0 <= metrics[key] <= 1
    shown = json.loads(run("dvc metrics show --json", project).stdout)
    assert "kaggle_f1" in json.dumps(shown)
    lines = (project / "submission/submission.csv").read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 1 + 2 * 64 * 64 * 2
    assert np.load(project / "submission/test_masks.npy").shape == (2, 64, 64, 4)
    figures = {p.name for p in (project / "reports/evaluation").glob("*.png")}
    assert {"loss_curves.png", "confusion_matrix.png"} <= figures and len(figures) == 4
    history = (project / "reports/train_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,val_loss,lr,val_f1_ggo") and len(history) == 3
    report = json.loads((project / "reports/validation.json").read_text())
    assert report["success"]
    plots = json.loads(run("dvc plots show --json", project).stdout)["data"]
    assert {"Loss", "Validation F1 per class"} <= set(plots)
    assert any(key.endswith("confusion_matrix.png") for key in plots)
    assert "Data and pipelines are up to date" in run("dvc status", project).stdout


def test_same_params_same_metrics(project):
    def scores():
        metrics = json.loads((project / "reports/metrics.json").read_text())
        return {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "model_version")}

    before = scores()
    run("dvc repro --force train evaluate", project)
    assert scores() == before


def test_exp_run_sets_params(project):
    run("git add -A && git commit -qm baseline", project)
    run("dvc exp run -S train.epochs=1 -S train.lr=0.002", project)
    history = (project / "reports/train_history.csv").read_text().splitlines()
    assert len(history) == 2
    shown = run("dvc exp show --json", project).stdout
    assert "kaggle_f1" in shown and "0.002" in shown


def test_push_to_default_remote(project):
    run("dvc push -q", project)
    assert any((project / ".dvc-remote").rglob("*")), "data pushed to the default local remote"


def test_bad_data_stops_before_training_and_keeps_outputs(project):
    guarded = [project / p for p in ("data/processed", "models/model.pt", "reports/metrics.json",
                                     "reports/evaluation", "submission/submission.csv")]
    before = {p: digest(p) for p in guarded}
    images, masks, test = synthesize(10, 2, 64, seed=9)
    images[3, 5:9, 5:9] = np.nan
    write_raw(project / "data/raw", images, masks, test)
    proc = run("dvc repro", project, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "every pixel is finite" in out and "images_medseg.npy: slices 3 (nonfinite=16)" in out
    assert "Running stage 'train'" not in out
    assert {p: digest(p) for p in guarded} == before
    report = json.loads((project / "reports/validation.json").read_text())
    assert not report["success"]
    # the last good data version is still in git and the DVC cache
    run("git checkout data.dvc && dvc checkout --force data.dvc", project)
    out = run("dvc repro", project).stdout  # only the validation report is redone
    assert "Running stage 'validate'" in out and "Running stage 'train'" not in out
    assert {p: digest(p) for p in guarded} == before


def test_bad_import_records_nothing(project, tmp_path):
    bad = tmp_path / "bad"
    images, masks, test = synthesize(10, 2, 64, seed=9)
    write_raw(bad, np.clip((images + 1000) / 1400 * 255, 0, 255), masks, test)  # 0..255 export
    dvc_file, raw = (project / "data.dvc").read_text(), digest(project / "data/raw")
    proc = run(f"covseg data import {bad}", project, check=False)
    assert proc.returncode == 1
    assert "air near -1000 HU" in proc.stderr and str(bad) in proc.stderr
    assert (project / "data.dvc").read_text() == dvc_file and digest(project / "data/raw") == raw


def test_import_records_a_new_data_version(project, tmp_path):
    source = write_raw(tmp_path / "other", *synthesize(10, 3, 64, seed=5))
    old = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    run(f"covseg data import {source}", project)
    new = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert new != old
    assert "data.dvc" not in run("dvc status", project).stdout
