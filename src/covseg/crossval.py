"""k-fold cross-validation of a recipe on the labelled slices, by the pipeline's own stages: how covseg
measures a recipe without ever looking at the test slices, and the out-of-fold logits it is calibrated on.

Fold k is the `preprocess` stage with `split.fold = k` (the folds of the folds file), the `train` stage on
the other folds (a tracked MLflow run in the experiment `<tracking.experiment>-cv`, resumable) and the
held-out slices' logits, plain and flip-averaged, saved as `fold<k>.npz` for `covseg calibrate`. A fold
already done for the same recipe and data is kept, so a killed run resumes where it stopped. Locally
`covseg cv` runs the folds one after another; the Prefect flow `cross_validate` runs one fold per worker.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from covseg import tracking
from covseg.atomic import atomic_output, write_json
from covseg.calibration import FOLD_FILE, NEUTRAL, predict, scores
from covseg.data import fingerprint, load_raw
from covseg.errors import ParamsError
from covseg.evaluation import per_slice_table
from covseg.model import load_checkpoint, pick_device, predict_logits
from covseg.names import CV_METRICS, PATHS, TAG_CV_FOLD
from covseg.params import Params, Tracking, recipe_key
from covseg.preprocessing import data_key, load_processed, read_folds
from covseg.stages import preprocess as preprocess_stage
from covseg.stages import train as train_stage
from covseg.stages import validate as validate_stage
from covseg.training import uses_bf16


def fold_logits(model, images: np.ndarray, batch_size: int, device) -> dict[str, np.ndarray]:
    """The held-out slices' logits of a model trained without inference-time choices: plain and
    flip-averaged (what the flip choice predicts), float16."""
    plain = predict_logits(model, images, batch_size, device)
    flipped = predict_logits(model, np.ascontiguousarray(images[..., ::-1]), batch_size, device)[..., ::-1]
    return {"logits": plain.astype(np.float16), "logits_tta": ((plain + flipped) / 2).astype(np.float16)}


def run_fold(raw: str | Path, params: Params, fold: int, folds_file: str | Path, report: str | Path,
             out: Path, key: str, data: str) -> dict:
    """Fold `fold` by the stages: preprocess with it held out, train on the rest (resumable from
    `out`/fold<k>.state.pt), save the held-out logits to `out`/fold<k>.npz (also an artifact of the fold's
    MLflow run, where the flow collects it from). Returns the fold's record, also `out`/fold<k>.json."""
    start = time.perf_counter()
    trk = Tracking(experiment=f"{params.tracking.experiment}-cv")
    with tempfile.TemporaryDirectory(prefix=f"covseg-cv-fold{fold}-") as tmp:
        processed, model = Path(tmp) / "processed", Path(tmp) / "model.pt"
        split = preprocess_stage.run(raw, processed, params.window, params.split.model_copy(update={"fold": fold}),
                                     folds_file, report)["split"]
        trained = train_stage.run(processed, model, out / f"fold{fold}.history.csv", params.seed, params.model,
                                  params.train, trk, {**params.flat(), "split.fold": fold},
                                  state=out / f"fold{fold}.state.pt")
        net, ckpt = load_checkpoint(model)
        images, labels = load_processed(processed, "val")
    if trained["recipe_key"] != key:
        raise RuntimeError(f"fold {fold} was trained as recipe {trained['recipe_key']}, not {key}")
    device = pick_device(params.train.device)
    logits = fold_logits(net.to(device), images, params.evaluate.batch_size, device)
    preds = predict(logits, NEUTRAL)
    fold_scores = scores(labels, preds)
    record = {"fold": fold, "recipe": key, "data": data, "metrics": {
        **fold_scores, "fold": fold, "train_slices": len(split["train_slice_ids"]), "val_slices": len(labels),
        "epoch": int(ckpt["epoch"]), "bf16": uses_bf16(params.train), "seconds": round(time.perf_counter() - start, 1),
        "mlflow_run_id": trained["mlflow_run_id"]},
        "per_slice": per_slice_table(labels, preds, split["val_slice_ids"]).assign(fold=fold).to_dict(orient="list")}
    npz = out / FOLD_FILE.format(k=fold)
    with atomic_output(npz) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **logits, labels=labels, ids=np.asarray(split["val_slice_ids"]), recipe=key,
                            data=data, recipe_name=params.recipe, folds=params.split.folds)
    with tracking.resume(trained["mlflow_run_id"], trk.experiment):
        mlflow.set_tag(TAG_CV_FOLD, fold)
        mlflow.log_metrics({f"oof_{m}": float(fold_scores[m]) for m in CV_METRICS if np.isfinite(fold_scores[m])})
        mlflow.log_artifact(str(npz), "cv")
    write_json(record, out / f"fold{fold}.json")
    for state in out.glob(f"fold{fold}.state*.pt"):
        state.unlink()
    return record


def summarise(folds: list[dict]) -> dict:
    """Mean and standard deviation over folds of each measure (neutral choices)."""
    frame = pd.DataFrame(folds)
    out = {}
    for m in CV_METRICS:
        out[f"{m}_mean"] = float(frame[m].mean())
        out[f"{m}_std"] = float(frame[m].std(ddof=1)) if len(frame) > 1 else 0.0
    out["train_seconds_mean"] = float(frame["seconds"].mean())
    return out


def cross_validate(raw: str | Path, params: Params, out: str | Path, folds: Sequence[int] | None = None,
                   folds_file: str | Path = PATHS.folds) -> dict:
    """Cross-validate `params` on the labelled slices of the Kaggle-layout folder `raw` (which must pass
    the data contract) in the folds of `folds_file`, into the folder `out`: fold<k>.npz / .json /
    .history.csv, per_slice.csv and summary.json (scores with neutral choices; `covseg calibrate` makes the
    choices). `folds` limits the run to some folds. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "validation.json"
    validate_stage.run(raw, report, params.validate_)  # raises ContractError: bad data never reaches training
    fold_of = read_folds(folds_file, load_raw(raw))
    k = int(fold_of.max()) + 1
    if k != params.split.folds:
        raise ParamsError(f"split.folds = {params.split.folds}, but {folds_file} has {k} folds: set split.folds "
                          f"to {k}, or run `covseg folds --force` to deal the slices again")
    folds = list(range(k)) if folds is None else sorted(set(folds))
    if not folds or any(f < 0 or f >= k for f in folds):
        raise ParamsError(f"folds {folds}: each must be in 0..{k - 1} ({folds_file} has {k} folds)")
    data = data_key(fingerprint(raw), fold_of, params.window)
    key = recipe_key(params.seed, params.model, params.train, data)
    records, trained, started = [], 0, time.perf_counter()
    for n, fold in enumerate(folds, 1):
        done_file = out / f"fold{fold}.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if done.get("recipe") != key or not (out / FOLD_FILE.format(k=fold)).is_file():
            done = run_fold(raw, params, fold, folds_file, report, out, key, data)
            trained += 1
        left = len(folds) - n
        eta = (f"; about {(time.perf_counter() - started) / trained * left / 60:.1f} min left" if trained and left
               else "")
        print(f"fold {fold} ({n} of {len(folds)}{eta}): "
              + "  ".join(f"{m} {done['metrics'][m]:.4f}" for m in CV_METRICS)
              + f"  ({done['metrics']['seconds']:.0f}s)", flush=True)
        records.append(done)
    pd.concat([pd.DataFrame(r["per_slice"]) for r in records]).to_csv(out / "per_slice.csv", index=False)
    summary = {"recipe": params.recipe, "recipe_key": key, "data_key": data, "data": str(raw), "folds": k,
               "folds_run": folds, **summarise([r["metrics"] for r in records]),
               "bf16": uses_bf16(params.train), "machine": f"{platform.machine()}, torch {torch.__version__}",
               "per_fold": [r["metrics"] for r in records], "params": params.flat()}
    write_json(summary, out / "summary.json")
    return summary


def describe(summary: dict) -> str:
    """One line per measure: mean +- std over folds (neutral choices)."""
    lines = [f"{len(summary['folds_run'])} of {summary['folds']} folds of recipe {summary['recipe']} "
             f"({summary['recipe_key']}), no inference-time choices (`covseg calibrate` makes them):"]
    for m in CV_METRICS:
        lines.append(f"  {m:18s} {summary[f'{m}_mean']:.4f} +- {summary[f'{m}_std']:.4f}")
    return "\n".join(lines) + f"\n  per fold training  {summary['train_seconds_mean']:.0f}s"
