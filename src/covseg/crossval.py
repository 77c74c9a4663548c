"""k-fold cross-validation of a recipe on the labelled slices: how covseg chooses epochs and recipes
without ever looking at the test slices, and reports a mean and a spread instead of one lucky fold.

Each fold is the `preprocess` split with `split.fold = k` (the same folds, from the folds file), trained
with the stage's own loop and scored on its held-out slices, exactly as the pipeline would. Folds are
written as they finish (`fold<k>.json` beside the summary), so a killed run resumes where it stopped;
a fold recorded for other params or other data is run again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covseg.atomic import atomic_output, write_json
from covseg.data import fingerprint, load_raw, one_hot_to_index
from covseg.errors import ParamsError
from covseg.evaluation import confusion_matrix, dice_metrics, per_slice_table, summary_metrics
from covseg.model import Ensemble, Segmenter, load_checkpoint, members, pick_device, predict_labels, predict_logits
from covseg.names import DICE, KAGGLE_F1, PATHS
from covseg.params import Params
from covseg.preprocessing import read_folds, window
from covseg.training import train, uses_bf16
from covseg.validation import validate_raw

# what the summary reports as mean and spread over folds
CV_METRICS = (*DICE, "f1_ggo", "f1_consolidation", KAGGLE_F1, "pooled_f1")


def recipe_key(params: Params, data: str) -> str:
    """A hash of everything a fold's result depends on: the data and the params the stages read. Not the
    machine: not the device, nor whether train.amp trains in bfloat16 there (each fold records `bf16`),
    so folds run on a GPU are found done where they are summarised."""
    tree = params.tree()
    read = {"seed": tree["seed"], "window": tree["window"], "split": {"folds": tree["split"]["folds"]},
            "model": tree["model"], "train": {k: v for k, v in tree["train"].items() if k not in ("device", "amp")}}
    return hashlib.sha256(json.dumps([read, data], sort_keys=True).encode()).hexdigest()[:16]


def _scores(labels: np.ndarray, preds: np.ndarray) -> dict:
    return {**summary_metrics(confusion_matrix(labels, preds)), **dice_metrics(labels, preds)}


def run_fold(images: np.ndarray, labels: np.ndarray, ids: list, fold_of: np.ndarray, fold: int,
             params: Params, logits_out: Path | None = None, recipe: str = "") -> tuple[dict, pd.DataFrame]:
    """Train on every fold but `fold`, score `fold`: (metrics, per-slice table of the held-out slices).
    With `logits_out`, the held-out slices' logits (float16, without model.class_bias), labels and ids
    are saved there (.npz, with `recipe`), so the bias can be chosen by nested cross-validation."""
    tr, va = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        history = train(params.train, params.model, params.seed, images[tr], labels[tr], images[va], labels[va],
                        Path(tmp) / "model.pt")
        model, ckpt = load_checkpoint(Path(tmp) / "model.pt")
    device = pick_device(params.train.device)
    model = model.to(device)
    logits = predict_logits(model, images[va], params.evaluate.batch_size, device)
    raw = logits - np.asarray(model.class_bias, dtype=np.float32)[:, None, None]  # as trained
    if logits_out is not None:
        with atomic_output(logits_out) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, logits=raw.astype(np.float16), labels=labels[va],
                                ids=np.asarray([ids[i] for i in va]), recipe=recipe)
    preds = model.postprocess(torch.from_numpy(logits)).numpy()
    metrics = {**_scores(labels[va], preds), "fold": fold, "train_slices": len(tr), "val_slices": len(va),
               "epoch": int(ckpt["epoch"]), "bf16": uses_bf16(params.train),
               "seconds": round(time.perf_counter() - start, 1),
               "epoch_seconds": float(history["seconds"].mean())}
    # the inference-time levers, ablated on the same trained model at no training cost
    for lever, off in (("tta", {"tta": False}), ("min_island", {"min_island": 0}),
                       ("tta_and_min_island", {"tta": False, "min_island": 0}),
                       ("class_bias", {"class_bias": [0.0] * len(model.class_bias)})):
        if all(getattr(model, k) != v for k, v in off.items()):
            variant = copy.copy(model)
            variant.__dict__.update(off)
            preds_without = (variant.postprocess(torch.from_numpy(raw)).numpy() if lever == "class_bias" else
                             predict_labels(variant, images[va], params.evaluate.batch_size, device))
            scores = _scores(labels[va], preds_without)
            metrics.update({f"without_{lever}.{k}": v for k, v in scores.items() if k in CV_METRICS})
    # the ensemble's first member alone (the one-network training) and, from 3 members on, all but the last
    nets = members(model.unet)
    for lever, kept in (("members", nets[:1]), ("last_member", nets[:-1]))[:len(nets) - 1]:
        fewer = Segmenter(kept[0] if len(kept) == 1 else Ensemble(kept), model.scale, model.tta,
                          model.min_island, model.class_bias)
        scores = _scores(labels[va], predict_labels(fewer, images[va], params.evaluate.batch_size, device))
        metrics.update({f"without_{lever}.{k}": v for k, v in scores.items() if k in CV_METRICS})
    table = per_slice_table(labels[va], preds, [ids[i] for i in va]).assign(fold=fold)
    return metrics, table


def summarise(folds: list[dict], table: pd.DataFrame) -> dict:
    """Mean and standard deviation over folds, and the same measures over all held-out slices pooled."""
    frame = pd.DataFrame(folds)
    out = {"folds": len(frame)}
    ablated = [c for c in frame.columns if c.startswith("without_")]
    for m in (*CV_METRICS, *ablated):
        out[f"{m}_mean"] = float(frame[m].mean())
        out[f"{m}_std"] = float(frame[m].std(ddof=1)) if len(frame) > 1 else 0.0
    for d in DICE:  # every held-out slice that has the class, all folds together
        out[f"{d}_all_slices"] = float(table[d].mean())
    out["train_seconds_mean"] = float(frame["seconds"].mean())
    return out


def cross_validate(raw: str | Path, params: Params, out: str | Path, folds: Sequence[int] | None = None,
                   name: str = "", folds_file: str | Path = PATHS.folds) -> dict:
    """Cross-validate `params` on the labelled slices of the Kaggle-layout folder `raw` (which must
    pass the data contract), in the folds of `folds_file`; write `out` (summary JSON), `fold<k>.json` and
    `per_slice.csv` beside it. `folds` limits the run to some folds (the summary then says which).
    Returns the summary."""
    out = Path(out)
    data = load_raw(raw)
    validate_raw(data, params.validate_)  # raises ContractError: bad data never reaches training
    labels = one_hot_to_index(np.asarray(data.masks))
    images = window(np.asarray(data.images)[..., 0], params.window.hu_min, params.window.hu_max)
    fold_of = read_folds(folds_file, data)
    k = int(fold_of.max()) + 1
    folds = list(range(k)) if folds is None else sorted(set(folds))
    if not folds or any(f < 0 or f >= k for f in folds):
        raise ParamsError(f"folds {folds}: each must be in 0..{k - 1} ({folds_file} has {k} folds)")
    key = recipe_key(params, f"{fingerprint(raw)}:{fold_of.tolist()}")

    results, tables = [], []
    for fold in folds:
        fold_file = out.with_name(f"{out.stem}.fold{fold}.json")
        done = json.loads(fold_file.read_text()) if fold_file.is_file() else {}
        if done.get("recipe") != key:
            metrics, table = run_fold(images, labels, data.train_ids, fold_of, fold, params,
                                      fold_file.with_suffix(".logits.npz"), key)
            done = {"recipe": key, "metrics": metrics, "per_slice": table.to_dict(orient="list")}
            write_json(done, fold_file)
        print(f"fold {fold}: " + "  ".join(f"{m} {done['metrics'][m]:.4f}" for m in CV_METRICS)
              + f"  ({done['metrics']['seconds']:.0f}s)", flush=True)
        results.append(done["metrics"])
        tables.append(pd.DataFrame(done["per_slice"]))
    table = pd.concat(tables, ignore_index=True)
    summary = {"set": name, "recipe": key, "data": str(raw), "folds_run": folds, **summarise(results, table),
               "per_fold": results, "params": params.flat()}
    table.to_csv(out.with_name(f"{out.stem}.per_slice.csv"), index=False)
    write_json(summary, out)
    return summary


def describe(summary: dict) -> str:
    """One line per measure: mean +- std over folds."""
    lines = [f"{summary['folds']}-fold cross-validation ({summary['set'] or 'params.yaml'}):"]
    for m in CV_METRICS:
        lines.append(f"  {m:18s} {summary[f'{m}_mean']:.4f} +- {summary[f'{m}_std']:.4f}")
    return "\n".join(lines) + f"\n  per fold training  {summary['train_seconds_mean']:.0f}s"

