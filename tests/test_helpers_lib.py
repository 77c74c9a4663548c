"""Small library pieces: data import and the synthetic default, the command runner, MLflow queries."""
import hashlib
import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest

from covseg import registry, shell, tracking
from covseg.data import data_version, load_raw, write_raw
from covseg.errors import DataError
from covseg.ingest import import_folder, write_synthetic
from covseg.names import CHAMPION, RAW_IMAGES, TAG_DATA_VERSION
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


def _dvc_project(root: Path) -> Path:
    """A DVC repository (no git) whose data.dvc tracks data/raw, as the project's does."""
    root.mkdir(parents=True)
    shell.run(["dvc", "init", "--no-scm", "-q"], root)
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    return root


def _recorded_files(root: Path) -> dict:
    """relpath -> md5 of the files data.dvc records, from the directory manifest in the DVC cache."""
    md5 = data_version(root / "data.dvc")
    assert md5.endswith(".dir"), md5
    manifest = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    return {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}


def _md5s(folder: Path) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_import_lands_and_records_exactly_the_bytes_it_validated(tmp_path, tiny_raw, tiny_arrays, params, monkeypatch):
    """A source file swapped after the contract read it must not land unchecked (the audit: import validated
    the source, then read it again to copy it, so a file replaced in between was copied and recorded)."""
    from covseg import ingest

    project = _dvc_project(tmp_path / "project")
    validated = _md5s(tiny_raw)
    check = ingest.validate_raw

    def check_then_swap(raw, v):
        report = check(raw, v)
        np.save(tiny_raw / RAW_IMAGES, np.full_like(tiny_arrays[0], 5000.0))  # never checked: bone everywhere
        return report

    monkeypatch.setattr(ingest, "validate_raw", check_then_swap)
    result = import_folder(tiny_raw, project / "data" / "raw", params.validate_, project / "data.dvc")
    assert result["report"]["success"] and result["report"]["source"] == str(tiny_raw)
    assert np.array_equal(load_raw(project / "data" / "raw").images, tiny_arrays[0]), "the swapped file landed"
    assert _md5s(project / "data" / "raw") == validated
    assert _recorded_files(project) == validated, "data.dvc records the bytes that were validated"
    assert not list((project / "data").glob(".*")), "no staging folder left behind"


def test_a_failed_import_leaves_the_data_and_its_record_as_they_were(tmp_path, tiny_raw, tiny_arrays, params):
    project = _dvc_project(tmp_path / "project")
    raw, dvc_file = project / "data" / "raw", project / "data.dvc"
    import_folder(tiny_raw, raw, params.validate_, dvc_file)
    before, record = _md5s(raw), dvc_file.read_text()
    images, masks, test = (a.copy() for a in tiny_arrays)
    bad = write_raw(tmp_path / "bad", np.clip((images + 1000) / 1400, 0, 1), masks, test)
    with pytest.raises(ContractError, match="air near -1000 HU"):
        import_folder(bad, raw, params.validate_, dvc_file)
    (tmp_path / "bad" / "masks_medseg.npy").unlink()
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad' / 'masks_medseg.npy'}: file is missing"):
        import_folder(tmp_path / "bad", raw, params.validate_, dvc_file)
    assert _md5s(raw) == before and dvc_file.read_text() == record
    assert not list((project / "data").glob(".*")), "no staging folder left behind"


def test_import_of_a_folder_without_slice_ids_writes_the_default_ones(tmp_path, tiny_raw, tiny_arrays, params):
    (tiny_raw / "slice_ids.json").unlink()
    import_folder(tiny_raw, tmp_path / "raw", params.validate_, dvc_file=None)
    assert json.loads((tmp_path / "raw" / "slice_ids.json").read_text()) == {"train": list(range(12)),
                                                                             "test": list(range(3))}


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


# ----------------------------------------------------------------------------- a training state that cannot be read

TINY_TRAIN = {"model.base_channels": 4, "model.depth": 2, "train.epochs": 2, "train.crop": 32,
              "train.val_every": 1, "train.warmup_epochs": 1, "train.members": 1}


class NotWeights:
    """Pickled by reference: torch.load(weights_only=True) refuses it."""


@pytest.fixture(scope="module")
def tiny_slices():
    from covseg.data import one_hot_to_index, synthesize
    from covseg.preprocessing import window

    images, masks, _ = synthesize(8, 1, 64, seed=3)
    x, y = window(images[..., 0]), one_hot_to_index(masks)
    return x[:6], y[:6], x[6:], y[6:]


def _corrupt_state(kind: str, path: Path, key: str) -> bytes:
    """Write a training state that cannot be resumed (`kind`) to `path`; returns its bytes."""
    import torch

    if kind in ("truncated", "empty", "garbage"):
        torch.save({"recipe": key, "net": {"w": torch.zeros(4096)}}, path)
        whole = path.read_bytes()
        path.write_bytes({"truncated": whole[: len(whole) // 2], "empty": b"",
                          "garbage": b"\x00not a torch file\xff" * 64}[kind])
    else:
        torch.save({"not a dict": [1, 2, 3], "missing keys": {"recipe": key, "epoch": 1, "finished": False},
                    "refused pickle": {"recipe": key, "epoch": 1, "net": NotWeights()}}[kind], path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "not a dict", "missing keys", "refused pickle"])
def test_an_unreadable_training_state_is_set_aside_with_one_warning(tmp_path, kind):
    """The audit: a corrupt models/train_state.pt failed every later training (a raw traceback, for good)."""
    from covseg.training import TrainingState

    path = tmp_path / "train_state.pt"
    content = _corrupt_state(kind, path, "k")
    with pytest.warns(UserWarning, match=rf"{path}: .*set aside as {path}\.corrupt-\d") as warned:
        assert TrainingState(path, "k", None, None, None, None, None).load() is None
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert not path.exists()
    aside = list(tmp_path.glob("train_state.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content, "kept, not deleted"


def test_a_state_of_other_params_is_not_corrupt(tmp_path):
    import torch

    from covseg.training import TrainingState

    path = tmp_path / "train_state.pt"
    torch.save({"recipe": "other"}, path)
    assert TrainingState(path, "k", None, None, None, None, None).load() is None
    assert path.exists() and not list(tmp_path.glob("*.corrupt*"))


@pytest.mark.parametrize("members", [1, 2])
def test_training_with_a_corrupt_state_starts_afresh(params, tiny_slices, tmp_path, members):
    import torch

    from covseg.training import recipe_key, train

    p = params.override({**TINY_TRAIN, "train.members": members})
    state = tmp_path / "models" / "train_state.pt"
    state.parent.mkdir()
    corrupt = state if members == 1 else state.with_name("train_state.member1.pt")  # an ensemble's member 1
    content = _corrupt_state("missing keys", corrupt, recipe_key(p.train, p.model, p.seed + members - 1,
                                                                 *tiny_slices))
    seen = []
    with pytest.warns(UserWarning, match=f"{corrupt}: "):
        train(p.train, p.model, p.seed, *tiny_slices, tmp_path / "m.pt", on_epoch=seen.append, state=state)
    assert [r["epoch"] for r in seen] == list(range(1, 2 * members + 1)), "trained from the first epoch"
    assert (tmp_path / "m.pt").is_file()
    assert [f.read_bytes() for f in state.parent.glob(f"{corrupt.name}.corrupt-*")] == [content]
    assert torch.load(corrupt, weights_only=True)["finished"], "the new training saved its own state there"


# ----------------------------------------------------------------------------- torch that enforces weights_only


@pytest.mark.parametrize("version, refused", [("2.5.1+cu124", True), ("2.3.0", True), ("1.13.1", True),
                                              ("2.6.0+cu124", False), ("2.10.0", False), ("3.0.0", False)])
def test_weights_are_loaded_only_by_a_torch_with_the_weights_only_fix(tmp_path, monkeypatch, version, refused):
    """torch < 2.6 lets a crafted file run code through torch.load(weights_only=True) (CVE-2025-32434):
    covseg refuses to load a checkpoint or a training state with it, in one line."""
    import torch

    from covseg import model
    from covseg.errors import CovsegError
    from covseg.training import TrainingState

    model.save_checkpoint(model.Segmenter(model.UNet(base_channels=4, depth=2)), tmp_path / "m.pt")
    torch.save({"recipe": "other"}, tmp_path / "state.pt")
    monkeypatch.setattr(torch, "__version__", version)
    if not refused:
        model.load_checkpoint(tmp_path / "m.pt")
        assert TrainingState(tmp_path / "state.pt", "k", None, None, None, None, None).load() is None
        return
    expected = (rf"^torch {version.replace('+', '[+]')} is older than 2\.6, which fixed CVE-2025-32434 "
                r"\(weights_only bypass\)")
    with pytest.raises(CovsegError, match=expected) as refusal:
        model.load_checkpoint(tmp_path / "m.pt")
    assert "\n" not in str(refusal.value)
    with pytest.raises(CovsegError, match=expected):
        TrainingState(tmp_path / "state.pt", "k", None, None, None, None, None).load()
    assert (tmp_path / "state.pt").is_file() and not list(tmp_path.glob("*.corrupt*")), "not set aside"
