"""Each stage as a library function on tiny data, in process: what it writes and returns, what it tracks."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from covseg.atomic import staging_path
from covseg.cli import main
from covseg.errors import CovsegError
from covseg.model import load_checkpoint
from covseg.names import CV_METRICS, PATHS
from covseg.stages import evaluate, preprocess, register, submit, train, validate
from covseg.validation import ContractError

CHOICES = {"class_bias": [0.5, 0.0, 0.0, 0.0], "tta": True, "min_island": 0}


def entry(choices=CHOICES, score=0.6) -> dict:
    """A calibration entry as `covseg calibrate` writes it (values made up)."""
    means = {f"{m}_mean": score for m in CV_METRICS} | {f"{m}_std": 0.05 for m in CV_METRICS}
    return {"recipe": "default", "data": "d", "choices": choices,
            "oof": {"folds": 5, "slices": 12, "trivial_kaggle_f1": 0.05, **means}}


def evaluate_and_submit(p, calibration=PATHS.calibration):
    return (evaluate.run(PATHS.processed, PATHS.model, PATHS.history, PATHS.validation, calibration, PATHS.metrics,
                         PATHS.evaluation, p.evaluate, p.tracking),
            submit.run(PATHS.processed, PATHS.model, calibration, PATHS.submission, p.evaluate.batch_size, p.tracking))


def register_model(p, calibration=PATHS.calibration) -> dict:
    """`covseg register`, after the pipeline."""
    return register.run(PATHS.model, PATHS.metrics, calibration, PATHS.processed, p.registry, p.tracking)


@pytest.fixture
def pipeline(tmp_path, tiny_raw, tiny_params, mlflow_store, monkeypatch, tiny_folds):
    """The five stages, in order, in a project folder of their own (the shipped model: every labelled slice),
    its recipe calibrated (calibration.json), with the leftovers of a crashed older run beside the outputs of
    train and evaluate; returns the folder and results."""
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
    (tmp_path / PATHS.calibration).write_text(json.dumps({results["train"]["recipe_key"]: entry()}))
    results["evaluate"], results["submit"] = evaluate_and_submit(p)
    results["register"] = register_model(p)
    return tmp_path, results


def test_stages_write_and_return_their_outputs(pipeline, tiny_params):
    root, r = pipeline
    assert r["validate"]["success"] and json.loads((root / PATHS.validation).read_text())["success"]
    split = r["preprocess"]["split"]
    assert len(split["train_index"]) == 12 and split["val_index"] == [] and r["preprocess"]["contract"]["success"]
    assert r["train"]["best_epoch"] == 1 and (root / PATHS.model).is_file() and r["train"]["val_kaggle_f1"] is None
    history = pd.read_csv(root / PATHS.history)
    assert list(history["epoch"]) == [1] and "val_loss" not in history.columns, "nothing held out to score"
    metrics = json.loads((root / PATHS.metrics).read_text())
    assert metrics == r["evaluate"] and metrics["calibrated"] is True and "model_version" not in metrics
    assert r["register"] == {"model_version": 1, "mlflow_run_id": r["train"]["mlflow_run_id"], "new": True,
                             "calibrated": True}
    assert metrics["kaggle_f1"] == 0.6 and metrics["oof_slices"] == 12 and metrics["train_slices"] == 12
    assert "val_kaggle_f1" not in metrics, "the recipe's out-of-fold scores, never the model's on its own slices"
    evaluation = {p.name for p in (root / PATHS.evaluation).iterdir()}
    assert evaluation == {"loss_curves.png", "calibration.json"}, "a crashed run's staging is cleared, never merged"
    load_checkpoint(root / PATHS.model)  # this run's model, not the older run's half-written one
    assert r["submit"]["rows"] == 3 * 64 * 64 * 2 and np.load(r["submit"]["masks"]).shape == (3, 64, 64, 4)
    assert not list(root.rglob(".partial-*")), "no staging left behind"


def test_run_is_tracked_and_the_calibrated_model_registered(pipeline, mlflow_store):
    from covseg import modelstore

    root, r = pipeline
    client = MlflowClient(mlflow_store)
    run = client.get_run(r["train"]["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "1" and run.data.params["validate.hu_min"] == "-2000.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert run.data.metrics["kaggle_f1"] == 0.6 and run.data.tags["recipe_key"] == r["train"]["recipe_key"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "submission", "validation.json", "train_history.csv"} <= artifacts
    version = client.get_model_version("covseg-unet", "1")
    assert version.run_id == run.info.run_id and version.tags["calibrated"] == "true"
    assert float(version.tags["oof_kaggle_f1"]) == 0.6 and version.tags["oof_slices"] == "12"
    assert json.loads(version.tags["inference_choices"]) == CHOICES
    registered, _ = modelstore.load("models:/covseg-unet/1")
    assert (registered.class_bias, registered.tta, registered.min_island) == (CHOICES["class_bias"], True, 0)
    _, ckpt = load_checkpoint(root / PATHS.model)
    assert ckpt["mlflow_run_id"] == run.info.run_id and ckpt["recipe_key"] == r["train"]["recipe_key"]
    # provenance: what the version was trained on (every labelled slice)
    train_ids = json.loads((root / PATHS.processed / "split.json").read_text())["train_slice_ids"]
    assert version.tags["data_version"] == "0123abcd.dir" and len(train_ids) == 12
    assert version.tags["train_slice_ids"] == ",".join(map(str, sorted(train_ids)))
    assert version.tags["train_slices_count"] == "12" and len(version.tags["train_slices_sha256"]) == 64


def test_a_model_without_a_calibration_is_evaluated_with_neutral_choices_and_says_so(pipeline, tiny_params, capsys,
                                                                                  mlflow_store):
    root, r = pipeline
    capsys.readouterr()
    metrics, _ = evaluate_and_submit(tiny_params, calibration=root / "none.json")
    err = capsys.readouterr().err
    assert "no calibration for the model models/model.pt" in err and "`covseg cv` then `covseg calibrate`" in err
    assert metrics["calibrated"] is False and "kaggle_f1" not in metrics and metrics["choice_tta"] is False
    with pytest.raises(CovsegError, match="run `dvc repro` first"):  # metrics of the neutral choices
        register_model(tiny_params)
    neutral = register_model(tiny_params, calibration=root / "none.json")
    version = MlflowClient(mlflow_store).get_model_version("covseg-unet", str(neutral["model_version"]))
    assert neutral["model_version"] == 2 and neutral["new"] and version.tags["calibrated"] == "false"
    assert "oof_kaggle_f1" not in version.tags
    evaluate_and_submit(tiny_params)
    again = register_model(tiny_params)
    assert again["model_version"] == 1 and not again["new"], "the same calibrated model: its version, not a new one"


def test_register_refuses_a_model_it_cannot_trace(pipeline, tiny_params, tmp_path):
    root, r = pipeline
    with pytest.raises(CovsegError, match="not evaluate's metrics"):
        register.run(PATHS.model, root / "nope.json", PATHS.calibration, PATHS.processed, tiny_params.registry,
                     tiny_params.tracking)
    other = json.loads((root / PATHS.metrics).read_text()) | {"mlflow_run_id": "0" * 32}
    (root / "other.json").write_text(json.dumps(other))
    with pytest.raises(CovsegError, match="run `dvc repro` first, then register"):
        register.run(PATHS.model, root / "other.json", PATHS.calibration, PATHS.processed, tiny_params.registry,
                     tiny_params.tracking)
    inflated = json.loads((root / PATHS.metrics).read_text()) | {"kaggle_f1": 0.99}  # metrics.json edited by hand
    (root / "inflated.json").write_text(json.dumps(inflated))
    with pytest.raises(CovsegError, match="does not hold the out-of-fold scores calibration.json holds"):
        register.run(PATHS.model, root / "inflated.json", PATHS.calibration, PATHS.processed, tiny_params.registry,
                     tiny_params.tracking)
    (root / PATHS.dvc_file).write_text("outs:\n- md5: 4567ef.dir\n  path: data/raw\n")  # other data checked out
    with pytest.raises(CovsegError, match="trained on data version 0123abcd.dir, but data.dvc records 4567ef.dir"):
        register_model(tiny_params)


def test_a_held_out_fold_is_scored_with_the_calibrated_choices(tmp_path, tiny_raw, tiny_params, mlflow_store,
                                                                monkeypatch, tiny_folds):
    monkeypatch.chdir(tmp_path)
    p = tiny_params.override({"split.fold": 0})
    validate.run(tiny_raw, PATHS.validation, p.validate_)
    split = preprocess.run(tiny_raw, PATHS.processed, p.window, p.split, tiny_folds(p.split.folds),
                           PATHS.validation)["split"]
    trained = train.run(PATHS.processed, PATHS.model, PATHS.history, p.seed, p.model, p.train, p.tracking, p.flat())
    assert {"val_loss", "val_kaggle_f1"} <= set(pd.read_csv(PATHS.history).columns)
    neutral, _ = evaluate_and_submit(p, calibration=tmp_path / "none.json")
    assert neutral["val_kaggle_f1"] == pytest.approx(trained["val_kaggle_f1"]), "as training scored it: no choices"
    assert neutral["val_slices"] == len(split["val_index"]) > 0
    written = {f.name for f in Path(PATHS.evaluation).iterdir()}
    assert {"per_slice.csv", "confusion_matrix.png", "loss_curves.png"} <= written
    offset = entry({**CHOICES, "class_bias": [9, 0, 0, 0]})
    Path(PATHS.calibration).write_text(json.dumps({trained["recipe_key"]: offset}))
    biased, _ = evaluate_and_submit(p)
    assert biased["val_recall_ggo"] > neutral["val_recall_ggo"], "an offset of +9 calls ground glass everywhere"


def test_an_ensemble_is_trained_registered_and_served_as_one_model(tmp_path, tiny_raw, tiny_params, mlflow_store,
                                                                     monkeypatch, tiny_folds):
    from covseg import modelstore
    from covseg.model import Ensemble, predict_logits
    from covseg.preprocessing import load_processed

    monkeypatch.chdir(tmp_path)
    p = tiny_params.override({"train.members": 2})
    validate.run(tiny_raw, PATHS.validation, p.validate_)
    preprocess.run(tiny_raw, PATHS.processed, p.window, p.split, tiny_folds(p.split.folds), PATHS.validation)
    trained = train.run(PATHS.processed, PATHS.model, PATHS.history, p.seed, p.model, p.train, p.tracking, p.flat())
    assert pd.read_csv(PATHS.history)["member"].tolist() == [0, 1]
    Path(PATHS.calibration).write_text(json.dumps({trained["recipe_key"]: entry()}))
    evaluate_and_submit(p)
    version = register_model(p)["model_version"]
    local, _ = modelstore.load_calibrated(PATHS.model, PATHS.calibration)
    registered, _ = modelstore.load(f"models:/covseg-unet/{version}")
    assert isinstance(local.unet, Ensemble) and isinstance(registered.unet, Ensemble) and registered.tta
    x, _ = load_processed(PATHS.processed, "train")
    np.testing.assert_array_equal(predict_logits(registered, x[:2]), predict_logits(local, x[:2]))


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
