"""flows/predict.py: its task bodies (`.fn`, no Prefect server) split scans into chunks, run
`covseg predict` on each and combine the reports in one place."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covseg.errors import DataError, ParamsError
from covseg.model import Segmenter, UNet, save_checkpoint
from covseg.names import PATHS, PREDICT_REPORT_JSON, PREDICT_REPORT_SCANS, PREDICT_REPORT_SLICES
from flows import predict as flow

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / PATHS.params)


def ct(n: int, seed: int) -> np.ndarray:
    vol = np.random.default_rng(seed).choice([-1000, -700, -200, 100], size=(n, 16, 20)).astype(np.float32)
    vol[:, 0, 0] = -1000
    return vol


def test_manifest_and_chunks(tmp_path):
    (tmp_path / "list.txt").write_text("# scans\na.npy\n\n/abs/b.nii.gz\n")
    assert flow.read_manifest(tmp_path / "list.txt") == [str(tmp_path / "a.npy"), "/abs/b.nii.gz"]
    with pytest.raises(DataError, match="manifest file is missing"):
        flow.read_manifest(tmp_path / "nope.txt")
    assert flow.chunked([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_tasks_predict_chunks_and_combine_one_report(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), model)
    scans = tmp_path / "scans"
    for i in range(3):
        (scans / f"p{i}").mkdir(parents=True)
        np.save(scans / f"p{i}" / "scan.npy", ct(2, i))  # the same name three times
    np.save(scans / "bad.npy", np.zeros((1, 8, 8), np.float32))
    out = tmp_path / "out"

    found = flow.list_scans.fn([str(scans), str(tmp_path / "missing.nii")], str(out))
    assert len(found["sources"]) == 4 and len(found["failed"]) == 1
    chunks = [flow.predict_chunk.fn(part, str(out / flow.CHUNKS / f"{k:04d}"), str(model), PARAMS)
              for k, part in enumerate(flow.chunked(found["sources"], 2))]
    assert [c["ok"] + c["failed"] for c in chunks] == [2, 2]
    result = flow.combine_reports.fn(str(out), chunks, found, str(model), PARAMS)
    assert (result["scans"], result["ok"], result["failed"]) == (5, 3, 2)

    table = pd.read_csv(out / PREDICT_REPORT_SCANS)
    ok = table[table["status"] == "ok"]
    assert len(ok) == 3 and ok["scan"].is_unique  # chunk-qualified names: nothing overwritten
    for labels in ok["labels"]:
        assert np.load(out / labels).shape == (2, 16, 20)
    for overlays in ok["overlays"]:
        assert all((out / p).is_file() for p in overlays.split(";"))
    assert len(pd.read_csv(out / PREDICT_REPORT_SLICES)) == 3 * 2
    report = json.loads((out / PREDICT_REPORT_JSON).read_text())
    assert report["summary"]["failed"] == 2 and report["model"] == str(model)
    assert {Path(f["input"]).name for f in report["failed"]} == {"bad.npy", "missing.nii"}


@pytest.mark.parametrize("deployment", ["train/gpu", "predict-chunk/gpu; rm -rf /", "predict/control"])
def test_the_flow_launches_predict_chunk_deployments_only(prefect_harness, tmp_path, monkeypatch, deployment):
    launched = []
    monkeypatch.setattr(flow, "launch", launched.append)
    with pytest.raises(ParamsError, match="is not allowed: batch predictions launch predict-chunk/<name>"):
        flow.predict([str(tmp_path)], str(tmp_path / "out"), model="m.pt", deployment=deployment)
    assert launched == [] and not (tmp_path / "out").exists()


def test_with_a_deployment_each_chunk_is_a_run_on_the_pool_and_one_report_combines_them(
        prefect_harness, tmp_path, monkeypatch):
    from prefect import task

    torch.manual_seed(0)
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), tmp_path / "model.pt")
    for i in range(3):
        np.save(tmp_path / f"scan{i}.npy", ct(2, i))
    runs = []

    @task
    def fake_launch(deployment: str, parameters: dict) -> str:  # a worker running predict-chunk/gpu
        runs.append((deployment, parameters))
        flow.predict_chunk.fn(**parameters)
        return f"run-{len(runs)}"

    monkeypatch.setattr(flow, "launch", fake_launch)
    monkeypatch.chdir(tmp_path)  # relative paths here; workers run elsewhere and get absolute ones
    result = flow.predict(["scan*.npy"], "out", model="model.pt", chunk_size=2, params_path=PARAMS,
                          deployment="predict-chunk/gpu")

    assert [d for d, _ in runs] == ["predict-chunk/gpu"] * 2
    assert sorted(len(p["sources"]) for _, p in runs) == [1, 2]  # the chunks run side by side
    for _, parameters in runs:
        assert Path(parameters["out"]).is_absolute() and Path(parameters["model"]).is_absolute()
        assert all(Path(s["path"]).is_absolute() for s in parameters["sources"])
    assert (result["scans"], result["ok"], result["failed"]) == (3, 3, 0)
    table = pd.read_csv(tmp_path / "out" / PREDICT_REPORT_SCANS)
    assert sorted(table["scan"]) == ["0000/scan0", "0000/scan1", "0001/scan2"]
    assert all(np.load(tmp_path / "out" / labels).shape == (2, 16, 20) for labels in table["labels"])
