"""MLflow: runs tracked from the DVC stages, versions registered by `covseg register` after the pipeline,
promotion by the gate on out-of-fold scores under the promotion lock."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from covseg import locks, modelstore, registry
from covseg.model import load_checkpoint, predict_labels
from covseg.names import (
    ENV_ALLOW_PICKLE,
    ENV_TRACKING_URI,
    HEADLINE_METRICS,
    OOF_PREFIX,
    TAG_CALIBRATED,
    TAG_OOF_FOLDS,
    TAG_OOF_SLICES,
    TAG_OOF_TRIVIAL,
)
from covseg.preprocessing import load_processed

pytestmark = pytest.mark.slow
# the gate compares out-of-fold scores set by hand (_calibrate_by_hand): the models need not learn
GATE = {"train.lr": 0.01, "registry.min_score": 0.1}
EPOCHS = 3  # v2, the trained one


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """Every command here (dvc repro, covseg register / promote / submit) runs with MLflow's unpickling refused."""
    monkeypatch.setenv(ENV_ALLOW_PICKLE, "false")


def _client(uri):
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _runs(client):
    exp = client.get_experiment_by_name("covseg")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _register(sh, project, out: str = "registration.json") -> dict:
    """`covseg register` after the pipeline, as a user types it: {model_version, mlflow_run_id, new, calibrated}."""
    sh(f"covseg register --output {out}", project)
    return json.loads((project / out).read_text())


def _calibrate_by_hand(client, version, score, slices=10, trivial=0.05):
    """Set on `version` the out-of-fold tags that `covseg register` sets on a calibrated version (`score` on every
    headline metric, from `slices` slices, the constant predictor's kaggle_f1 `trivial`). The tiny project
    carries no calibration for its recipe keys (one would take `covseg cv` and `covseg calibrate` per
    recipe), so `covseg register` registers its versions uncalibrated and the gate refuses them; these stand-in
    scores, set by hand, give the gate something to compare."""
    tags = {TAG_CALIBRATED: "true", TAG_OOF_SLICES: slices, TAG_OOF_FOLDS: 5, TAG_OOF_TRIVIAL: trivial,
            **{f"{OOF_PREFIX}{m}": score for m in HEADLINE_METRICS}}
    for key, value in tags.items():
        client.set_model_version_tag("covseg-unet", str(version), key, str(value))


def test_embedded_store_holds_runs_from_temp_experiments(new_project, sh):
    project = new_project()
    sh("dvc repro", project)
    first_version = _register(sh, project)
    assert first_version["model_version"] == 1 and first_version["new"] and not first_version["calibrated"]
    assert _register(sh, project)["new"] is False, "the same model again: its version is tagged again, not a new one"
    sh("dvc exp run --temp -S train.epochs=1 -n tiny-temp", project)
    client = _client(f"sqlite:///{project / 'mlflow.db'}")
    first, temp = _runs(client)
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [1, 2]
    assert temp.data.tags["dvc_exp_name"] == "tiny-temp"
    assert len(client.get_metric_history(temp.info.run_id, "train_loss")) == 1
    artifacts = {a.path for a in client.list_artifacts(temp.info.run_id)}
    assert {"evaluation", "submission", "validation.json", "train_history.csv"} <= artifacts
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()
    assert [int(v.version) for v in client.search_model_versions("name='covseg-unet'")] == [1], \
        "the pipeline registers nothing: `covseg register` does"
    # the temporary experiment's model, registered from the workspace it is applied to
    sh("dvc exp apply tiny-temp", project)
    registered = _register(sh, project)
    assert registered["model_version"] == 2 and registered["mlflow_run_id"] == temp.info.run_id
    assert first_version["mlflow_run_id"] == first.info.run_id
    versions = client.search_model_versions("name='covseg-unet'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_server_tracking_registry_and_promotion(new_project, sh, mlflow_server, tmp_path, monkeypatch):
    project = new_project(GATE)
    uri = mlflow_server
    os.environ[ENV_TRACKING_URI] = uri  # restored by conftest's fixture
    # no Prefect API: the promotion lock is the file lock of a remote store, in the per-user folder (here one of
    # the test's own)
    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(locks, "prefect_api_url", lambda: None)  # whatever this process's Prefect settings hold
    client = _client(uri)
    # v1: an untrained model (lr 0), registered uncalibrated (no calibration for its recipe): the gate
    # refuses it, names the commands that make one, and changes nothing
    sh("dvc exp run -S train.lr=0 -S train.epochs=1", project)
    assert _register(sh, project)["model_version"] == 1
    v1 = client.get_model_version("covseg-unet", "1")
    assert v1.tags["calibrated"] == "false" and "oof_kaggle_f1" not in v1.tags
    refused = sh("covseg promote --output promote1.json", project, check=False)
    assert refused.returncode == 1 and "covseg-unet v1 is not calibrated" in refused.stderr, refused.stderr
    assert "`covseg cv` and `covseg calibrate`" in refused.stderr and not (project / "promote1.json").exists()
    assert registry.aliases("covseg-unet") == {}
    # with out-of-fold scores (set by hand, see _calibrate_by_hand) below registry.min_score: not even a first
    # champion
    _calibrate_by_hand(client, 1, 0.05)
    sh("covseg promote --output promote1.json", project)
    d1 = json.loads((project / "promote1.json").read_text())
    assert d1["promoted"] is False and "no champion yet, and out-of-fold kaggle_f1 0.0500" in d1["reason"]
    assert registry.aliases("covseg-unet") == {"challenger": 1}

    # v2: a trained model; its out-of-fold scores pass the floor: the first champion
    sh(f"dvc exp run -S train.lr=0.01 -S train.epochs={EPOCHS}", project)
    assert _register(sh, project)["model_version"] == 2
    _calibrate_by_hand(client, 2, 0.6)
    out = sh("covseg promote --output promote2.json", project).stdout
    d2 = json.loads((project / "promote2.json").read_text())
    assert d2["promoted"] is True and d2["challenger_score"] == 0.6, out
    assert "out-of-fold kaggle_f1: v2 0.6000 (10 slices)" in out
    assert registry.aliases("covseg-unet") == {"challenger": 2, "champion": 2}

    # the champion from the registry reproduces the run's predictions exactly (on the test slices: the
    # shipped recipe, split.fold all, trains on every labelled slice)
    images, _ = load_processed(project / "data/processed", "test")
    champion, _ = modelstore.load("models:/covseg-unet@champion")
    served = mlflow.pyfunc.load_model("models:/covseg-unet@champion")  # as `mlflow models serve` loads it
    assert np.array_equal(served.predict(images[:, None]).argmax(1), predict_labels(champion, images))
    checkpoint, ckpt = load_checkpoint(project / "models/model.pt")
    assert np.array_equal(predict_labels(champion, images), predict_labels(checkpoint, images))
    sh("covseg submit --model models:/covseg-unet@champion --out from_registry", project)
    assert (project / "from_registry/submission.csv").read_bytes() == \
        (project / "submission/submission.csv").read_bytes()

    # v3: untrained again (other params, else DVC's run cache restores v1's outputs) -- worse
    sh("dvc exp run -S train.lr=0 -S train.epochs=2", project)
    v3 = _register(sh, project, "registration3.json")
    _calibrate_by_hand(client, 3, 0.05)
    out = sh("covseg promote --output promote3.json", project).stdout
    d3 = json.loads((project / "promote3.json").read_text())
    assert not d3["promoted"] and registry.aliases("covseg-unet") == {"challenger": 3, "champion": 2}
    assert d3["champion_score"] == 0.6 and "v3 0.0500 (10 slices), champion v2 0.6000 (10 slices)" in out
    assert "not promoted" in client.get_model_version("covseg-unet", "3").description

    # a roll back by hand
    sh("covseg promote --version 1 --force", project)
    assert registry.aliases("covseg-unet")["champion"] == 1

    # what the run holds: params, per-epoch histories, final metrics, artifacts, tags
    trained = _runs(client)[1]
    assert trained.info.run_id == ckpt["mlflow_run_id"]
    assert trained.data.params["train.epochs"] == str(EPOCHS) and "validate.hu_min" in trained.data.params
    for key in ("train_loss", "lr"):
        assert len(client.get_metric_history(trained.info.run_id, key)) == EPOCHS
    assert trained.data.metrics["train_slices"] == 10 and trained.data.metrics["calibrated"] == 0
    tags = trained.data.tags
    assert len(tags["git_commit"]) == 40 and tags["data_version"].endswith(".dir")
    assert tags["dvc_exp_name"] and len(tags["recipe_key"]) == 16
    top = {a.path for a in client.list_artifacts(trained.info.run_id)}
    assert {"evaluation", "submission", "train_history.csv", "validation.json"} <= top
    evaluation = {a.path.split("/")[-1] for a in client.list_artifacts(trained.info.run_id, "evaluation")}
    assert "loss_curves.png" in evaluation
    v2 = client.get_model_version("covseg-unet", "2")
    assert v2.run_id == trained.info.run_id and v2.tags["recipe_key"] == tags["recipe_key"]
    assert v2.tags["data_version"] == tags["data_version"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert "model_version" not in metrics and metrics["mlflow_run_id"] == v3["mlflow_run_id"]
    assert v3["model_version"] == 3 and v3["new"] and len(v3["mlflow_run_id"]) == 32

    # two promotions at once against the server: champion v1 (out-of-fold 0.05); v2 (0.6) and v4 (0.3) both
    # beat it. Compare-and-set: the second to finish is compared with the first one's result, so v2 ends
    # champion in either order.
    sh("dvc exp run -S train.lr=0.01 -S train.epochs=2", project)
    assert _register(sh, project)["model_version"] == 4
    _calibrate_by_hand(client, 4, 0.3)
    assert registry.aliases("covseg-unet")["champion"] == 1
    procs = {v: subprocess.Popen(["covseg", "promote", "--version", str(v), "--output", f"race{v}.json"],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
             for v in (2, 4)}
    outs = {v: p.communicate(timeout=600)[0] for v, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    d = {v: json.loads((project / f"race{v}.json").read_text()) for v in (2, 4)}
    assert registry.aliases("covseg-unet")["champion"] == 2, d
    assert d[2]["promoted"] and d[2]["champion_after"] == 2, d
    if d[4]["promoted"]:  # it won first, then lost the champion to v2, which was compared with it
        assert d[4]["champion_before"] == 1 and d[2]["champion_before"] == 4 and d[2]["champion_score"] == 0.3
    else:  # v2 won first; v4 saw the champion move and was compared with v2
        assert d[2]["champion_before"] == 1 and d[4]["champion_before"] == d[4]["champion_after"] == 2
        assert d[4]["champion_score"] == 0.6 and d[4]["champions_seen"] == [1, 2]
    lock = tmp_path / "cache" / "covseg" / "locks" / f".{locks.lock_name('covseg-unet')}.lock"
    assert lock.is_file(), f"the gates took the file lock {lock}"
    with locks.promotion_lock("covseg-unet", 0, 60):  # and released it
        pass
    print(f"race: v2 rounds {d[2]['rounds']}, v4 rounds {d[4]['rounds']} (promoted: {d[4]['promoted']}); champion v2")
