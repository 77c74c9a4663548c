"""MLflow: runs tracked from the DVC stages, versions registered, promotion by the metric gate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from covseg import registry
from covseg.model import load_checkpoint, load_model, predict_labels
from covseg.names import ENV_ALLOW_PICKLE, ENV_TRACKING_URI
from covseg.preprocessing import load_processed

pytestmark = pytest.mark.slow
LEARNS = {"model.base_channels": 8, "train.epochs": 30, "train.lr": 0.01, "registry.min_score": 0.1}


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """Every command here (dvc repro, covseg promote / submit) runs with MLflow's unpickling refused."""
    monkeypatch.setenv(ENV_ALLOW_PICKLE, "false")


def _client(uri):
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _runs(client):
    exp = client.get_experiment_by_name("covseg")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_embedded_store_holds_runs_from_temp_experiments(new_project, sh):
    project = new_project()
    sh("dvc repro", project)
    sh("dvc exp run --temp -S train.epochs=1 -n tiny-temp", project)
    client = _client(f"sqlite:///{project / 'mlflow.db'}")
    first, temp = _runs(client)
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [1, 2]
    assert temp.data.tags["dvc_exp_name"] == "tiny-temp"
    assert len(client.get_metric_history(temp.info.run_id, "val_loss")) == 1
    artifacts = {a.path for a in client.list_artifacts(temp.info.run_id)}
    assert {"evaluation", "submission", "validation.json", "train_history.csv"} <= artifacts
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()
    versions = client.search_model_versions("name='covseg-unet'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_server_tracking_registry_and_promotion(new_project, sh, mlflow_server):
    project = new_project(LEARNS)
    uri = mlflow_server
    os.environ[ENV_TRACKING_URI] = uri  # restored by conftest's fixture
    client = _client(uri)
    # v1: an untrained model (lr 0) -- not even a first champion: below the floor
    sh("dvc exp run -S train.lr=0 -S train.epochs=1", project)
    sh("covseg promote --output promote1.json", project)
    d1 = json.loads((project / "promote1.json").read_text())
    assert d1["promoted"] is False and "no champion yet, and kaggle_f1" in d1["reason"]
    assert registry.aliases("covseg-unet") == {"challenger": 1}

    # v2: a trained model passes the floor and becomes the first champion
    sh("dvc exp run -S train.lr=0.01 -S train.epochs=30", project)
    out = sh("covseg promote --output promote2.json", project).stdout
    d2 = json.loads((project / "promote2.json").read_text())
    assert d2["promoted"] is True and d2["challenger_score"] >= 0.1, out
    assert registry.aliases("covseg-unet") == {"challenger": 2, "champion": 2}

    # the champion from the registry reproduces the run's predictions exactly
    images, labels = load_processed(project / "data/processed", "val")
    champion, _ = load_model("models:/covseg-unet@champion")
    served = mlflow.pyfunc.load_model("models:/covseg-unet@champion")  # as `mlflow models serve` loads it
    assert np.array_equal(served.predict(images[:, None]).argmax(1), predict_labels(champion, images))
    checkpoint, ckpt = load_checkpoint(project / "models/model.pt")
    assert np.array_equal(predict_labels(champion, images), predict_labels(checkpoint, images))
    sh("covseg submit --model models:/covseg-unet@champion --out from_registry", project)
    assert (project / "from_registry/submission.csv").read_bytes() == \
        (project / "submission/submission.csv").read_bytes()

    # v3: untrained again (other params, else DVC's run cache restores v1's outputs) -- worse
    sh("dvc exp run -S train.lr=0 -S train.epochs=2", project)
    sh("covseg promote --output promote3.json", project)
    d3 = json.loads((project / "promote3.json").read_text())
    assert not d3["promoted"] and registry.aliases("covseg-unet") == {"challenger": 3, "champion": 2}
    assert "not promoted" in client.get_model_version("covseg-unet", "3").description

    # a roll back by hand
    sh("covseg promote --version 1 --force", project)
    assert registry.aliases("covseg-unet")["champion"] == 1

    # what the run holds: params, per-epoch histories, final metrics, artifacts, tags
    trained = _runs(client)[1]
    assert trained.info.run_id == ckpt["mlflow_run_id"]
    assert trained.data.params["train.epochs"] == "30" and "validate.hu_min" in trained.data.params
    for key in ("train_loss", "lr"):
        assert len(client.get_metric_history(trained.info.run_id, key)) == 30
    every = int(trained.data.params["train.val_every"])
    for key in ("val_loss", "val_f1_ggo", "val_f1_consolidation", "val_dice_ggo"):  # every val_every epochs
        assert len(client.get_metric_history(trained.info.run_id, key)) == 30 // every
    assert trained.data.metrics["kaggle_f1"] > 0.1
    tags = trained.data.tags
    assert len(tags["git_commit"]) == 40 and tags["data_version"].endswith(".dir")
    assert tags["dvc_exp_name"]
    top = {a.path for a in client.list_artifacts(trained.info.run_id)}
    assert {"evaluation", "submission", "train_history.csv", "validation.json"} <= top
    evaluation = {a.path.split("/")[-1] for a in client.list_artifacts(trained.info.run_id, "evaluation")}
    assert {"loss_curves.png", "confusion_matrix.png", "per_slice.csv"} <= evaluation
    assert any(p.startswith("overlay_") for p in evaluation)
    v2 = client.get_model_version("covseg-unet", "2")
    assert v2.run_id == trained.info.run_id and float(v2.tags["kaggle_f1"]) > 0.1
    assert v2.tags["data_version"] == tags["data_version"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["model_version"] == 3 and len(metrics["mlflow_run_id"]) == 32


    # two promotions at once against the server: champion v1 (untrained); v2 (30 epochs) and v4 (3 epochs)
    # both beat it. Compare-and-set: the second to finish is compared with the first one's result.
    sh("dvc exp run -S train.lr=0.01 -S train.epochs=3", project)
    assert registry.aliases("covseg-unet")["champion"] == 1
    procs = {v: subprocess.Popen(["covseg", "promote", "--version", str(v), "--output", f"race{v}.json"],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
             for v in (2, 4)}
    outs = {v: p.communicate(timeout=600)[0] for v, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outs
    d = {v: json.loads((project / f"race{v}.json").read_text()) for v in (2, 4)}
    final = registry.aliases("covseg-unet")["champion"]
    other = 6 - final
    assert final in (2, 4) and d[final]["promoted"] and d[final]["champion_after"] == final, d
    if d[other]["promoted"]:  # it won first, then lost the champion to `final`, which was compared with it
        assert d[other]["champion_before"] == 1 and d[final]["champion_before"] == other
        assert d[final]["champion_score"] == pytest.approx(d[other]["challenger_score"])
    else:  # not promoted: over the champion that stands, or over v1 before `final` replaced it
        assert d[other]["champion_after"] == d[other]["champion_before"]
        assert d[other]["champion_after"] == final or d[final]["champion_before"] == d[other]["champion_after"] == 1
    assert d[other]["challenger_score"] < d[final]["challenger_score"] + d[final]["margin"], d
    assert d[2]["eval_slice_ids"] == d[4]["eval_slice_ids"]  # the same unseen slices
    assert "promotion_lock" not in client.get_registered_model("covseg-unet").tags
    print(f"race: v2 {d[2]['challenger_score']:.4f} (rounds {d[2]['rounds']}), "
          f"v4 {d[4]['challenger_score']:.4f} (rounds {d[4]['rounds']}); champion v{final}")
