import copy
import os
from pathlib import Path

import pytest

from covseg.config import load_params
from covseg.data import synthesize, write_raw

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep it from leaking into later tests."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def params() -> dict:
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def tiny_params(params) -> dict:
    """Project params shrunk for a fast CPU run on 64x64 slices."""
    p = copy.deepcopy(params)
    p["train"].update(epochs=1, batch_size=2, scale=1.0, augment=True)
    p["model"].update(base_channels=4, depth=2)
    p["evaluate"]["overlays"] = 2
    return p


@pytest.fixture(scope="session")
def tiny_arrays():
    """(images, masks, test_images) of 12 labelled and 3 test synthetic 64x64 slices."""
    return synthesize(n_labelled=12, n_test=3, size=64, seed=1)


@pytest.fixture
def tiny_raw(tmp_path, tiny_arrays) -> Path:
    return write_raw(tmp_path / "raw", *tiny_arrays)
