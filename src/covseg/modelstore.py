"""The model store: covseg models in MLflow, logged and loaded as data.

A covseg model is logged in one form only: an MLflow pyfunc whose `loader_module` is covseg.serving (MLflow
imports it from the installed covseg, never from the artifact) and whose one data file is a weights-only
checkpoint (`covseg.model.save_checkpoint`); no code files, no python_model, no pickle. `load` (evaluate,
submit, predict, warm starts) and `covseg serve` read the checkpoint's weights and network config, and only
after `check_form`; the gate refuses a version of any other form before it compares scores
(`check_version_form`). Nothing in a registry entry decides what code runs here.

Layering: model (torch) <- serving (the pyfunc wrapper, MLflow's scoring server) <- modelstore (MLflow
artifacts) <- registry, gate, promotion, stages, cli. Tracking knows runs and tags only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import yaml
from mlflow.exceptions import MlflowException

from covseg import serving, tracking
from covseg.errors import CovsegError
from covseg.model import Segmenter, load_checkpoint
from covseg.names import MODEL_CHECKPOINT_FILE

PYFUNC = "python_function"
# The python_function flavor keys MLflow writes for a loader_module model, with the values covseg's has.
FORM = {"loader_module": serving.LOADER_MODULE, "code": None, "streamable": False}
FORM_KEYS = {*FORM, "data", "env", "python_version"}
REREGISTER = ("log it again in covseg's form: `dvc repro` then `covseg register` in the checkout that trained it "
              "(docs/registry.md, \"Versions logged the old way\")")


def is_model_uri(spec: str | Path) -> bool:
    """An MLflow model URI (models:/covseg-unet@champion, runs:/...), not a checkpoint path."""
    return ":/" in str(spec)


def log(model: Segmenter, example_shape: tuple[int, int]) -> str:
    """Log `model` (a Segmenter, its inference choices included) to the active run in covseg's form; its URI.
    The signature takes any (N, 1, H, W); the input example is (1, 1, H, W)."""
    import torch

    from covseg.model import save_checkpoint

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


def check_form(local: Path, what: str) -> Path:
    """The checkpoint of the model downloaded to `local`, when its MLmodel is covseg's form (one flavor,
    python_function, with exactly the keys and values covseg logs); else a CovsegError naming `what`, the
    difference, and how to log it again. Reads the MLmodel as YAML data; imports nothing."""
    try:
        meta = yaml.safe_load((local / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CovsegError(f"{what}: no readable MLmodel ({e}); it is not a model covseg logged") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavor = flavors.get(PYFUNC) if isinstance(flavors, dict) else None
    problems = []
    if not isinstance(flavor, dict):
        problems.append(f"no {PYFUNC} flavor")
    else:
        if set(flavors) != {PYFUNC}:
            problems.append(f"other flavors {sorted(set(flavors) - {PYFUNC})}")
        problems += [f"{key} {flavor.get(key)!r} (covseg logs {want!r})" for key, want in FORM.items()
                     if flavor.get(key) != want]
        problems += [f"key {key!r}" for key in sorted(set(flavor) - FORM_KEYS)]
    if not problems:  # flavor is a dict of covseg's keys; its data a path inside `local` (a NUL in it: not)
        try:
            checkpoint = (local / str(flavor.get("data", ""))).resolve()
            inside = (checkpoint.name == MODEL_CHECKPOINT_FILE and checkpoint.is_relative_to(local.resolve())
                      and checkpoint.is_file())
        except (OSError, ValueError):
            inside = False
        if not inside:
            problems.append(f"data {flavor.get('data')!r} is not its {MODEL_CHECKPOINT_FILE}")
    if problems:
        raise CovsegError(f"{what} is not of the form covseg logs ({'; '.join(problems)}): covseg neither "
                          f"loads, serves nor promotes it, and runs none of its code; {REREGISTER}")
    return checkpoint


def fetch(uri: str, dst: str | Path) -> Path:
    """Download the model at `uri` into `dst`; a CovsegError naming the store when it cannot."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):  # one line of error
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise CovsegError(f"model {uri}: cannot be read from {tracking.tracking_uri()}: {e}") from e


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


def check_version_form(name: str, version: int) -> None:
    """Refuse (CovsegError) a registered version that is not of covseg's form; downloads it, loads nothing."""
    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        check_form(fetch(f"models:/{name}/{int(version)}", tmp), f"{name} v{int(version)}")
