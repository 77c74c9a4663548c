"""The model store: covseg models in MLflow, logged and loaded as data.

A covseg model is logged in one form only: an MLflow pyfunc whose `loader_module` is covseg.serving (MLflow
imports it from the installed covseg, never from the artifact) and whose one data file is a weights-only
checkpoint (`covseg.model.save_checkpoint`); no code files, no python_model, no pickle. `load` (submit,
predict, warm starts) and `covseg serve` read the checkpoint's weights and network config, and only
after `check_form`; the gate refuses a version of any other form before it compares scores
(`check_version_form`). Nothing in a registry entry decides what code runs here.

Layering: model (torch) <- serving (the pyfunc wrapper, MLflow's scoring server) <- modelstore (MLflow
artifacts) <- registry, gate, promotion, stages, cli. Tracking knows runs and tags only.
"""
from __future__ import annotations

import re
import reprlib
import tempfile
from pathlib import Path, PurePosixPath

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException

from covseg import calibration, serving, tracking
from covseg.errors import CovsegError
from covseg.model import Segmenter, load_checkpoint, save_checkpoint
from covseg.names import MODEL_CHECKPOINT_FILE

PYFUNC = "python_function"
# The python_function flavor keys MLflow writes for a loader_module model, with the values covseg's has.
FORM = {"loader_module": serving.LOADER_MODULE, "code": None, "streamable": False}
FORM_KEYS = {*FORM, "data", "env", "python_version"}
MAX_MLMODEL_BYTES = 64 * 1024  # covseg's is about 600 bytes
MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3  # the default ensemble's is a few MB
REREGISTER = ("log it again in covseg's form: `dvc repro` then `covseg register` in the checkout that trained it "
              "(docs/registry.md, \"Versions logged the old way\")")


def is_model_uri(spec: str | Path) -> bool:
    """An MLflow model URI (models:/covseg-unet@champion, runs:/...), not a checkpoint path."""
    return ":/" in str(spec)


def log(model: Segmenter, example_shape: tuple[int, int]) -> str:
    """Log `model` (a Segmenter, its inference choices included) to the active run in covseg's form; its URI.
    The signature takes any (N, 1, H, W); the input example is (1, 1, H, W)."""
    example = np.zeros((1, 1, *example_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        checkpoint = Path(tmp) / MODEL_CHECKPOINT_FILE
        save_checkpoint(model, checkpoint)
        info = mlflow.pyfunc.log_model(
            name="model", loader_module=serving.LOADER_MODULE, data_path=str(checkpoint),
            signature=serving.signature(), input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"mlflow=={mlflow.__version__}", "covseg"])
    return info.model_uri


class FormError(CovsegError):
    """A model that is not of the form covseg logs."""


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: an MLmodel is small data, never a graph that expands."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases are not allowed in an MLmodel")
        return super().compose_node(parent, index)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 160


def _short(value) -> str:
    """repr of a value read from an MLmodel, of bounded length."""
    return _REPR.repr(value)


def _read_meta(local: Path, what: str) -> dict:
    path = local / "MLmodel"
    try:
        if path.stat().st_size > MAX_MLMODEL_BYTES:
            raise FormError(f"{what}: its MLmodel is larger than {MAX_MLMODEL_BYTES} bytes; it is not a model "
                            f"covseg logged; {REREGISTER}")
        meta = yaml.load(path.read_text(), Loader=_NoAliases)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FormError(f"{what}: no readable MLmodel ({str(e)[:300]}); it is not a model covseg logged; "
                        f"{REREGISTER}") from None
    return meta


def _data_file(meta, what: str) -> str:
    """The relative path of the checkpoint when `meta` (an MLmodel, as data) is covseg's form (one flavor,
    python_function, with exactly the keys and values covseg logs); else a FormError naming `what`, the
    difference, and how to log it again."""
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavor = flavors.get(PYFUNC) if isinstance(flavors, dict) else None
    problems = []
    if not isinstance(flavor, dict):
        problems.append(f"no {PYFUNC} flavor")
    else:
        if set(flavors) != {PYFUNC}:
            problems.append(f"other flavors {_short(sorted(map(str, set(flavors) - {PYFUNC})))}")
        problems += [f"{key} {_short(flavor.get(key))} (covseg logs {want!r})" for key, want in FORM.items()
                     if flavor.get(key) != want]
        problems += [f"key {_short(key)}" for key in sorted(set(flavor) - FORM_KEYS, key=str)]
    data = flavor.get("data") if not problems else None
    parts = PurePosixPath(data).parts if isinstance(data, str) and "\0" not in data else ()
    if not problems and (not parts or parts[-1] != MODEL_CHECKPOINT_FILE or data.startswith("/")
                         or ".." in parts):
        problems.append(f"data {_short(data)} is not its {MODEL_CHECKPOINT_FILE}")
    if problems:
        raise FormError(f"{what} is not of the form covseg logs ({'; '.join(problems)}): covseg neither "
                        f"loads, serves nor promotes it, and runs none of its code; {REREGISTER}")
    return data


def check_form(local: Path, what: str) -> Path:
    """The checkpoint of the model downloaded to `local`, when its MLmodel is covseg's form and the checkpoint
    a file inside `local`; else a FormError. Reads the MLmodel as YAML data; imports nothing."""
    data = _data_file(_read_meta(local, what), what)
    try:
        checkpoint = (local / data).resolve()
        inside = checkpoint.is_relative_to(local.resolve()) and checkpoint.is_file()
    except (OSError, ValueError):
        inside = False
    if not inside:
        raise FormError(f"{what} is not of the form covseg logs (data {_short(data)} is not its "
                        f"{MODEL_CHECKPOINT_FILE}): covseg neither loads, serves nor promotes it; {REREGISTER}")
    return checkpoint


def _model_uri(uri: str) -> str:
    """`runs:/<run id>/<name>` as the URI of the logged model it names (`models:/<model id>`); others as they are."""
    if not uri.startswith("runs:/"):
        return uri
    run_id, _, name = uri.removeprefix("runs:/").partition("/")
    if not re.fullmatch(r"[0-9a-f]{32}", run_id) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CovsegError(f"model {uri}: not a run's model URI (runs:/<32 hex digits>/<model name>)")
    client = mlflow.MlflowClient()
    found = client.search_logged_models([client.get_run(run_id).info.experiment_id], f"name = '{name}'")
    ids = [m.model_id for m in found if m.source_run_id == run_id]
    if not ids:
        raise CovsegError(f"model {uri}: run {run_id} logged no model named {name}")
    return f"models:/{ids[-1]}"


def fetch(uri: str, dst: str | Path, what: str | None = None) -> Path:
    """Download into `dst` what covseg reads of the model at `uri`: its MLmodel (at most MAX_MLMODEL_BYTES)
    and, when that is covseg's form, its checkpoint (at most MAX_CHECKPOINT_BYTES); nothing else of the
    artifact. Returns `dst`. A CovsegError naming the store when it cannot, a FormError for another form."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(tracking.tracking_uri())
    dst, what = Path(dst), what or f"model {uri}"
    dst.mkdir(parents=True, exist_ok=True)

    def size_of(path: str) -> int | None:
        parent = str(PurePosixPath(path).parent)
        return {f.path: f.file_size for f in repo.list_artifacts("" if parent == "." else parent)
                if not f.is_dir}.get(path)

    try:
        repo = get_artifact_repository(_model_uri(uri))
        size = size_of("MLmodel")
        if size is None or size > MAX_MLMODEL_BYTES:
            found = "none in its artifact" if size is None else f"{size} bytes"
            raise FormError(f"{what}: no readable MLmodel ({found}); it is not a model covseg logged; {REREGISTER}")
        repo.download_artifacts("MLmodel", str(dst))
        data = _data_file(_read_meta(dst, what), what)
        size = size_of(data)
        if size is None or size > MAX_CHECKPOINT_BYTES:
            raise FormError(f"{what}: its checkpoint {data} is {'missing' if size is None else f'{size} bytes'} "
                            f"(at most {MAX_CHECKPOINT_BYTES}); {REREGISTER}")
        repo.download_artifacts(data, str(dst))
    except (MlflowException, OSError) as e:
        raise CovsegError(f"model {uri}: cannot be read from {tracking.tracking_uri()}: {e}") from e
    return dst


def load(spec: str | Path, device="cpu") -> tuple[Segmenter, dict]:
    """A checkpoint path or a model URI (`models:/covseg-unet@champion`, `runs:/...`): the Segmenter on
    `device` in eval mode and the checkpoint's facts. A URI's model must be of covseg's form; its checkpoint
    is read weights only, never unpickled."""
    if not is_model_uri(spec):
        return load_checkpoint(spec, device)
    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        checkpoint = check_form(fetch(str(spec), tmp), f"model {spec}")
        try:
            return load_checkpoint(checkpoint, device)
        except Exception as e:  # not a weights-only checkpoint, or weights that do not fit the network
            raise CovsegError(f"model {spec}: its checkpoint does not load, weights only, into covseg's "
                              f"network: {e}") from e


def load_calibrated(spec: str | Path, calibration_file: str | Path, device="cpu") -> tuple[Segmenter, dict]:
    """`load`, calibrated: a checkpoint with the choices `calibration_file` holds for its recipe
    key (neutral ones, with a warning, when it holds none); a registry model as it was registered (its
    choices were made when it was evaluated)."""
    net, ckpt = load(spec, device)
    if is_model_uri(spec):
        return net, ckpt
    choices, _ = calibration.choices_for(calibration_file, ckpt.get("recipe_key"), f"the model {spec}")
    return calibration.apply(net, choices), ckpt


def check_version_form(name: str, version: int) -> None:
    """Refuse (FormError) a registered version that is not of covseg's form; fetches its MLmodel (and, when that
    is covseg's, its checkpoint), loads nothing."""
    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        what = f"{name} v{int(version)}"
        check_form(fetch(f"models:/{name}/{int(version)}", tmp, what), what)
