"""The registry model as data: weights only, loaded and served by the installed covseg, never by code a
registry entry names; checked, loaded and served with no unpickling.

A covseg version is a pyfunc whose loader_module is covseg.serving and whose one data file is a weights-only
checkpoint (covseg.modelstore). A version with covseg's weights and tags but code of its own (a models-from-code
file, a loader_module shipped in code_paths, a shadow covseg in code_paths) is refused by the gate, by
`covseg serve` and by every load, and none of its code runs. The MLflow tests run with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (the `mlflow_store` fixture)."""
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from projects import ROOT

from covseg import modelstore, provenance, registry, serving, tracking
from covseg.errors import CovsegError
from covseg.model import Segmenter, UNet, load_checkpoint, pick_device, save_checkpoint
from covseg.names import (
    CHALLENGER,
    CHAMPION,
    ENV_ALLOW_PICKLE,
    ENV_TRACKING_URI,
    HEADLINE_METRICS,
    MODEL_CHECKPOINT_FILE,
    TAG_PROMOTION,
)
from covseg.stages.register import version_tags

NAME = "covseg-unet"  # params.yaml's registry.model_name: the CLI tests read params.yaml
PARAMS = ["--params", str(ROOT / "params.yaml")]
MARKER_ENV = "COVSEG_TEST_MARKER"  # the tampered code writes the file it names, when imported or run
CPU = pick_device("cpu")
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # MLflow's scoring server sets it in os.environ


def tiny_model(seed: int = 0, base_channels: int = 4, depth: int = 2) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(UNet(base_channels=base_channels, depth=depth), 1.0).eval()


def logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def gate_tags(score: float) -> dict:
    """The tags `covseg register` sets on a calibrated version: out-of-fold `score` on every headline metric."""
    return version_tags({"calibrated": True, **{m: score for m in HEADLINE_METRICS}, "oof_slices": 40,
                         "oof_folds": 5, "trivial_kaggle_f1": 0.05}, "recipe-key")


def register(model_uri: str, run_id: str, score: float = 0.5) -> int:
    """Register `model_uri` as `covseg register` does: a version tagged with out-of-fold scores and provenance."""
    version = registry.register(model_uri, NAME, gate_tags(score))
    provenance.record_provenance(NAME, version, run_id, "md5-a", [1, 2, 3])
    return version


def log_and_register(model, size: int = 64, score: float = 0.5) -> tuple[str, int, str]:
    """Log `model` in covseg's form (modelstore.log) and register it; (the logged model's URI, version, run id)."""
    tracking.configure("covseg")
    with mlflow.start_run() as run:
        uri = modelstore.log(model, (size, size))
    return uri, register(uri, run.info.run_id, score), run.info.run_id


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


@pytest.fixture
def rest_client(monkeypatch):
    """rest_client(model) -> a TestClient of `covseg serve`'s app (serving.app: MLflow's scoring server) for the
    Segmenter `model` on the CPU, in process."""
    from fastapi.testclient import TestClient

    monkeypatch.delenv(SERVING_ENV, raising=False)  # restored afterwards: init sets it
    return lambda model: TestClient(serving.app(model, CPU))


def test_a_version_is_covseg_weights_and_loads_by_version_alias_and_run(mlflow_store, tmp_path, no_unpickling):
    """What is stored: a pyfunc whose loader_module is covseg.serving, no code, one weights-only checkpoint;
    modelstore.load (evaluate, submit, predict, serve) and mlflow.pyfunc.load_model give the same logits."""
    assert os.environ[ENV_ALLOW_PICKLE] == "false"
    net = tiny_model()
    model_uri, version, run_id = log_and_register(net)
    MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)
    x = np.random.default_rng(0).random((3, 1, 64, 48), dtype=np.float32)  # any N, H, W
    expected = logits(net, x)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(tmp_path / "m")))
    flavors = mlflow.models.Model.load(local / "MLmodel").flavors
    assert set(flavors) == {"python_function"}
    flavor = flavors["python_function"]
    assert flavor["loader_module"] == "covseg.serving" and flavor["code"] is None
    assert flavor["data"] == f"data/{MODEL_CHECKPOINT_FILE}" and set(flavor) <= modelstore.FORM_KEYS
    assert not list(local.rglob("*.py")) and not list(local.rglob("*.pkl"))
    assert modelstore.check_form(local, "v1") == (local / flavor["data"]).resolve()
    stored, facts = load_checkpoint(local / flavor["data"])
    assert np.array_equal(logits(stored, x), expected) and set(facts) >= {"config", "scale", "state_dict"}
    modelstore.check_version_form(NAME, version)  # what the gate asks first: no error

    for uri in (f"models:/{NAME}/{version}", f"models:/{NAME}@{CHAMPION}", model_uri, f"runs:/{run_id}/model"):
        model, facts = modelstore.load(uri)
        assert isinstance(model, Segmenter) and not model.training and facts["scale"] == 1.0
        assert np.array_equal(logits(model, x), expected), uri
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}", model_config={"device": "cpu"})
    out = pyfunc.predict(x)
    assert out.dtype == np.float32 and out.shape == (3, 4, 64, 48)
    assert np.array_equal(out, expected)
    # another batch size: the same logits up to float rounding (kernels differ by batch size)
    np.testing.assert_allclose(pyfunc.predict(x, params={"batch_size": 1}), expected, rtol=1e-5, atol=1e-5)
    assert no_unpickling == []


def test_served_model_rejects_bad_input():
    served = serving.ServedModel(tiny_model(), CPU)
    hu = np.full((1, 1, 64, 64), -1000, dtype=np.float32)  # Hounsfield units, not windowed
    with pytest.raises(MlflowException, match=r"windowed to \[0, 1\]"):
        served.predict(hu)
    with pytest.raises(MlflowException, match=r"shape \(N, 1, H, W\), got shape \(1, 3, 64, 64\)"):
        served.predict(np.zeros((1, 3, 64, 64), dtype=np.float32))  # three channels
    with pytest.raises(MlflowException, match="NaN or inf"):
        served.predict(np.full((1, 1, 64, 64), np.nan, dtype=np.float32))
    with pytest.raises(MlflowException, match="must be numbers"):
        served.predict(np.full((1, 1, 2, 2), "a"))


def test_served_model_caps_the_request_before_inference(monkeypatch):
    """At most 16 slices, each at most 1024x1024, 2 Mi pixels (8 slices of 512x512) in all, and a
    batch_size of 1..16: refused on the shape, before the network runs, with the limit in the message."""
    served = serving.ServedModel(tiny_model(), CPU)
    ran = []
    monkeypatch.setattr(serving, "predict_logits", lambda model, images, batch_size, device: ran.append(
        images.shape) or np.zeros((len(images), 4, *images.shape[1:]), dtype=np.float32))
    for shape, limit in (((17, 1, 4, 4), "at most 16 slices"), ((1, 1, 1025, 4), "at most 1024x1024"),
                         ((1, 1, 4, 1025), "at most 1024x1024"),
                         ((3, 1, 1024, 1024), r"at most 2097152 pixels per request \(8 slices of 512x512\)"),
                         ((9, 1, 512, 512), r"at most 2097152 pixels")):
        with pytest.raises(MlflowException, match=limit) as refused:
            served.predict(np.zeros(shape, dtype=np.float32))
        assert refused.value.get_http_status_code() == 400
    for batch_size in (0, -1, 17, 10**9, True, 2.0):
        with pytest.raises(MlflowException, match=r"batch_size must be 1\.\.16") as refused:
            served.predict(np.zeros((1, 1, 4, 4), dtype=np.float32), params={"batch_size": batch_size})
        assert refused.value.get_http_status_code() == 400
    assert ran == []  # nothing reached the network
    for shape in ((16, 1, 4, 4), (1, 1, 1024, 1024), (2, 1, 1024, 1024), (8, 1, 512, 512)):  # the caps themselves
        assert served.predict(np.zeros(shape, dtype=np.float32), params={"batch_size": 16}).shape == (
            shape[0], 4, *shape[2:])
    assert len(ran) == 4


@pytest.mark.parametrize("scale, norm, depth", [(0.25, "batch", 2), (0.5, "batch", 4), (1.0, "instance", 2),
                                                (0.5, "instance", 3)])
def test_served_model_segments_slices_of_any_size_down_to_one_pixel(tmp_path, scale, norm, depth):
    """Slices too small for the network (under one pixel at `train.scale`, or a single value per channel
    at an instance-norm bottleneck) are padded (edge values) for it and the logits cropped back;
    slices the network takes as they are give exactly the Segmenter's logits. Loaded as MLflow loads a
    covseg version: serving._load_pyfunc on its checkpoint."""
    torch.manual_seed(0)
    net = Segmenter(UNet(base_channels=4, depth=depth, norm=norm), scale).eval()
    save_checkpoint(net, tmp_path / MODEL_CHECKPOINT_FILE)
    served = serving._load_pyfunc(str(tmp_path / MODEL_CHECKPOINT_FILE), {"device": "cpu"})
    rng = np.random.default_rng(3)
    for shape in ((1, 1, 1, 1), (1, 1, 1, 8), (2, 1, 2, 2), (1, 1, 3, 1), (1, 1, 8, 1), (1, 1, 5, 7)):
        x = rng.random(shape, dtype=np.float32)
        out = served.predict(x)
        assert out.shape == (shape[0], 4, *shape[2:]) and out.dtype == np.float32 and np.isfinite(out).all(), shape
    x = rng.random((2, 1, 64, 48), dtype=np.float32)
    np.testing.assert_array_equal(served.predict(x), logits(net, x))


def assert_no_internals(body: str) -> None:
    assert "stack_trace" not in body and "Traceback" not in body and ".py" not in body, body[:2000]


def test_a_request_body_is_bounded_before_it_is_read(rest_client, monkeypatch):
    """MLflow's scoring server parses a whole body before the shape caps apply: covseg serve refuses one longer
    than MAX_REQUEST_BYTES, or of no stated length, first."""
    monkeypatch.setattr(serving, "MAX_REQUEST_BYTES", 1000)
    client = rest_client(tiny_model())
    small = json.dumps({"inputs": [[[[0.1, 0.2], [0.3, 0.4]]]]})
    assert client.post("/invocations", content=small, headers={"Content-Type": "application/json"}).status_code == 200
    big = json.dumps({"inputs": [[[[0.1] * 300]]]})
    answer = client.post("/invocations", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "at most 1000 bytes" in answer.json()["message"]
    chunked = client.post("/invocations", content=iter([small.encode()]), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 411


def test_rest_errors_name_the_problem_and_carry_no_internals(rest_client, monkeypatch):
    """What a REST client of `covseg serve` gets (its app, in process): the docs' 2x2 example and a
    1-pixel-high slice segmented at train.scale 0.25; each bad request a 400 that says what is wrong; a
    failure inside the model a 500; never a stack trace or a path."""
    net = tiny_model()
    net.scale = 0.25
    client = rest_client(net)
    assert client.get("/ping").status_code == 200
    for x in ([[[[0.1, 0.2], [0.3, 0.4]]]], [[[[0.5] * 8]]]):
        answer = client.post("/invocations", json={"inputs": x, "params": {"batch_size": 4}})
        assert answer.status_code == 200, answer.text[:2000]
        served = np.asarray(answer.json()["predictions"], dtype=np.float32)
        assert served.shape == (1, 4, *np.shape(x)[2:])
        np.testing.assert_allclose(served, serving.ServedModel(net, CPU).predict(np.asarray(x, np.float32)),
                                   rtol=1e-6, atol=1e-6)
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
        body = payload if isinstance(payload, str) else json.dumps(payload)
        answer = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and re.search(problem, answer.json()["message"]), (payload, answer.text[:2000])
        assert_no_internals(answer.text)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error in /srv/covseg/src/covseg/model.py line 42")

    monkeypatch.setattr(serving, "predict_logits", broken)
    answer = client.post("/invocations", json={"inputs": one})
    assert answer.status_code == 500 and "could not segment" in answer.json()["message"], answer.text[:2000]
    assert_no_internals(answer.text)
    assert "/srv" not in answer.text and "CUDA" not in answer.text


# ----------------------------------------------------------------------------- versions of another form

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MARKER_CODE = textwrap.dedent(f"""
    import os, pathlib
    if os.environ.get({MARKER_ENV!r}):
        pathlib.Path(os.environ[{MARKER_ENV!r}]).write_text(__name__ + " ran")
""")
# A models-from-code file in the old covseg's layout: it serves covseg's logits from the checkpoint artifact
# (so the version looks genuine), and runs whatever else it holds when MLflow loads it.
CODE_MODEL = textwrap.dedent("""
    import mlflow
    import numpy as np
    import torch

    from covseg.model import load_checkpoint


    class Model(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.net = load_checkpoint(context.artifacts["checkpoint"])[0]

        def predict(self, context, model_input, params=None):
            with torch.no_grad():
                return self.net(torch.from_numpy(np.asarray(model_input, dtype=np.float32))).numpy()


    mlflow.models.set_model(Model())
""")


def log_other_form(tmp_path: Path, net: Segmenter, how: str) -> str:
    """Log `net`'s real weights-only checkpoint in a form other than covseg's, to the active run; its URI.
    how: `code` (models from code, python_model=, the old covseg's layout, code that writes the marker),
    `old` (the same layout, honest code: a version the old covseg logged), `loader` (a loader_module of its own
    shipped in code_paths, writing the marker when imported), `shadow` (loader_module covseg.serving, with a
    covseg package in code_paths, which MLflow puts first on sys.path, whose serving module writes the marker)."""
    checkpoint = tmp_path / "weights" / MODEL_CHECKPOINT_FILE
    checkpoint.parent.mkdir(exist_ok=True)
    save_checkpoint(net, checkpoint)
    common = {"name": "model", "signature": serving.signature(), "pip_requirements": ["covseg"]}
    if how in ("code", "old"):
        code = _write(tmp_path / how / "mlflow_model.py", (MARKER_CODE if how == "code" else "") + CODE_MODEL)
        info = mlflow.pyfunc.log_model(python_model=str(code), artifacts={"checkpoint": str(checkpoint)}, **common)
    elif how == "loader":
        module = f"covseg_loader_{tmp_path.name.replace('-', '_')}"
        code = _write(tmp_path / "loader" / f"{module}.py", MARKER_CODE + "\nfrom covseg.serving import _load_pyfunc\n")
        info = mlflow.pyfunc.log_model(loader_module=module, data_path=str(checkpoint), code_paths=[str(code)],
                                       **common)
    else:
        shadow = tmp_path / "shadow" / "covseg"
        _write(shadow / "__init__.py", "")
        _write(shadow / "serving.py", MARKER_CODE + "\ndef _load_pyfunc(data_path, model_config=None):\n    pass\n")
        info = mlflow.pyfunc.log_model(loader_module="covseg.serving", data_path=str(checkpoint),
                                       code_paths=[str(shadow)], **common)
    return info.model_uri


PROBLEMS = {"code": r"loader_module 'mlflow\.pyfunc\.loaders\.code_model' \(covseg logs 'covseg\.serving'\).*"
                    r"key 'model_code_path'",
            "loader": r"loader_module 'covseg_loader_\w+' \(covseg logs 'covseg\.serving'\); code 'code' "
                      r"\(covseg logs None\)",
            "shadow": r"\(code 'code' \(covseg logs None\)\): covseg neither"}


@pytest.mark.parametrize("how", ["code", "loader", "shadow"])
def test_a_version_with_covseg_weights_and_tags_but_other_code_is_refused_and_none_of_it_runs(
        mlflow_store, tmp_path, monkeypatch, capsys, params, how):
    """A version registered with covseg's real weights and the tags the gate needs, and better out-of-fold
    scores than the champion, but code of its own: the gate (`covseg promote`, by the gate or --force), `covseg
    serve` and modelstore.load refuse it naming the form problem; no alias moves; its code never runs. The same
    weights and tags in covseg's form are promoted: only the form decides. (MLflow itself would run the code.)"""
    from covseg import promotion
    from covseg.cli import main

    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    net = tiny_model()
    _, champion, _ = log_and_register(net, score=0.5)
    assert promotion.promote(params.registry, champion)["promoted"]
    with mlflow.start_run() as run:
        monkeypatch.delenv(MARKER_ENV)  # MLflow runs a models-from-code file when it logs it
        uri = log_other_form(tmp_path, net, how)
        monkeypatch.setenv(MARKER_ENV, str(marker))
    assert not marker.exists()
    tampered = register(uri, run.info.run_id, score=0.9)
    problem = PROBLEMS[how]
    before = registry.aliases(NAME)
    assert before == {CHALLENGER: champion, CHAMPION: champion}

    with pytest.raises(CovsegError, match=rf"^{NAME} v{tampered} is not of the form covseg logs \(") as refused:
        promotion.promote(params.registry, tampered)
    assert re.search(problem, str(refused.value)) and "runs none of its code" in str(refused.value)
    with pytest.raises(CovsegError, match=rf"^{NAME} v{tampered} is not of the form covseg logs"):
        promotion.set_champion(params.registry, tampered)
    with pytest.raises(CovsegError, match=rf"^model models:/{NAME}/{tampered} is not of the form covseg logs"):
        modelstore.load(f"models:/{NAME}/{tampered}")
    served = []
    monkeypatch.setattr(serving, "serve", lambda *args: served.append(args))
    capsys.readouterr()
    for args in (["promote", "--version", str(tampered)], ["promote", "--version", str(tampered), "--force"],
                 ["serve", "--model", f"models:/{NAME}/{tampered}", "--device", "cpu"]):
        assert main([*PARAMS, *args]) == 1, args
        err = capsys.readouterr().err
        assert re.search(rf"covseg {args[0]}: error: (model models:/)?{NAME}(/| v){tampered} is not of the form "
                         rf"covseg logs \(", err) and re.search(problem, err), err
        assert "covseg register" in err
    assert served == []
    assert registry.aliases(NAME) == before, "nothing moved"
    assert TAG_PROMOTION not in MlflowClient().get_model_version(NAME, str(tampered)).tags
    assert not marker.exists(), "code of the registry entry ran"

    # only the form decided: the same weights and tags in covseg's form are promoted
    with mlflow.start_run() as run:
        genuine = register(modelstore.log(net, (64, 64)), run.info.run_id, score=0.9)
    assert promotion.promote(params.registry, genuine)["promoted"]
    assert registry.aliases(NAME) == {CHALLENGER: genuine, CHAMPION: genuine}
    assert not marker.exists()
    if how != "shadow":  # what covseg refused is live code: MLflow's own loader runs it (the shadow: slow test)
        monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow puts code_paths first; restored afterwards
        mlflow.pyfunc.load_model(f"models:/{NAME}/{tampered}")
        assert marker.exists()


def test_a_version_logged_the_old_way_is_refused_naming_covseg_register(mlflow_store, tmp_path, params,
                                                                        no_unpickling):
    """A version the old covseg logged (models from code: python_model= its code file, the checkpoint as an
    artifact) is refused by load, serve and the gate, with the command that logs it again."""
    from covseg import promotion

    tracking.configure("covseg")
    with mlflow.start_run() as run:
        uri = log_other_form(tmp_path, tiny_model(), "old")
    version = register(uri, run.info.run_id)
    for refuse in (lambda: modelstore.load(f"models:/{NAME}/{version}"), lambda: modelstore.load(uri),
                   lambda: promotion.promote(params.registry, version)):
        with pytest.raises(CovsegError, match=r"is not of the form covseg logs \(.*\): covseg neither loads, serves "
                                              r"nor promotes it, and runs none of its code; log it again in covseg's "
                                              r"form: `dvc repro` then `covseg register` in the checkout that trained "
                                              r"it \(docs/registry\.md, \"Versions logged the old way\"\)$"):
            refuse()
    assert registry.aliases(NAME) == {}
    assert no_unpickling == []


def test_covseg_register_logs_a_version_logged_the_old_way_again_in_covseg_form(mlflow_store, tmp_path, params,
                                                                               monkeypatch):
    """The way out that the refusal names: in the checkout that trained it, `covseg register` (after `dvc repro`
    restored the checkpoint, the metrics and the data) makes a new version of covseg's form, though the old
    version comes from the same training run and carries the same inference choices."""
    from covseg.calibration import NEUTRAL
    from covseg.stages import register as register_stage

    monkeypatch.chdir(tmp_path)  # no data.dvc here: data version unknown
    net, key = tiny_model(), "recipe-key"
    tracking.configure(params.tracking.experiment)
    with mlflow.start_run() as run:  # the training run, and the version the old covseg logged to it
        old_uri = log_other_form(tmp_path, net, "old")
    run_id = run.info.run_id
    metrics = {"mlflow_run_id": run_id, "recipe_key": key, "calibrated": False,
               **{f"choice_{k}": v for k, v in NEUTRAL.items()}}
    old = registry.register(old_uri, NAME, version_tags(metrics, key))
    # what `dvc repro` restores: the checkpoint, evaluate's metrics, the processed data
    save_checkpoint(net, tmp_path / "model.pt", mlflow_run_id=run_id, recipe_key=key)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "test_images.npy", np.zeros((1, 64, 64), dtype=np.float32))
    (tmp_path / "data" / "split.json").write_text(json.dumps({"train_slice_ids": [1, 2, 3]}))

    result = register_stage.run(tmp_path / "model.pt", tmp_path / "metrics.json", tmp_path / "calibration.json",
                                tmp_path / "data", params.registry, params.tracking)
    assert result["new"] and result["model_version"] != old and result["mlflow_run_id"] == run_id, result
    modelstore.check_version_form(NAME, result["model_version"])
    x = np.random.default_rng(4).random((1, 1, 64, 64), dtype=np.float32)
    assert np.array_equal(logits(modelstore.load(f"models:/{NAME}/{result['model_version']}")[0], x), logits(net, x))


def test_pickled_model_version_is_refused_unread(mlflow_store, no_unpickling):
    """An old `mlflow.pytorch` pickle version in the registry: one clear error, nothing unpickled."""
    tracking.configure("covseg")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(tiny_model(), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME)
    with pytest.raises(CovsegError, match=rf"models:/{NAME}/1 is not of the form covseg logs \(other flavors "
                                          r"\['pytorch'\]; loader_module 'mlflow\.pytorch'.*`covseg register`"):
        modelstore.load(f"models:/{NAME}/1")
    with pytest.raises(CovsegError, match=rf"^{NAME} v1 is not of the form covseg logs"):
        modelstore.check_version_form(NAME, 1)
    assert no_unpickling == []


def test_checkpoint_that_is_not_weights_only_is_refused(mlflow_store, tmp_path):
    """A model in covseg's form whose checkpoint holds a pickled object fails to load, weights only."""
    whole = tmp_path / "whole" / MODEL_CHECKPOINT_FILE
    whole.parent.mkdir()
    torch.save(tiny_model(), whole)  # the whole module, pickled
    tracking.configure("covseg")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", loader_module=serving.LOADER_MODULE, data_path=str(whole),
                                       pip_requirements=["covseg"])
    with pytest.raises(CovsegError, match=rf"model {info.model_uri}: its checkpoint does not load, weights only"):
        modelstore.load(info.model_uri)
    with pytest.raises(CovsegError, match="models:/nope/1: cannot be read"):
        modelstore.load("models:/nope/1")


def _mlmodel(root: Path, flavors, data: bytes | None = b"weights") -> Path:
    import yaml

    root.mkdir(parents=True)
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}) if not isinstance(flavors, str) else flavors)
    if data is not None:
        (root / "data").mkdir()
        (root / "data" / MODEL_CHECKPOINT_FILE).write_bytes(data)
    return root


GOOD = {"loader_module": "covseg.serving", "code": None, "streamable": False, "data": "data/checkpoint.pt",
        "env": {"virtualenv": "python_env.yaml"}, "python_version": "3.11.7"}


@pytest.mark.parametrize("flavors, problem", [
    ("flavors: [unclosed", "no readable MLmodel"),
    ("- a list", r"\(no python_function flavor\)"),
    ({"python_function": ["a", "list"]}, r"\(no python_function flavor\)"),
    ({"python_function": "covseg.serving"}, r"\(no python_function flavor\)"),
    ({"python_function": {**GOOD, "data": "../outside/checkpoint.pt"}}, r"data '\.\./outside/checkpoint\.pt' is not"),
    ({"python_function": {**GOOD, "data": "/etc/checkpoint.pt"}}, r"data '/etc/checkpoint\.pt' is not its"),
    ({"python_function": {**GOOD, "data": "data/other.pt"}}, r"data 'data/other\.pt' is not its checkpoint\.pt"),
    ({"python_function": {**GOOD, "data": "data/\0checkpoint.pt"}}, r"data 'data/\\x00checkpoint\.pt' is not its"),
    ({"python_function": {k: v for k, v in GOOD.items() if k != "data"}}, "data None is not its"),
    ({"python_function": {**GOOD, "model_config": {"device": "cpu"}}}, r"key 'model_config'"),
    ({"python_function": {**GOOD, "streamable": True}}, r"streamable True \(covseg logs False\)"),
    ({"python_function": GOOD, "pytorch": {"pickle_module_name": "pickle"}}, r"other flavors \['pytorch'\]"),
    ({"python_function": {**GOOD, 1: "a", "b": "c"}}, r"key 1; key 'b'"),  # keys of mixed types: no crash
    # a "billion laughs" MLmodel: aliases are refused before anything expands them
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nflavors: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     r"no readable MLmodel \(YAML aliases are not allowed"),
    ("flavors: {}\n" + "#" * 70_000, r"its MLmodel is larger than 65536 bytes"),
])
def test_check_form_refuses_anything_but_covseg_form_in_one_error(tmp_path, flavors, problem):
    """check_form reads the MLmodel as data: whatever it holds, a CovsegError naming the problem, never a crash."""
    assert modelstore.check_form(_mlmodel(tmp_path / "good", {"python_function": GOOD}), "good") == (
        tmp_path / "good" / "data" / MODEL_CHECKPOINT_FILE).resolve()
    with pytest.raises(CovsegError, match=rf"^bad.*{problem}") as refused:
        modelstore.check_form(_mlmodel(tmp_path / "bad", flavors), "bad")
    assert "`covseg register`" in str(refused.value) or "no readable MLmodel" in str(refused.value)


def test_only_the_mlmodel_and_the_checkpoint_are_downloaded(mlflow_store, tmp_path):
    """A version's other artifacts (here a large file beside covseg's) are never fetched: fetch lists the
    artifact, downloads the MLmodel, checks it, then downloads the checkpoint it names (within size caps)."""
    _, version, _ = log_and_register(tiny_model())  # covseg's form
    uri = f"models:/{NAME}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "all")))
    assert (local / "requirements.txt").is_file(), "the version has more than covseg reads"
    fetched = modelstore.fetch(uri, tmp_path / "fetched")
    assert sorted(str(f.relative_to(fetched)) for f in fetched.rglob("*") if f.is_file()) == [
        "MLmodel", f"data/{MODEL_CHECKPOINT_FILE}"]


def test_check_form_refuses_a_checkpoint_that_links_outside(tmp_path):
    model = _mlmodel(tmp_path / "m", {"python_function": GOOD}, data=None)
    (tmp_path / "elsewhere.pt").write_bytes(b"weights")
    (model / "data").mkdir()
    (model / "data" / MODEL_CHECKPOINT_FILE).symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(CovsegError, match=r"data 'data/checkpoint\.pt' is not its checkpoint\.pt"):
        modelstore.check_form(model, "m")


def test_checkpoint_facts_survive_a_round_trip(tmp_path):
    """The checkpoint the registry stores is the one save_checkpoint writes (config, scale, weights)."""
    net = tiny_model()
    save_checkpoint(net, tmp_path / "c.pt", epoch=3)
    model, facts = load_checkpoint(tmp_path / "c.pt")
    assert facts["epoch"] == 3 and facts["scale"] == 1.0
    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    assert np.array_equal(logits(model, x), logits(net, x))


# ----------------------------------------------------------------------------- a real server

def post(url: str, payload: dict) -> tuple[dict, float, int]:
    """POST JSON; returns (the answer, the seconds it took, the request's size in bytes)."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - t, len(body)


@pytest.mark.slow
def test_covseg_serve_serves_the_champion_and_refuses_other_code(mlflow_store, tmp_path):
    """`covseg serve` (a process on 127.0.0.1, pickle deserialization off) answers /invocations for
    models:/covseg-unet@champion with the logits the model gives in process with its calibrated choices (class
    offsets, flip), a 1-pixel-high slice too (at train.scale 0.5), and refuses bad requests with a 400 that
    holds no stack trace. `covseg serve` of a version with a shadow covseg in code_paths exits 1 naming the
    form, and runs none of it (a fresh `mlflow.pyfunc.load_model` process would)."""
    from servers import covseg_server

    from covseg import calibration

    net = tiny_model()
    net.scale = 0.5
    net = calibration.apply(net, {"class_bias": [0.5, -0.25, 0.0, 0.0], "tta": True, "min_island": 0})
    _, version, _ = log_and_register(net)
    MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)
    x = np.random.default_rng(2).random((2, 1, 64, 64), dtype=np.float32)
    env = {ENV_TRACKING_URI: mlflow_store, ENV_ALLOW_PICKLE: "false"}
    with covseg_server(tmp_path, None, env) as url:
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
    log = (tmp_path / "covseg-serve.log").read_text()
    assert f"serving models:/{NAME}@{CHAMPION} on http://127.0.0.1:" in log, log[-2000:]

    marker = tmp_path / "marker"
    with mlflow.start_run() as run:
        uri = log_other_form(tmp_path, tiny_model(), "shadow")
    shadowed = register(uri, run.info.run_id, score=0.9)
    env[MARKER_ENV] = str(marker)
    refused = subprocess.run([str(Path(sys.executable).parent / "covseg"), *PARAMS, "serve", "--model",
                              f"models:/{NAME}/{shadowed}", "--device", "cpu", "--port", "1"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert re.search(rf"covseg serve: error: model models:/{NAME}/{shadowed} is not of the form covseg logs "
                     r"\(code 'code' \(covseg logs None\)\).*`covseg register`", refused.stderr), refused.stderr[-3000:]
    assert not marker.exists()
    loaded = subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model('models:/{NAME}/"
                                                   f"{shadowed}')"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert marker.read_text() == "covseg.serving ran", loaded.stderr[-3000:]  # MLflow imported the shadow covseg
