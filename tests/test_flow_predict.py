"""flows/predict.py: its task bodies (`.fn`, no Prefect server) split scans into chunks, run
`covseg predict` on each and combine the reports in one place."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covseg.errors import DataError
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
