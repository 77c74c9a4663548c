"""Small library pieces: data import and the synthetic default, the command runner, MLflow queries."""
import uuid

import mlflow
import numpy as np
import pytest

from covseg import registry, shell, tracking
from covseg.data import load_raw, write_raw
from covseg.ingest import import_folder, write_synthetic
from covseg.names import CHAMPION, TAG_DATA_VERSION
from covseg.validation import ContractError


def test_import_checks_the_contract_before_copying(tmp_path, tiny_raw, tiny_arrays, params):
    result = import_folder(tiny_raw, tmp_path / "raw", params.validate_, dvc_file=None)
    assert result["report"]["success"] and result["data_version"] is None
    assert np.array_equal(load_raw(tmp_path / "raw").images, tiny_arrays[0])
    images, masks, test = (a.copy() for a in tiny_arrays)
    bad = write_raw(tmp_path / "bad", np.clip((images + 1000) / 1400, 0, 1), masks, test)
    with pytest.raises(ContractError, match="air near -1000 HU"):
        import_folder(bad, tmp_path / "raw2", params.validate_, dvc_file=None)
    assert not (tmp_path / "raw2").exists()


def test_synthetic_default_follows_its_params(tmp_path, params):
    s = params.override({"synth.n_labelled": 3, "synth.n_test": 2, "synth.size": 32}).synth
    write_synthetic(tmp_path / "raw", s, dvc_file=None)
    raw = load_raw(tmp_path / "raw")
    assert raw.images.shape == (3, 32, 32, 1) and raw.test_images.shape == (2, 32, 32, 1)


def test_command_errors_carry_the_output_and_env_none_removes(tmp_path, monkeypatch):
    with pytest.raises(shell.CommandError, match=r"(?s)failed \(3\).*boom"):
        shell.run(["bash", "-c", "echo boom; exit 3"], tmp_path)
    monkeypatch.setenv("COVSEG_TEST_VAR", "set")
    out = shell.run(["bash", "-c", "echo ${COVSEG_TEST_VAR:-unset}"], tmp_path, {"COVSEG_TEST_VAR": None}).stdout
    assert out.strip() == "unset"


def test_flow_run_lookup_takes_ids_only(mlflow_store):
    with pytest.raises(ValueError):
        tracking.find_flow_run_result(mlflow_store, "covseg", "x' or tags.a = 'b")
    found = tracking.find_flow_run_result(mlflow_store, "nosuch", str(uuid.uuid4()))
    assert found["kaggle_f1"] is None


def test_flow_run_lookup_and_champion_data_version(mlflow_store):
    flow_run_id = str(uuid.uuid4())
    tracking.configure("covseg", mlflow_store)
    with mlflow.start_run(tags={"prefect_flow_run_id": flow_run_id}) as run:
        mlflow.log_metrics({"kaggle_f1": 0.42, "f1_ggo": 0.5})
    found = tracking.find_flow_run_result(mlflow_store, "covseg", flow_run_id)
    assert found["mlflow_run_id"] == run.info.run_id and found["kaggle_f1"] == 0.42
    assert found["model_version"] is None
    assert registry.champion_data_version("covseg-unet", mlflow_store) == ""
    client = mlflow.MlflowClient(mlflow_store)
    client.create_registered_model("covseg-unet")
    version = client.create_model_version("covseg-unet", f"runs:/{run.info.run_id}/model", run.info.run_id,
                                          tags={TAG_DATA_VERSION: "md5-abc"}).version
    assert registry.champion_data_version("covseg-unet", mlflow_store) == ""
    client.set_registered_model_alias("covseg-unet", CHAMPION, version)
    assert registry.champion_data_version("covseg-unet", mlflow_store) == "md5-abc"
    assert tracking.find_flow_run_result(mlflow_store, "covseg", flow_run_id)["model_version"] == int(version)


def test_trainings_starting_at_once_share_the_experiment_one_of_them_creates(mlflow_store, monkeypatch):
    """8 trainings on a fresh server: each saw no experiment, one created it first; the others go on
    (found by the load test: RESOURCE_ALREADY_EXISTS failed 3 of 8 runs)."""
    tracking.configure("covseg", mlflow_store)  # another training created it meanwhile
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)  # what this one saw before
    tracking.configure("covseg", mlflow_store)
    created = mlflow.MlflowClient(mlflow_store).get_experiment_by_name("covseg")
    with mlflow.start_run() as run:
        assert run.info.experiment_id == created.experiment_id
