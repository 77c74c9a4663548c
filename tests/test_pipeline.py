"""End to end: the project's own dvc.yaml and params.yaml, run by DVC in a temporary git repo."""
import hashlib
import json

import numpy as np
import pytest
import yaml

from covseg.data import synthesize, write_raw

pytestmark = pytest.mark.slow


def digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(repro_project):
    return repro_project


def test_repro_writes_every_output(project, sh):
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for key in ("f1_ggo", "f1_consolidation", "kaggle_f1", "pooled_f1", "iou_ggo", "precision_consolidation"):
        assert 0 <= metrics[key] <= 1
    shown = json.loads(sh("dvc metrics show --json", project).stdout)
    assert shown[""]["data"]["reports/metrics.json"]["data"]["kaggle_f1"] == metrics["kaggle_f1"]
    lines = (project / "submission/submission.csv").read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 1 + 2 * 64 * 64 * 2
    assert np.load(project / "submission/test_masks.npy").shape == (2, 64, 64, 4)
    figures = {p.name for p in (project / "reports/evaluation").glob("*.png")}
    assert {"loss_curves.png", "confusion_matrix.png"} <= figures and len(figures) == 4
    history = (project / "reports/train_history.csv").read_text().splitlines()
    assert {"epoch", "train_loss", "val_loss", "lr", "val_f1_ggo", "val_dice_ggo", "val_kaggle_f1"} <= set(
        history[0].split(",")) and len(history) == 3
    assert json.loads((project / "reports/validation.json").read_text())["success"]
    plots = json.loads(sh("dvc plots show --json", project).stdout)["data"]
    assert {"Loss", "Validation F1 per class"} <= set(plots)
    assert any(key.endswith("confusion_matrix.png") for key in plots)
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout
    # metrics and history are small files in git; bulky outputs are DVC's
    status = sh("git status --porcelain --untracked-files=all", project).stdout
    assert "reports/metrics.json" in status and "reports/train_history.csv" in status
    assert "evaluation" not in status and "model.pt" not in status and "submission" not in status


def test_same_params_same_metrics(project, sh):
    def scores():
        metrics = json.loads((project / "reports/metrics.json").read_text())
        return {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "model_version")}

    before = scores()
    sh("dvc repro --force train evaluate", project)
    assert scores() == before
    sh("dvc repro", project)  # submit follows the retrained checkpoint


def test_editing_any_module_a_stage_runs_makes_dvc_status_name_it(project, sh, stage_modules):
    runs = stage_modules  # derived from the code's imports
    modules = sorted(set().union(*runs.values()))
    assert "src/covseg/stages/train.py" in modules and "src/covseg/cli.py" in modules
    for module in modules:
        path = project / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            out = sh("dvc status --json", project).stdout
        finally:
            path.write_text(original)
        changed = set(json.loads(out))
        expected = {stage for stage, files in runs.items() if module in files}
        assert expected <= changed, f"editing {module}: dvc status names {sorted(changed)}, not {sorted(expected)}"
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout


def test_queued_experiments_run_in_parallel_and_carry_their_metrics(project, sh):
    """DVC composes each experiment's params.yaml from conf/: a recipe (`-S recipe=fast`) and keys on top."""
    sh("git add -A && git commit -qm baseline", project)
    for lr, recipe in (("0.002", " -S recipe=fast"), ("0.003", "")):
        sh(f"dvc exp run --queue{recipe} -S train.lr={lr} -S train.epochs=1 -n lr-{lr.replace('.', '')}", project)
    # the queue's daemon and workers outlive `dvc queue start`: they must not hold this command's output open
    sh("dvc queue start -j 2 > /dev/null 2>&1 && sleep 2 && dvc queue status && dvc exp show --no-pager > /dev/null",
       project)
    sh("timeout 600 bash -c 'while dvc queue status | grep -qE \"Queued|Running\"; do sleep 3; done'", project)
    status = sh("dvc queue status", project).stdout
    assert status.count("Success") == 2, status
    rows = json.loads(sh("dvc exp show --json", project).stdout)
    found = {}
    for baseline in rows:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                metrics = rev["data"]["metrics"]["reports/metrics.json"]["data"]
                params = rev["data"]["params"]["params.yaml"]["data"]
                found[rev["name"]] = (params["train"]["lr"], metrics["kaggle_f1"], params["recipe"],
                                      params["train"]["optimizer"])
    assert {"lr-0002", "lr-0003"} <= set(found), found
    assert all(isinstance(f1, float) for _, f1, _, _ in found.values())
    assert found["lr-0002"][0] == 0.002
    assert found["lr-0002"][2:] == ("fast", "adam") and found["lr-0003"][2:] == ("default", "adamw")
    # each experiment's commit holds its metrics and history
    assert "kaggle_f1" in sh("git show refs/exps/$(git for-each-ref --format='%(refname)' refs/exps | "
                             "grep lr-0002 | sed 's#refs/exps/##'):reports/metrics.json", project).stdout
    diff = json.loads(sh("dvc exp diff lr-0002 lr-0003 --all --json", project).stdout)
    assert "kaggle_f1" in diff["metrics"]["reports/metrics.json"]
    assert diff["params"]["params.yaml"]["train.lr"] == {"old": 0.002, "new": 0.003, "diff": pytest.approx(0.001)}
    assert "Loss" in json.loads(sh("dvc plots diff lr-0002 lr-0003 --json", project).stdout)["data"]


def test_push_to_default_remote(project, sh):
    sh("dvc push -q", project)
    assert any((project / ".dvc-remote").rglob("*")), "data pushed to the default local remote"


def test_bad_data_stops_before_training_and_keeps_outputs(project, sh):
    guarded = [project / p for p in ("data/processed", "models/model.pt", "reports/metrics.json",
                                     "reports/evaluation", "submission/submission.csv")]
    before = {p: digest(p) for p in guarded}
    images, masks, test = synthesize(10, 2, 64, seed=9)
    images[3, 5:9, 5:9] = np.nan
    write_raw(project / "data/raw", images, masks, test)
    proc = sh("dvc repro", project, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "every pixel is finite" in out and "images_medseg.npy: slices 3 (nonfinite=16)" in out
    assert "Running stage 'train'" not in out
    assert {p: digest(p) for p in guarded} == before
    assert not json.loads((project / "reports/validation.json").read_text())["success"]
    # the last good data version is still in git and the DVC cache
    sh("git checkout data.dvc && dvc checkout --force data.dvc", project)
    out = sh("dvc repro", project).stdout  # only the validation report comes back (from DVC's run cache)
    assert "Stage 'validate' is cached" in out and "Running stage 'train'" not in out
    assert json.loads((project / "reports/validation.json").read_text())["success"]
    assert {p: digest(p) for p in guarded} == before


def test_bad_import_records_nothing(project, sh, tmp_path):
    bad = tmp_path / "bad"
    images, masks, test = synthesize(10, 2, 64, seed=9)
    write_raw(bad, np.clip((images + 1000) / 1400 * 255, 0, 255), masks, test)  # 0..255 export
    dvc_file, raw = (project / "data.dvc").read_text(), digest(project / "data/raw")
    proc = sh(f"covseg data import {bad}", project, check=False)
    assert proc.returncode == 1
    assert "air near -1000 HU" in proc.stderr and str(bad) in proc.stderr
    assert (project / "data.dvc").read_text() == dvc_file and digest(project / "data/raw") == raw


def test_import_records_a_new_data_version(project, sh, tmp_path):
    source = write_raw(tmp_path / "other", *synthesize(10, 3, 64, seed=5))
    old = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    sh(f"covseg data import {source}", project)
    new = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert new != old
    assert "data.dvc" not in sh("dvc status", project).stdout
