"""The registry model: weights only, rebuilt from code, loaded and served with no unpickling.

Every test here runs with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (the `mlflow_store` fixture)."""
import json
import pickle
import time
import urllib.request

import cloudpickle
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from covseg import tracking
from covseg.errors import CovsegError
from covseg.model import Segmenter, UNet, load_checkpoint, load_model, save_checkpoint
from covseg.names import CHAMPION, ENV_ALLOW_PICKLE, ENV_TRACKING_URI, MODEL_CHECKPOINT, MODEL_CODE_FILE

NAME = "covseg-unet"


def tiny_model(seed: int = 0, base_channels: int = 4, depth: int = 2) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(UNet(base_channels=base_channels, depth=depth), 1.0).eval()


def logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def log_and_register(model, size: int = 64, name: str = NAME) -> tuple[str, int, str]:
    """Log `model` as the train stage does, register it; returns (the logged model's URI, version, run id)."""
    tracking.configure("covseg")
    with mlflow.start_run() as run:
        uri = tracking.log_model(model, (size, size))
    version = mlflow.register_model(uri, name).version  # as the evaluate stage registers it
    return uri, int(version), run.info.run_id


@pytest.fixture
def no_unpickling(monkeypatch):
    """Records every call that would unpickle (pickle, cloudpickle, torch.load without weights_only)."""
    calls = []

    def forbid(what, real):
        def wrapper(*args, **kwargs):
            calls.append(what)
            return real(*args, **kwargs)
        return wrapper

    for module, attr in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(module, attr, forbid(f"{module.__name__}.{attr}", getattr(module, attr)))
    real_torch_load = torch.load

    def torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            calls.append("torch.load without weights_only")
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    return calls


def test_logged_model_is_weights_and_code_and_loads_by_version_and_alias(mlflow_store, tmp_path, no_unpickling):
    net = tiny_model()
    model_uri, version, run_id = log_and_register(net)
    MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)
    x = np.random.default_rng(0).random((3, 1, 64, 48), dtype=np.float32)  # any N, H, W
    expected = logits(net, x)

    # what is stored: the code file and a weights-only checkpoint, no pickled Python object
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(tmp_path / "m"))
    flavor = mlflow.models.Model.load(f"{local}/MLmodel").flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert flavor["model_code_path"].endswith(MODEL_CODE_FILE)
    assert not list((tmp_path / "m").rglob("*.pkl"))
    stored, facts = load_checkpoint(f"{local}/{flavor['artifacts'][MODEL_CHECKPOINT]['path']}")
    assert np.array_equal(logits(stored, x), expected) and set(facts) >= {"config", "scale", "state_dict"}

    for uri in (f"models:/{NAME}/{version}", f"models:/{NAME}@{CHAMPION}", model_uri, f"runs:/{run_id}/model"):
        model, facts = load_model(uri)  # what evaluate, submit and promote call
        assert isinstance(model, Segmenter) and not model.training and facts == {}
        assert np.array_equal(logits(model, x), expected), uri
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    out = pyfunc.predict(x)
    assert out.dtype == np.float32 and out.shape == (3, 4, 64, 48)
    assert np.array_equal(out, expected)
    # another batch size: the same logits up to float rounding (kernels differ by batch size)
    np.testing.assert_allclose(pyfunc.predict(x, params={"batch_size": 1}), expected, rtol=1e-5, atol=1e-5)
    assert no_unpickling == []


def test_served_model_rejects_bad_input(mlflow_store):
    log_and_register(tiny_model())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    hu = np.full((1, 1, 64, 64), -1000, dtype=np.float32)  # Hounsfield units, not windowed
    with pytest.raises(MlflowException, match=r"windowed to \[0, 1\]"):
        pyfunc.predict(hu)
    with pytest.raises(MlflowException):
        pyfunc.predict(np.zeros((1, 3, 64, 64), dtype=np.float32))  # three channels
    with pytest.raises(MlflowException, match="NaN or inf"):
        pyfunc.predict(np.full((1, 1, 64, 64), np.nan, dtype=np.float32))


def test_pickled_model_version_is_refused_unread(mlflow_store, no_unpickling):
    """An old `mlflow.pytorch` pickle version in the registry: one clear error, nothing unpickled."""
    tracking.configure("covseg")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(tiny_model(), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME)
    with pytest.raises(CovsegError, match=rf"models:/{NAME}/1 is not a covseg weights-only model .*pytorch"):
        load_model(f"models:/{NAME}/1")
    assert no_unpickling == []


def test_checkpoint_that_is_not_weights_only_is_refused(mlflow_store, tmp_path):
    """A model in covseg's layout whose checkpoint holds a pickled object fails to load, weights only."""
    from importlib.util import find_spec

    whole = tmp_path / "whole.pt"
    torch.save(tiny_model(), whole)  # the whole module, pickled
    tracking.configure("covseg")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=find_spec("covseg.mlflow_model").origin,
                                       artifacts={MODEL_CHECKPOINT: str(whole)}, pip_requirements=["covseg"])
    with pytest.raises(CovsegError, match=rf"model {info.model_uri}: its checkpoint .* does not load, weights only"):
        load_model(info.model_uri)
    with pytest.raises(CovsegError, match="models:/nope/1: cannot be read"):
        load_model("models:/nope/1")


def test_checkpoint_facts_survive_a_round_trip(tmp_path):
    """The checkpoint the registry stores is the one save_checkpoint writes (config, scale, weights)."""
    net = tiny_model()
    save_checkpoint(net, tmp_path / "c.pt", epoch=3)
    model, facts = load_checkpoint(tmp_path / "c.pt")
    assert facts["epoch"] == 3 and facts["scale"] == 1.0
    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    assert np.array_equal(logits(model, x), logits(net, x))


def post(url: str, payload: dict) -> tuple[dict, float, int]:
    """POST JSON; returns (the answer, the seconds it took, the request's size in bytes)."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - t, len(body)


@pytest.mark.slow
def test_mlflow_models_serve_the_champion(mlflow_store, tmp_path):
    """`mlflow models serve -m models:/covseg-unet@champion` with pickle deserialization off answers
    /invocations with the logits the model gives locally."""
    from servers import model_server

    net = tiny_model()
    _, version, _ = log_and_register(net)
    MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)
    x = np.random.default_rng(2).random((2, 1, 64, 64), dtype=np.float32)
    with model_server(tmp_path, f"models:/{NAME}@{CHAMPION}",
                      {ENV_TRACKING_URI: mlflow_store, ENV_ALLOW_PICKLE: "false"}) as url:
        answer, seconds, _ = post(url, {"inputs": x.tolist()})
        served = np.asarray(answer["predictions"], dtype=np.float32)
        assert served.shape == (2, 4, 64, 64)
        np.testing.assert_allclose(served, logits(net, x), rtol=1e-6, atol=1e-6)  # JSON round trip of floats
        batched, _, _ = post(url, {"inputs": x.tolist(), "params": {"batch_size": 1}})
        np.testing.assert_allclose(np.asarray(batched["predictions"], dtype=np.float32), served, rtol=1e-5, atol=1e-5)
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(url, {"inputs": (x * 1000).tolist()})
        assert bad.value.code == 400 and "windowed to [0, 1]" in bad.value.read().decode()
    print(f"REST round trip, 2 slices of 64x64, tiny model: {seconds:.2f} s")
