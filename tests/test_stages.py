"""Each stage as a library function on tiny data, in process: what it writes and returns, what it tracks."""
import json

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from covseg import registry
from covseg.cli import main
from covseg.errors import CovsegError
from covseg.model import load_checkpoint
from covseg.names import CHALLENGER, CHAMPION, PATHS
from covseg.stages import evaluate, preprocess, submit, train, validate
from covseg.validation import ContractError


@pytest.fixture
def pipeline(tmp_path, tiny_raw, tiny_params, mlflow_store, monkeypatch):
    """The five stages, in order, in a project folder of their own; returns the folder and results."""
    monkeypatch.chdir(tmp_path)
    p = tiny_params
    results = {
        "validate": validate.run(tiny_raw, PATHS.validation, p.validate_),
        "preprocess": preprocess.run(tiny_raw, PATHS.processed, p.window, p.split, p.seed),
        "train": train.run(PATHS.processed, PATHS.model, PATHS.history, p),
    }
    results["evaluate"] = evaluate.run(PATHS.processed, PATHS.model, PATHS.history, PATHS.validation,
                                       PATHS.metrics, PATHS.evaluation, p.evaluate, p.tracking, p.registry)
    results["submit"] = submit.run(PATHS.processed, PATHS.model, PATHS.submission, p.evaluate.batch_size,
                                   p.tracking)
    return tmp_path, results


def test_stages_write_and_return_their_outputs(pipeline, tiny_params):
    root, r = pipeline
    assert r["validate"]["success"] and json.loads((root / PATHS.validation).read_text())["success"]
    split = r["preprocess"]["split"]
    assert len(split["train_index"]) + len(split["val_index"]) == 12 and r["preprocess"]["contract"]["success"]
    assert r["train"]["best_epoch"] == 1 and (root / PATHS.model).is_file()
    history = pd.read_csv(root / PATHS.history)
    assert list(history["epoch"]) == [1] and {"train_loss", "val_loss", "val_kaggle_f1"} <= set(history.columns)
    metrics = json.loads((root / PATHS.metrics).read_text())
    assert metrics == r["evaluate"] and metrics["model_version"] == 1
    assert metrics["val_slices"] == len(split["val_index"])
    assert {p.name for p in (root / PATHS.evaluation).iterdir()} >= {"per_slice.csv", "loss_curves.png",
                                                                     "confusion_matrix.png"}
    assert r["submit"]["rows"] == 3 * 64 * 64 * 2 and np.load(r["submit"]["masks"]).shape == (3, 64, 64, 4)
    assert not list(root.rglob(".partial-*")), "no staging left behind"


def test_run_is_tracked_and_registered(pipeline, mlflow_store):
    root, r = pipeline
    client = MlflowClient(mlflow_store)
    run = client.get_run(r["train"]["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "1" and run.data.params["validate.hu_min"] == "-2000.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    assert run.data.metrics["kaggle_f1"] == pytest.approx(r["evaluate"]["kaggle_f1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "submission", "validation.json", "train_history.csv"} <= artifacts
    version = client.get_model_version("covseg-unet", "1")
    assert version.run_id == run.info.run_id and float(version.tags["kaggle_f1"]) == pytest.approx(
        r["evaluate"]["kaggle_f1"], abs=1e-6)
    _, ckpt = load_checkpoint(root / PATHS.model)
    assert ckpt["mlflow_run_id"] == run.info.run_id


def test_failed_contract_writes_the_report_and_nothing_else(tmp_path, tiny_arrays, tiny_params):
    from covseg.data import write_raw

    images, masks, test = (a.copy() for a in tiny_arrays)
    images[2, :4, :4] = np.nan
    bad = write_raw(tmp_path / "bad", images, masks, test)
    with pytest.raises(ContractError, match=r"images_medseg\.npy: slices 2 \(nonfinite=16\)"):
        validate.run(bad, tmp_path / "report.json", tiny_params.validate_)
    assert not json.loads((tmp_path / "report.json").read_text())["success"]


def test_cli_runs_the_same_stage_functions(tmp_path, tiny_raw, tiny_params, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params.tree()))
    assert main(["validate", "--raw", str(tiny_raw)]) == 0
    assert main(["preprocess", "--raw", str(tiny_raw)]) == 0
    out = capsys.readouterr().out
    assert "raw_data: all" in out and "train / " in out and (tmp_path / PATHS.processed / "split.json").is_file()


# ----------------------------------------------------------------------------- the promotion gate


@pytest.fixture
def three_versions(pipeline, mlflow_store):
    """Versions 1..3 of covseg-unet (the same weights; the gate is fed fake scores)."""
    import mlflow

    root, r = pipeline
    uri = f"runs:/{r['train']['mlflow_run_id']}/model"
    mlflow.set_tracking_uri(mlflow_store)
    for _ in range(2):
        mlflow.register_model(uri, "covseg-unet")
    return root


def _gate(version, scores):
    return registry.promote("covseg-unet", lambda uri: scores[int(uri.rsplit("/", 1)[1])], 0.005, "kaggle_f1",
                            version)


def test_gate_promotes_only_past_the_margin(three_versions):
    first = _gate(1, {1: 0.40})
    assert first["promoted"] is True and first["reason"] == "promoted: no champion yet"
    assert registry.aliases("covseg-unet") == {CHALLENGER: 1, CHAMPION: 1}
    close = _gate(2, {1: 0.40, 2: 0.404})
    assert close["promoted"] is False and close["reason"].startswith("not promoted: kaggle_f1 0.4040 vs champion v1")
    assert registry.aliases("covseg-unet") == {CHALLENGER: 2, CHAMPION: 1}
    better = _gate(3, {1: 0.40, 3: 0.45})
    assert better["promoted"] is True and better["champion_before"] == 1 and better["champion_after"] == 3
    assert registry.aliases("covseg-unet")[CHAMPION] == 3
    same = _gate(3, {3: 0.45})
    assert same["promoted"] is False and "already the champion" in same["reason"]
    recorded = MlflowClient().get_model_version("covseg-unet", "2")
    assert json.loads(recorded.tags["promotion"])["promoted"] is False
    assert recorded.description.startswith("not promoted")


def test_roll_back_by_hand_and_force_needs_a_version(three_versions, tiny_params):
    _gate(3, {3: 0.5})
    decision = registry.set_champion("covseg-unet", 1)
    assert decision["champion_before"] == 3 and registry.aliases("covseg-unet")[CHAMPION] == 1
    with pytest.raises(CovsegError, match="--force needs --version"):
        registry.run_promotion(PATHS.processed, tiny_params.registry, tiny_params.evaluate, tiny_params.tracking,
                               "cpu", None, force=True)


def test_gate_scores_registered_models_on_the_validation_data(three_versions, tiny_params):
    decision = registry.run_promotion(PATHS.processed, tiny_params.registry, tiny_params.evaluate,
                                      tiny_params.tracking, "cpu", version=2)
    metrics = json.loads((three_versions / PATHS.metrics).read_text())
    assert decision["promoted"] is True
    assert decision["challenger_score"] == pytest.approx(metrics["kaggle_f1"])
