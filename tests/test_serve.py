"""The registry model: weights only, rebuilt from code, loaded and served with no unpickling.

Every test here runs with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (the `mlflow_store` fixture)."""
import json
import pickle
import re
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


def rest(pyfunc, payload) -> tuple[int, str]:
    """What `mlflow models serve` answers a JSON POST to /invocations with (status, body), in process:
    the scoring server's own `invocations`, and its error handler's serialization of an MlflowException."""
    from mlflow.pyfunc import scoring_server

    body = payload if isinstance(payload, str) else json.dumps(payload)
    try:
        answer = scoring_server.invocations(body, "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    except MlflowException as e:
        return e.get_http_status_code(), e.serialize_as_json()
    return answer.status, answer.response


def assert_no_internals(body: str) -> None:
    assert "stack_trace" not in body and "Traceback" not in body and ".py" not in body, body[:2000]


def test_served_model_caps_the_request_before_inference(mlflow_store, monkeypatch):
    """At most 16 slices, each at most 1024x1024, 2 Mi pixels (8 slices of 512x512) in all, and a
    batch_size of 1..16: refused on the shape, before the network runs, with the limit in the message."""
    import covseg.model

    log_and_register(tiny_model())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    ran = []
    monkeypatch.setattr(covseg.model, "predict_logits", lambda model, images, batch_size, device: ran.append(
        images.shape) or np.zeros((len(images), 4, *images.shape[1:]), dtype=np.float32))
    for shape, limit in (((17, 1, 4, 4), "at most 16 slices"), ((1, 1, 1025, 4), "at most 1024x1024"),
                         ((1, 1, 4, 1025), "at most 1024x1024"),
                         ((3, 1, 1024, 1024), r"at most 2097152 pixels per request \(8 slices of 512x512\)"),
                         ((9, 1, 512, 512), r"at most 2097152 pixels")):
        with pytest.raises(MlflowException, match=limit) as refused:
            pyfunc.predict(np.zeros(shape, dtype=np.float32))
        assert refused.value.get_http_status_code() == 400
    for batch_size in (0, -1, 17, 10**9):
        with pytest.raises(MlflowException, match=r"batch_size must be 1\.\.16") as refused:
            pyfunc.predict(np.zeros((1, 1, 4, 4), dtype=np.float32), params={"batch_size": batch_size})
        assert refused.value.get_http_status_code() == 400
    assert ran == []  # nothing reached the network
    for shape in ((16, 1, 4, 4), (1, 1, 1024, 1024), (2, 1, 1024, 1024), (8, 1, 512, 512)):  # the caps themselves
        assert pyfunc.predict(np.zeros(shape, dtype=np.float32), params={"batch_size": 16}).shape == (
            shape[0], 4, *shape[2:])
    assert len(ran) == 4


@pytest.mark.parametrize("scale, norm, depth", [(0.25, "batch", 2), (0.5, "batch", 4), (1.0, "instance", 2),
                                                (0.5, "instance", 3)])
def test_served_model_segments_slices_of_any_size_down_to_one_pixel(tmp_path, scale, norm, depth):
    """Slices too small for the network (under one pixel at `train.scale`, or a single value per channel
    at an instance-norm bottleneck) are padded (edge values) for it and the logits cropped back;
    slices the network takes as they are give exactly the Segmenter's logits."""
    from types import SimpleNamespace

    from covseg.serving import SegmenterModel

    torch.manual_seed(0)
    net = Segmenter(UNet(base_channels=4, depth=depth, norm=norm), scale).eval()
    save_checkpoint(net, tmp_path / "c.pt")
    served = SegmenterModel()
    served.load_context(SimpleNamespace(artifacts={MODEL_CHECKPOINT: str(tmp_path / "c.pt")},
                                        model_config={"device": "cpu"}))
    rng = np.random.default_rng(3)
    for shape in ((1, 1, 1, 1), (1, 1, 1, 8), (2, 1, 2, 2), (1, 1, 3, 1), (1, 1, 8, 1), (1, 1, 5, 7)):
        x = rng.random(shape, dtype=np.float32)
        out = served.predict(None, x)
        assert out.shape == (shape[0], 4, *shape[2:]) and out.dtype == np.float32 and np.isfinite(out).all(), shape
    x = rng.random((2, 1, 64, 48), dtype=np.float32)
    np.testing.assert_array_equal(served.predict(None, x), logits(net, x))


def test_rest_errors_name_the_problem_and_carry_no_internals(mlflow_store, monkeypatch):
    """What the REST client gets: the docs' 2x2 example and a 1-pixel-high slice segmented at
    train.scale 0.25; each bad request a 400 that says what is wrong; a failure inside the model a 500;
    never a stack trace or a path."""
    import covseg.model

    net = tiny_model()
    net.scale = 0.25
    log_and_register(net)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    for x in ([[[[0.1, 0.2], [0.3, 0.4]]]], [[[[0.5] * 8]]]):
        status, body = rest(pyfunc, {"inputs": x, "params": {"batch_size": 4}})
        assert status == 200, body[:2000]
        assert np.asarray(json.loads(body)["predictions"]).shape == (1, 4, *np.shape(x)[2:])
    one = [[[[0.1, 0.2], [0.3, 0.4]]]]
    for payload, problem in (
            ({"inputs": [[[[-1000.0, 0.2], [0.3, 0.4]]]]}, r"windowed to \[0, 1\]"),
            ('{"inputs": [[[[NaN, 0.2], [Infinity, 0.4]]]]}', "NaN or inf"),
            ({"inputs": [[[["a", "b"], ["c", "d"]]]]}, "could not convert string to float"),
            ({"inputs": [[[0.1, 0.2], [0.3, 0.4]]]}, r"Shape of input \(1, 2, 2\) does not match expected shape"),
            ({"inputs": [[[[[0.1, 0.2], [0.3, 0.4]]]]]}, r"Shape of input \(1, 1, 1, 2, 2\)"),
            ({"inputs": [[[[0.1, 0.2], [0.3]]]]}, "inhomogeneous"),
            ({"inputs": one * 17}, "at most 16 slices"),
            ({"inputs": one, "params": {"batch_size": 0}}, r"batch_size must be 1\.\.16"),
            ({"inputs": one, "params": {"batch_size": 10**12}}, r"batch_size must be 1\.\.16"),
            ({"inputs": one, "params": {"batch_size": "x"}}, "batch_size")):
        status, body = rest(pyfunc, payload)
        assert status == 400 and re.search(problem, json.loads(body)["message"]), (payload, body[:2000])
        assert_no_internals(body)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error in /srv/covseg/src/covseg/model.py line 42")

    monkeypatch.setattr(covseg.model, "predict_logits", broken)
    status, body = rest(pyfunc, {"inputs": one})
    assert status == 500 and "could not segment" in json.loads(body)["message"], body[:2000]
    assert_no_internals(body)
    assert "/srv" not in body and "CUDA" not in body


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
    /invocations with the logits the model gives locally with its calibrated choices (class offsets, flip),
    as the evaluate stage registers it, a 1-pixel-high slice too (at train.scale 0.5), and refuses bad
    requests with a 400 that holds no stack trace."""
    from servers import model_server

    from covseg import calibration

    net = tiny_model()
    net.scale = 0.5
    net = calibration.apply(net, {"class_bias": [0.5, -0.25, 0.0, 0.0], "tta": True, "min_island": 0})
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
        assert bad.value.code == 400 and "windowed to [0, 1]" in (body := bad.value.read().decode())
        assert_no_internals(body)
        thin, _, _ = post(url, {"inputs": [[[[0.5] * 8]]]})
        assert np.asarray(thin["predictions"]).shape == (1, 4, 1, 8)
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(url, {"inputs": [[[[0.5]]]] * 17})
        assert bad.value.code == 400 and "at most 16 slices" in (body := bad.value.read().decode())
        assert_no_internals(body)
    print(f"REST round trip, 2 slices of 64x64, tiny model: {seconds:.2f} s")
