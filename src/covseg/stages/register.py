"""Step `register` (after `dvc repro`; not a DVC stage, so DVC's run cache never skips it): the evaluated model,
with the calibrated choices evaluate applied, logged to its training run in covseg's form (covseg.modelstore)
and registered as a version tagged with its out-of-fold scores, recipe key and provenance. Registering the
same model with the same choices again re-tags its version instead of making a new one."""
from __future__ import annotations

import json
from pathlib import Path

from covseg import calibration, modelstore, provenance, registry, tracking
from covseg.data import data_version
from covseg.errors import CovsegError
from covseg.model import load_checkpoint
from covseg.names import (
    HEADLINE_METRICS,
    KAGGLE_F1,
    OOF_PREFIX,
    PATHS,
    TAG_CALIBRATED,
    TAG_CHOICES,
    TAG_DATA_VERSION,
    TAG_OOF_FOLDS,
    TAG_OOF_SLICES,
    TAG_OOF_TRIVIAL,
    TAG_RECIPE_KEY,
)
from covseg.params import Registry, Tracking
from covseg.preprocessing import load_processed, load_split


def version_tags(metrics: dict, key: str) -> dict:
    """What the gate reads on a registered version: its recipe key, whether it is calibrated and, if so,
    its out-of-fold scores."""
    choices = {k.removeprefix("choice_"): v for k, v in metrics.items() if k.startswith("choice_")}
    tags = {TAG_RECIPE_KEY: key, TAG_CALIBRATED: str(bool(metrics["calibrated"])).lower(),
            TAG_CHOICES: json.dumps(choices, sort_keys=True)}
    if metrics["calibrated"]:
        tags.update({f"{OOF_PREFIX}{m}": round(metrics[m], 6) for m in HEADLINE_METRICS},
                    **{TAG_OOF_SLICES: metrics["oof_slices"], TAG_OOF_FOLDS: metrics["oof_folds"],
                       TAG_OOF_TRIVIAL: round(metrics[f"trivial_{KAGGLE_F1}"], 6)})
    return tags


def run(model: str | Path, metrics_path: str | Path, calibration_file: str | Path, data: str | Path,
        reg: Registry, trk: Tracking) -> dict:
    """Register `model` (the pipeline's checkpoint) as evaluate measured it in `metrics_path`: its MLflow
    training run gets the model with the choices `calibration_file` holds for its recipe key, registered as
    a version of `reg.model_name` with the tags of `version_tags` and its provenance (data version, training
    slice ids of `data`). Refuses a model without a tracked training run, and metrics of another model or
    calibration (run `dvc repro` first). Returns {model_version, mlflow_run_id, new, calibrated}."""
    net, ckpt = load_checkpoint(model, "cpu")
    run_id, key = ckpt.get("mlflow_run_id"), ckpt.get("recipe_key", "")
    if not run_id:
        raise CovsegError(f"{model} has no MLflow training run (trained outside the pipeline's train stage): "
                          f"nothing to register it under; run `dvc repro`")
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, ValueError) as e:
        raise CovsegError(f"{metrics_path}: not evaluate's metrics ({e}); run `dvc repro` first") from None
    choices, entry = calibration.choices_for(calibration_file, key, f"the model {model}")
    evaluated = {k.removeprefix("choice_"): v for k, v in metrics.items() if k.startswith("choice_")}
    if (metrics.get("mlflow_run_id") != run_id or metrics.get("recipe_key") != key or evaluated != choices
            or metrics.get("calibrated") is not (entry is not None)):
        raise CovsegError(f"{metrics_path} is not evaluate's measure of {model} with the choices {calibration_file} "
                          f"holds for it (run {metrics.get('mlflow_run_id')} vs {run_id}, recipe key "
                          f"{metrics.get('recipe_key')} vs {key}): run `dvc repro` first, then register")
    # the scores come from the calibration file, never from metrics.json alone (a file anyone can edit)
    scores = {"calibrated": entry is not None, **calibration.oof_metrics(entry),
              **{f"choice_{k}": v for k, v in choices.items()}}
    if any(metrics.get(k) != v for k, v in scores.items()):
        raise CovsegError(f"{metrics_path} does not hold the out-of-fold scores {calibration_file} holds for "
                          f"recipe key {key}: run `dvc repro` first, then register")
    tags = version_tags(scores, key)
    with tracking.resume(run_id, trk.experiment) as run:
        # the data version the run trained on (its tag), which must be the one data.dvc records here
        here, trained_on = data_version(Path(PATHS.dvc_file)), run.data.tags.get(TAG_DATA_VERSION, "")
        if trained_on and here != trained_on:
            raise CovsegError(f"{model} was trained on data version {trained_on}, but {PATHS.dvc_file} records "
                              f"{here or 'none'}: check out the data it was trained on (or run `dvc repro`), "
                              f"then register")
        # a version per calibrated model: registering the same choices again re-tags the version
        version = registry.find_version(reg.model_name, run_id, {TAG_CHOICES: tags[TAG_CHOICES]})
        if version is not None:
            try:
                modelstore.check_version_form(reg.model_name, version)
            except modelstore.FormError:  # logged the old way: log it again in covseg's form, as a new version
                version = None
        new = version is None
        if new:
            uri = modelstore.log(calibration.apply(net, choices), load_processed(data, "test")[0].shape[1:])
            version = registry.register(uri, reg.model_name, tags)
        else:
            registry.tag(reg.model_name, version, tags)
        provenance.record_provenance(reg.model_name, version, run_id, trained_on or here,
                                     load_split(data)["train_slice_ids"])
    return {"model_version": version, "mlflow_run_id": run_id, "new": new, "calibrated": entry is not None}
