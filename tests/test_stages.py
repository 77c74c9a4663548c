"""Each stage as a library function on tiny data, in process: what it writes and returns, what it tracks."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from covseg import registry
from covseg.atomic import staging_path
from covseg.cli import main
from covseg.errors import CovsegError
from covseg.model import load_checkpoint
from covseg.names import CHALLENGER, CHAMPION, PATHS
from covseg.stages import evaluate, preprocess, submit, train, validate
from covseg.validation import ContractError


@pytest.fixture
def pipeline(tmp_path, tiny_raw, tiny_params, mlflow_store, monkeypatch, tiny_folds):
    """The five stages, in order, in a project folder of their own, with the leftovers of a crashed
    older run beside the outputs of train and evaluate; returns the folder and results."""
    monkeypatch.chdir(tmp_path)
    staging_path(tmp_path / PATHS.model).parent.mkdir(parents=True)
    staging_path(tmp_path / PATHS.model).write_bytes(b"an older run's half-written model")
    staging_path(tmp_path / PATHS.evaluation).mkdir(parents=True)
    (staging_path(tmp_path / PATHS.evaluation) / "from_a_crashed_run.png").write_bytes(b"stale")
    (tmp_path / PATHS.dvc_file).write_text("outs:\n- md5: 0123abcd.dir\n  path: data/raw\n")  # the data version
    p = tiny_params
    results = {
        "validate": validate.run(tiny_raw, PATHS.validation, p.validate_),
        "preprocess": preprocess.run(tiny_raw, PATHS.processed, p.window, p.split, tiny_folds(p.split.folds),
                                     PATHS.validation),
        "train": train.run(PATHS.processed, PATHS.model, PATHS.history, p.seed, p.model, p.train, p.tracking,
                           p.flat()),
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
    evaluation = {p.name for p in (root / PATHS.evaluation).iterdir()}
    assert evaluation >= {"per_slice.csv", "loss_curves.png", "confusion_matrix.png"}
    assert "from_a_crashed_run.png" not in evaluation, "a crashed run's staging is cleared, never merged"
    load_checkpoint(root / PATHS.model)  # this run's model, not the older run's half-written one
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
    # provenance: what the version was trained on
    train_ids = json.loads((root / PATHS.processed / "split.json").read_text())["train_slice_ids"]
    assert version.tags["data_version"] == "0123abcd.dir"
    assert version.tags["train_slice_ids"] == ",".join(map(str, sorted(train_ids)))
    assert version.tags["train_slices_count"] == str(len(train_ids)) and len(version.tags["train_slices_sha256"]) == 64
    assert registry.provenance("covseg-unet", 1).train_slice_ids == set(train_ids)


def test_an_ensemble_is_trained_registered_and_served_as_one_model(tmp_path, tiny_raw, tiny_params, mlflow_store,
                                                                     monkeypatch, tiny_folds):
    from covseg import tracking
    from covseg.model import Ensemble, predict_logits
    from covseg.preprocessing import load_processed

    monkeypatch.chdir(tmp_path)
    p = tiny_params.override({"train.members": 2})
    validate.run(tiny_raw, PATHS.validation, p.validate_)
    preprocess.run(tiny_raw, PATHS.processed, p.window, p.split, tiny_folds(p.split.folds), PATHS.validation)
    trained = train.run(PATHS.processed, PATHS.model, PATHS.history, p.seed, p.model, p.train, p.tracking, p.flat())
    assert pd.read_csv(PATHS.history)["member"].tolist() == [0, 1]
    metrics = evaluate.run(PATHS.processed, PATHS.model, PATHS.history, PATHS.validation, PATHS.metrics,
                           PATHS.evaluation, p.evaluate, p.tracking, p.registry)
    local, _ = load_checkpoint(PATHS.model)
    registered = tracking.load_model(f"models:/covseg-unet/{metrics['model_version']}")
    assert isinstance(local.unet, Ensemble) and isinstance(registered.unet, Ensemble)
    x_val, _ = load_processed(PATHS.processed, "val")
    np.testing.assert_array_equal(predict_logits(registered, x_val), predict_logits(local, x_val))
    assert metrics["kaggle_f1"] == pytest.approx(trained["val_kaggle_f1"]), "evaluate scores the ensemble"


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
    assert main(["preprocess", "--raw", str(tiny_raw)]) == 1, "no folds file yet"
    out, err = capsys.readouterr()
    assert "raw_data: all" in out and "no folds file; run `covseg folds`" in err
    assert main(["folds", "--raw", str(tiny_raw)]) == 0
    assert main(["preprocess", "--raw", str(tiny_raw)]) == 0
    out = capsys.readouterr().out
    assert "train / " in out and (tmp_path / PATHS.processed / "split.json").is_file()


# ----------------------------------------------------------------------------- the promotion gate


@pytest.fixture
def three_versions(pipeline, mlflow_store):
    """Versions 1..3 of covseg-unet (the same weights and provenance; the gate is fed fake scores)."""
    import mlflow

    root, r = pipeline
    run_id = r["train"]["mlflow_run_id"]
    uri = f"runs:/{run_id}/model"
    mlflow.set_tracking_uri(mlflow_store)
    train_ids = r["preprocess"]["split"]["train_slice_ids"]
    for _ in range(2):
        version = int(mlflow.register_model(uri, "covseg-unet").version)
        registry.record_provenance("covseg-unet", version, run_id, "0123abcd.dir", train_ids)
    return root


def _reg(min_score=0.1):
    from covseg.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / PATHS.params)
    return params.override({"registry.min_score": min_score, "registry.min_eval_slices": 1,
                            "registry.lock_settle_s": 1.0}).registry


def _gate(version, scores, min_score=0.1, floor=0.05):
    scorer = registry.Scorer([10_000], lambda uri, ids: scores[int(uri.rsplit("/", 1)[1])], lambda ids: floor)
    return registry.promote(_reg(min_score), scorer, version)


def test_a_first_champion_must_pass_min_score_and_the_constant_predictor(three_versions):
    weak = _gate(1, {1: 0.08})
    assert weak["promoted"] is False and "below registry.min_score 0.1" in weak["reason"]
    assert CHAMPION not in registry.aliases("covseg-unet")
    trivial = _gate(2, {2: 0.3}, floor=0.3)
    assert trivial["promoted"] is False and "does not beat the constant predictor (0.3000)" in trivial["reason"]
    assert CHAMPION not in registry.aliases("covseg-unet")
    assert _gate(3, {3: 0.35}, floor=0.3)["promoted"] is True


def test_challenger_alias_moves_only_once_the_version_is_scored(three_versions):
    _gate(1, {1: 0.4})

    def broken(uri, ids):
        raise RuntimeError("scoring failed")

    with pytest.raises(RuntimeError):
        registry.promote(_reg(), registry.Scorer([10_000], broken), 2)
    assert registry.aliases("covseg-unet") == {CHALLENGER: 1, CHAMPION: 1}


def test_gate_promotes_only_past_the_margin(three_versions):
    first = _gate(1, {1: 0.40})
    assert first["promoted"] is True and first["reason"].startswith("promoted: no champion yet")
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
    decision = registry.set_champion(_reg(), 1)
    assert decision["champion_before"] == 3 and registry.aliases("covseg-unet")[CHAMPION] == 1
    with pytest.raises(CovsegError, match="--force needs --version"):
        registry.run_promotion(PATHS.processed, tiny_params.registry, tiny_params.evaluate, tiny_params.tracking,
                               "cpu", None, force=True)


def test_gate_scores_registered_models_on_the_validation_data(three_versions, tiny_params):
    reg = tiny_params.registry.model_copy(update={"min_eval_slices": 1, "lock_settle_s": 1.0})
    decision = registry.run_promotion(PATHS.processed, reg, tiny_params.evaluate, tiny_params.tracking, "cpu",
                                      version=2)
    metrics = json.loads((three_versions / PATHS.metrics).read_text())
    assert decision["challenger_score"] == pytest.approx(metrics["kaggle_f1"])
    floor = max(tiny_params.registry.min_score, metrics["trivial_kaggle_f1"])
    assert decision["promoted"] is (metrics["kaggle_f1"] > floor)
    assert registry.aliases("covseg-unet").get(CHAMPION) == (2 if decision["promoted"] else None)
    assert decision["eval_slice_ids"] == r_val_ids(three_versions)


def r_val_ids(root):
    return json.loads((root / PATHS.processed / "split.json").read_text())["val_slice_ids"]


def test_gate_never_scores_a_model_on_slices_it_was_trained_on(three_versions, tiny_params):
    """A model trained on fold 0's split, gated on fold 1's validation slices (a sweep or a cross-
    validation fold): they were all in its training set, so there is nothing fair to score it on."""
    from covseg.data import load_raw, one_hot_to_index
    from covseg.preprocessing import assign_folds
    from covseg.preprocessing import preprocess as write_processed

    p = tiny_params
    other = three_versions / "processed-fold1"
    raw = load_raw(three_versions / "raw")
    fold_of = assign_folds(one_hot_to_index(raw.masks), p.split.folds, p.seed)
    write_processed(raw, other, p.window, p.split.model_copy(update={"fold": 1}), fold_of)
    reg = p.registry.model_copy(update={"min_eval_slices": 1, "lock_settle_s": 1.0})
    with pytest.raises(CovsegError, match=r"only 0 of the \d+ validation slices were seen by neither version "
                                          r"\(trained: v2 on \d+ slices\)"):
        registry.run_promotion(other, reg, p.evaluate, p.tracking, "cpu", version=2)
    assert registry.aliases("covseg-unet") == {}, "not scored, nothing moved"


# ----------------------------------------------------------------------------- stages refuse unchecked data


def test_preprocess_refuses_data_whose_contract_was_never_checked(tmp_path, tiny_raw, tiny_params, tiny_folds):
    p = tiny_params
    with pytest.raises(CovsegError, match="no validation report"):
        preprocess.run(tiny_raw, tmp_path / "out", p.window, p.split, tiny_folds(p.split.folds),
                       tmp_path / "missing.json")
    assert not (tmp_path / "out").exists()


def test_preprocess_refuses_data_that_failed_or_changed_since_validation(tmp_path, tiny_raw, tiny_arrays,
                                                                         tiny_params, tiny_folds):
    from covseg.data import write_raw

    p = tiny_params
    report = tmp_path / "validation.json"
    validate.run(tiny_raw, report, p.validate_)
    images, masks, test = (a.copy() for a in tiny_arrays)
    images[2, :4, :4] = np.nan
    write_raw(tiny_raw, images, masks, test)  # changed after the check
    with pytest.raises(CovsegError, match="was made for other data"):
        preprocess.run(tiny_raw, tmp_path / "out", p.window, p.split, tiny_folds(p.split.folds), report)
    with pytest.raises(ContractError):
        validate.run(tiny_raw, report, p.validate_)
    with pytest.raises(CovsegError, match="failed the data contract"):
        preprocess.run(tiny_raw, tmp_path / "out", p.window, p.split, tiny_folds(p.split.folds), report)
    assert not (tmp_path / "out").exists()


def test_processed_contract_catches_non_finite_values(tmp_path, tiny_raw, tiny_params, tiny_folds):
    from covseg.data import load_raw
    from covseg.preprocessing import preprocess as write_processed
    from covseg.preprocessing import read_folds
    from covseg.validation import validate_processed

    p = tiny_params
    out = tmp_path / "processed"
    raw = load_raw(tiny_raw)
    write_processed(raw, out, p.window, p.split, read_folds(tiny_folds(p.split.folds), raw))
    images = np.load(out / "train_images.npy")
    images[0, :3, :3] = np.nan
    np.save(out / "train_images.npy", images)
    with pytest.raises(ContractError, match=r"train_images\.npy: slices 0 \(nonfinite=9\)"):
        validate_processed(out, p.split.folds, 12, 12)
