"""Team storage on S3, against a real S3 endpoint (moto) on 127.0.0.1, with the commands the README gives:
a DVC remote on s3:// that a fresh clone pulls from, and an MLflow server whose artifacts live in the bucket."""
import hashlib
import json
import os

import pytest
import yaml
from servers import S3_BUCKET, S3_CREDENTIALS, mlflow_server, s3_client

from covseg.names import ENV_ALLOW_PICKLE, ENV_TRACKING_URI, PATHS

pytestmark = pytest.mark.slow
CREDENTIALS_ENV = " ".join(f"{k}={v}" for k, v in S3_CREDENTIALS.items())  # for one command line


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dvc_files(project) -> dict[str, str]:
    """relative path -> md5 of every file DVC tracks in `project` (data.dvc and the outputs in dvc.lock)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [yaml.safe_load((project / PATHS.dvc_file).read_text())["outs"][0]["path"]]
    outs += [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    files = [f for out in outs for f in ([project / out] if (project / out).is_file() else
                                         (project / out).rglob("*")) if f.is_file()]
    return {str(f.relative_to(project)): _md5(f) for f in files}


def _keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_dvc_remote_and_mlflow_artifacts_on_s3(new_project, sh, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ALLOW_PICKLE, "false")
    project = new_project({"split.folds": 2})  # a cross-validation of 2 folds
    # the README's commands: the default remote `local` moved to S3, with the endpoint of a non-AWS S3
    sh(f"dvc remote modify local url s3://{S3_BUCKET}/covseg && dvc remote modify local endpointurl {s3_endpoint}"
       " && git commit -qam 'dvc remote on S3'", project)

    # MLflow server with its artifacts in the bucket: the server alone holds the S3 credentials and endpoint;
    # every client (training, promotion, loading) talks to it over HTTP and has none
    server_env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with mlflow_server(tmp_path, artifacts=f"s3://{S3_BUCKET}/mlflow", env=server_env) as uri:
        os.environ[ENV_TRACKING_URI] = uri  # restored by conftest's fixture
        # the README's order: the recipe's calibration, the pipeline, the champion (by hand: tiny params learn
        # too little for the gate's registry.min_score)
        sh("covseg cv && covseg calibrate --cv reports/cv/default && dvc repro && covseg register && "
           "covseg promote --version 1 --force",
           project)
        assert json.loads((project / PATHS.metrics).read_text())["calibrated"] is True
        sh("git add -A && git commit -qm 'tiny run'", project)

        # DVC: push with credentials from the environment ...
        sh(f"{CREDENTIALS_ENV} dvc push -q", project)
        assert not (project / ".dvc-remote").exists()
        assert _keys(s3_endpoint, "covseg/files/md5/")

        # ... and a fresh clone (no cache) pulls with credentials in .dvc/config.local (not in git)
        clone = tmp_path / "clone"
        sh(f"git clone -q {project} {clone}", tmp_path)
        assert not (clone / ".dvc" / "cache").exists() and not (clone / PATHS.model).exists()
        sh(f"dvc remote modify --local local access_key_id {S3_CREDENTIALS['AWS_ACCESS_KEY_ID']} && "
           f"dvc remote modify --local local secret_access_key {S3_CREDENTIALS['AWS_SECRET_ACCESS_KEY']} && "
           "dvc pull -q", clone)
        pushed = _dvc_files(project)
        assert PATHS.model in pushed and f"{PATHS.raw}/images_medseg.npy" in pushed
        assert _dvc_files(clone) == pushed
        assert "up to date" in sh("dvc status", clone).stdout

        # MLflow: the champion, loaded by covseg's loader in the clone, predicts what the run's checkpoint did
        # with its calibration (the registered model carries its choices)
        sh("covseg submit --model models:/covseg-unet@champion --out from_registry", clone)
        for name in ("submission.csv", "test_masks.npy"):
            assert _md5(clone / "from_registry" / name) == pushed[f"{PATHS.submission}/{name}"]

    # the artifacts (the model's checkpoint, the run's reports) are in the bucket, none on local disk
    keys = _keys(s3_endpoint, "mlflow/")
    assert any(k.endswith("/artifacts/data/checkpoint.pt") for k in keys), keys
    assert any(k.endswith("/validation.json") for k in keys), keys
    assert any(k.endswith("/cv/fold1.npz") for k in keys), "a fold's held-out logits, where the flows collect them"
    assert not (tmp_path / "artifacts").exists() and not (project / PATHS.mlflow_artifacts).exists()
    assert not list(tmp_path.rglob("checkpoint.pt"))
