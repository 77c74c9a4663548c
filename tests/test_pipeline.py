"""End to end: the project's own dvc.yaml and params.yaml, run by DVC in a temporary git repo."""
import hashlib
import json

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

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
    # the tiny recipe has no entry in the project's calibration.json: neutral choices, no out-of-fold scores
    # (`covseg cv` and `covseg calibrate` make them), and every labelled slice trains (split.fold all)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["calibrated"] is False and metrics["train_slices"] == 10 and "model_version" not in metrics
    assert not {"kaggle_f1", "oof_slices"} & set(metrics) and not [k for k in metrics if k.startswith("val_")]
    assert (metrics["choice_class_bias"], metrics["choice_tta"], metrics["choice_min_island"]) == ([0.0] * 4, False, 0)
    shown = json.loads(sh("dvc metrics show --json", project).stdout)[""]["data"]["reports/metrics.json"]["data"]
    assert shown["calibrated"] is False and shown["train_slices"] == 10
    lines = (project / "submission/submission.csv").read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 1 + 2 * 64 * 64 * 2
    assert np.load(project / "submission/test_masks.npy").shape == (2, 64, 64, 4)
    # no held-out fold: loss curves only (no confusion matrix, overlays or per-slice table)
    assert {p.name for p in (project / "reports/evaluation").iterdir()} == {"loss_curves.png"}
    history = (project / "reports/train_history.csv").read_text().splitlines()
    columns = history[0].split(",")
    assert {"epoch", "train_loss", "lr"} <= set(columns) and not [c for c in columns if c.startswith("val_")]
    assert len(history) == 3
    assert json.loads((project / "reports/validation.json").read_text())["success"]
    plots = json.loads(sh("dvc plots show --json", project).stdout)
    assert plots["data"]["Loss"], f"no training loss per epoch in `dvc plots show`: {plots.get('errors')}"
    assert any(key.endswith("loss_curves.png") for key in plots["data"])
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout
    # metrics and history are small files in git; bulky outputs are DVC's
    status = sh("git status --porcelain --untracked-files=all", project).stdout
    assert "reports/metrics.json" in status and "reports/train_history.csv" in status
    assert "evaluation" not in status and "model.pt" not in status and "submission" not in status


def test_same_params_same_model(project, sh):
    """Trained again with the same params: the same metrics and the same predictions, pixel for pixel."""
    def scores():
        metrics = json.loads((project / "reports/metrics.json").read_text())
        return {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "model_version")}

    before, masks = scores(), digest(project / "submission/test_masks.npy")
    sh("dvc repro --force train evaluate", project)
    assert "Running stage 'submit'" in sh("dvc repro", project).stdout  # submit follows the retrained checkpoint
    assert scores() == before and digest(project / "submission/test_masks.npy") == masks


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
    """DVC composes each experiment's params.yaml from conf/: a recipe (`-S recipe=fast`) and keys on top;
    with a held-out fold (`-S split.fold=0`) each experiment carries its scores there and its plots."""
    sh("git add -A && git commit -qm baseline", project)
    for lr, recipe in (("0.002", " -S recipe=fast"), ("0.003", "")):
        sh(f"dvc exp run --queue{recipe} -S train.lr={lr} -S train.epochs=1 -S split.fold=0 "
           f"-n lr-{lr.replace('.', '')}", project)
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
                found[rev["name"]] = (params["train"]["lr"], metrics["val_kaggle_f1"], metrics["val_slices"],
                                      params["recipe"], params["train"]["optimizer"])
    assert {"lr-0002", "lr-0003"} <= set(found), found
    assert all(isinstance(f1, float) and slices == 2 for _, f1, slices, _, _ in found.values())
    assert found["lr-0002"][0] == 0.002
    assert found["lr-0002"][3:] == ("fast", "adam") and found["lr-0003"][3:] == ("default", "adamw")
    # each experiment's commit holds its metrics and history
    assert "val_kaggle_f1" in sh("git show refs/exps/$(git for-each-ref --format='%(refname)' refs/exps | "
                                 "grep lr-0002 | sed 's#refs/exps/##'):reports/metrics.json", project).stdout
    diff = json.loads(sh("dvc exp diff lr-0002 lr-0003 --all --json", project).stdout)
    assert "val_kaggle_f1" in diff["metrics"]["reports/metrics.json"]
    assert diff["params"]["params.yaml"]["train.lr"] == {"old": 0.002, "new": 0.003, "diff": pytest.approx(0.001)}
    plots = json.loads(sh("dvc plots diff lr-0002 lr-0003 --json", project).stdout)
    assert plots["data"]["Loss"], plots.get("errors")
    assert "val_kaggle_f1" in json.dumps(plots["data"]["reports/train_history.csv"])  # the held-out fold per epoch
    held_out = {key.rsplit("/", 1)[-1] for key in plots["data"] if key.startswith("reports/evaluation/")}
    assert {"confusion_matrix.png", "per_slice.csv"} <= held_out, held_out
    assert len([name for name in held_out if name.startswith("overlay_")]) == 2, held_out  # evaluate.overlays


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


# a tiny U-Net that learns within seconds, cross-validated in 2 folds of 5 slices
LEARNS = {"model.base_channels": 8, "train.epochs": 30, "train.lr": 0.01, "split.folds": 2,
          "registry.min_score": 0.1}


def test_the_readme_sequence_calibrates_without_retraining_then_promotes(new_project, sh):
    """The README's order on a fresh project: `dvc repro` and `covseg register` (no calibration yet: neutral
    choices, a warning, a version the gate refuses), `covseg cv`, `covseg calibrate --cv reports/cv/default`,
    `dvc repro` (evaluate and submit again, never train: the recipe's out-of-fold scores in the metrics),
    `covseg register`, `covseg promote` (the first champion)."""
    project = new_project(LEARNS)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    first = sh("dvc repro", project)
    assert "no calibration for the model models/model.pt" in first.stderr, first.stderr
    assert "`covseg cv` then `covseg calibrate`" in first.stderr
    uncalibrated = json.loads((project / "reports/metrics.json").read_text())
    assert uncalibrated["calibrated"] is False and "kaggle_f1" not in uncalibrated
    assert client.search_model_versions("name='covseg-unet'") == [], "the pipeline registers nothing"
    sh("covseg register", project)
    assert client.get_model_version("covseg-unet", "1").tags["calibrated"] == "false"
    refused = sh("covseg promote", project, check=False)
    assert refused.returncode == 1 and "covseg-unet v1 is not calibrated" in refused.stderr, refused.stderr
    assert "`covseg calibrate`" in refused.stderr and client.get_registered_model("covseg-unet").aliases == {}
    sh("git add -A && git commit -qm 'the pipeline, uncalibrated'", project)

    sh("covseg cv", project)
    assert {"fold0.npz", "fold1.npz", "summary.json"} <= {p.name for p in (project / "reports/cv/default").iterdir()}
    assert "Data and pipelines are up to date" in sh("dvc status", project).stdout, "cv leaves the pipeline alone"
    assert len(client.search_model_versions("name='covseg-unet'")) == 1, "a fold is a measurement, not a model"
    sh("covseg calibrate --cv reports/cv/default", project)
    entries = json.loads((project / "calibration.json").read_text())
    assert list(entries) == [uncalibrated["recipe_key"]], "cv measured the recipe the pipeline trained"
    entry = entries[uncalibrated["recipe_key"]]
    assert (entry["oof"]["folds"], entry["oof"]["slices"]) == (2, 10)

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(json.loads(sh("dvc status --json", project).stdout)) == {"evaluate", "submit"}
    second = sh("dvc repro", project).stdout
    assert "Running stage 'train'" not in second and "Stage 'train' didn't change, skipping" in second, second
    assert "Running stage 'evaluate'" in second and "Running stage 'submit'" in second
    relock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert relock["train"] == lock["train"], "the model is the one trained before"
    calibration_md5 = hashlib.md5((project / "calibration.json").read_bytes()).hexdigest()
    for stage in ("evaluate", "submit"):
        assert {"path": "calibration.json", "md5": calibration_md5} in [
            {k: d[k] for k in ("path", "md5")} for d in relock[stage]["deps"]], stage
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["calibrated"] is True and metrics["mlflow_run_id"] == uncalibrated["mlflow_run_id"]
    oof = entry["oof"]
    assert metrics["kaggle_f1"] == oof["kaggle_f1_mean"] and metrics["dice_ggo_std"] == oof["dice_ggo_std"]
    assert (metrics["oof_folds"], metrics["oof_slices"]) == (2, 10)
    assert metrics["trivial_kaggle_f1"] == oof["trivial_kaggle_f1"]
    assert metrics["choice_class_bias"] == entry["choices"]["class_bias"]
    assert metrics["choice_tta"] == entry["choices"]["tta"]
    shown = json.loads(sh("dvc metrics show --json", project).stdout)[""]["data"]["reports/metrics.json"]["data"]
    assert shown["kaggle_f1"] == metrics["kaggle_f1"]
    sh("covseg register --output registered.json", project)
    registered = json.loads((project / "registered.json").read_text())
    assert registered["model_version"] == 2 and registered["new"], "the calibrated model is a version of its own"
    assert client.get_model_version("covseg-unet", "2").tags["calibrated"] == "true"

    out = sh("covseg promote --output promotion.json", project).stdout
    decision = json.loads((project / "promotion.json").read_text())
    assert decision["promoted"] is True and decision["champion_after"] == 2, out
    assert decision["challenger_score"] == pytest.approx(metrics["kaggle_f1"], abs=1e-6)
    aliases = client.get_registered_model("covseg-unet").aliases
    assert {alias: int(v) for alias, v in aliases.items()} == {"challenger": 2, "champion": 2}
