"""Inference-time choices (class offsets, test-time flip, island removal), chosen on out-of-fold logits.

`covseg cv` saves each fold's held-out logits (`fold<k>.npz`: plain and flip-averaged); `covseg calibrate`
chooses on them, within params.yaml:calibrate, the choices that maximise `objective`, and measures them
honestly by nested cross-validation: fold k is scored with the choices made on the other folds only. The
choices made on all folds and the nested out-of-fold scores are written to calibration.json (committed)
under the recipe key (params.recipe_key: the training params and the data), so a calibration change never
retrains. Evaluate, submit and predict apply the entry of their model's key, or neutral choices (none) with
a warning; the promotion gate compares the out-of-fold scores and refuses a model without them.
"""
from __future__ import annotations

import copy
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from covseg.atomic import write_json
from covseg.errors import CovsegError
from covseg.evaluation import confusion_matrix, dice_metrics, summary_metrics, trivial_score
from covseg.model import Segmenter, class_index, remove_islands, valid_choices
from covseg.names import CV_METRICS, DICE, KAGGLE_F1, NUM_CLASSES, SCORED, SHORT
from covseg.params import Calibrate

NEUTRAL = {"class_bias": [0.0] * NUM_CLASSES, "tta": False, "min_island": 0}
F1 = tuple(f"f1_{SHORT[c]}" for c in SCORED)
FOLD_FILE = "fold{k}.npz"  # in a `covseg cv` folder: a fold's held-out logits, labels and ids


# ------------------------------------------------------------------------------ applying choices


def apply(model: Segmenter, choices: dict) -> Segmenter:
    """A copy of `model` (sharing its weights) that predicts with `choices`."""
    out = copy.copy(model)
    out.__dict__.update(class_bias=[float(b) for b in choices["class_bias"]], tta=bool(choices["tta"]),
                        min_island=int(choices["min_island"]))
    return out


def read(path: str | Path) -> dict:
    """{recipe key: entry} of a calibration file ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovsegError(f"{path}: not valid JSON ({exc}); restore it from git or run `covseg calibrate`") from None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and "choices" in e for e in entries.values()):
        raise CovsegError(f"{path}: not a calibration file ({{recipe key: {{'choices': ..., 'oof': ...}}}})")
    for key, entry in entries.items():
        check_choices(entry["choices"], f"{path}: {key}")
    return entries


def check_choices(choices, where: str) -> dict:
    """`choices` when they are what `apply` takes (data, checked); else one CovsegError naming `where`."""
    ok = (isinstance(choices, dict) and set(choices) == set(NEUTRAL)
          and valid_choices(choices["class_bias"], choices["tta"], choices["min_island"]))
    if not ok:
        raise CovsegError(f"{where}: choices {choices!r} are not {{'class_bias': [{NUM_CLASSES} numbers in -10..10], "
                          f"'tta': true|false, 'min_island': pixels}}")
    return choices


def lookup(path: str | Path, key: str | None) -> dict | None:
    """The entry of `key` in the calibration file at `path`, or None."""
    return read(path).get(key) if key else None


def choices_for(path: str | Path, key: str | None, what: str) -> tuple[dict, dict | None]:
    """(choices, entry) for a model of recipe key `key`: the calibrated ones, or NEUTRAL with a warning
    on stderr that names `what` and the commands that make a calibration."""
    entry = lookup(path, key)
    if entry is None:
        print(f"covseg: warning: no calibration for {what} (recipe key {key or 'unknown'}) in {path}: neutral "
              f"inference choices (no class offset, no flip, no island removal), no out-of-fold scores, and the "
              f"promotion gate will refuse it; make one with `covseg cv` then `covseg calibrate`", file=sys.stderr)
        return dict(NEUTRAL), None
    return entry["choices"], entry


def oof_metrics(entry: dict | None) -> dict:
    """The recipe's nested out-of-fold scores of a calibration entry, as metrics (mean and _std of each
    measure, the slices and folds they come from, the constant predictor's kaggle_f1 on them); {} without."""
    if entry is None:
        return {}
    oof = entry["oof"]
    return {**{m: oof[f"{m}_mean"] for m in CV_METRICS}, **{f"{m}_std": oof[f"{m}_std"] for m in CV_METRICS},
            "oof_slices": oof["slices"], "oof_folds": oof["folds"], f"trivial_{KAGGLE_F1}": oof[f"trivial_{KAGGLE_F1}"]}


# ------------------------------------------------------------------------------ scoring choices


def labels_of(logits: np.ndarray, bias, min_island: int = 0) -> np.ndarray:
    """Class indices of (N, C, H, W) logits with `bias` (C,) added, findings under `min_island` px removed."""
    shifted = torch.from_numpy(np.asarray(logits)).float() + torch.tensor(bias, dtype=torch.float32)[:, None, None]
    labels = class_index(shifted).numpy()
    return remove_islands(labels, shifted.numpy(), min_island) if min_island > 0 else labels


def scores(labels: np.ndarray, preds: np.ndarray) -> dict:
    """The cross-validation measures (names.CV_METRICS) of `preds` against `labels`."""
    pixel = summary_metrics(confusion_matrix(labels, preds))
    return {**dice_metrics(labels, preds), **{m: pixel[m] for m in CV_METRICS if m in pixel}}


def objective(s: dict) -> float:
    """What the choices maximise: the mean of the scored classes' per-slice Dice (the published measure,
    blind to findings called on slices without that class) and pixel F1 (which counts them)."""
    return float(np.nanmean([s[m] for m in (*DICE, *F1)]))


class Search:
    """`objective` of many offsets (no island removal) on the same slices, fast: each pixel is reduced to
    the margins of the scored classes over its best other class, and a pixel that no scored class can win
    with the largest offset is dropped (it keeps its other class whatever the offsets). Ties go to the lower
    class index, as argmax does. Gives the same scores as `scores` (tests/test_calibration.py)."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray, grid):
        if SCORED != (0, 1):
            raise NotImplementedError("the margins below assume the scored classes are 0 and 1")
        self.top = max(grid)
        lg = torch.from_numpy(np.asarray(logits)).float()
        margins = (lg[:, :2] - lg[:, 2:].amax(1)[:, None]).permute(0, 2, 3, 1)  # (N, H, W, 2)
        open_ = margins.amax(-1) + max(self.top, 0.0) >= 0
        self.n = len(labels)
        self.slice_of = torch.arange(self.n)[:, None, None].expand_as(open_)[open_].numpy()
        self.margins = margins[open_].numpy()
        truth = np.asarray(labels)[open_.numpy()]
        self.truth = [truth == c for c in SCORED]
        self.support = np.stack([(np.asarray(labels) == c).sum((1, 2)) for c in SCORED], 1)

    def objective(self, bias) -> float:
        if max(bias[:2]) > max(self.top, 0.0) or any(bias[2:]):
            raise ValueError(f"offsets {bias}: only scored classes, at most {self.top} (the grid's largest)")
        g, k = self.margins[:, 0] + bias[0], self.margins[:, 1] + bias[1]
        calls = [(g >= k) & (g >= 0), (k > g) & (k >= 0)]
        values = []
        for i, found in enumerate(calls):
            tp = np.bincount(self.slice_of[found & self.truth[i]], minlength=self.n)
            called = np.bincount(self.slice_of[found], minlength=self.n)
            has = self.support[:, i] > 0
            values.append(float(np.mean(2 * tp[has] / (self.support[has, i] + called[has]))) if has.any() else np.nan)
            total = self.support[:, i].sum() + called.sum()
            values.append(2 * tp.sum() / total if total else 1.0)
        return float(np.nanmean(values))


def choose_bias(logits: np.ndarray, labels: np.ndarray, grid, classes) -> tuple[list[float], float]:
    """(offsets, objective): the offsets of `classes` (scored class indices; the others stay 0) on `grid`
    that maximise `objective` on these slices; zero unless an offset does strictly better, and the
    smallest offsets among equals."""
    search = Search(logits, labels, grid)
    best_bias = [0.0] * NUM_CLASSES
    best = search.objective(best_bias)
    for combo in sorted(itertools.product(grid, repeat=len(classes)), key=lambda c: sum(map(abs, c))):
        bias = [0.0] * NUM_CLASSES
        for c, b in zip(classes, combo):
            bias[c] = float(b)
        value = search.objective(bias)
        if value > best:
            best, best_bias = value, bias
    return best_bias, best


def choose(folds: list[dict], cal: Calibrate) -> dict:
    """The choices within `cal` that maximise `objective` on the pooled slices of `folds`: for each flip
    setting the best offsets, then the flip setting, then the island size; the neutral value of each
    unless another does strictly better."""
    labels = np.concatenate([f["labels"] for f in folds])
    classes = [SHORT.index(c) for c in cal.offsets]
    best = None
    for tta in sorted(set(cal.tta)):  # False first: it wins ties
        logits = np.concatenate([f["logits_tta" if tta else "logits"] for f in folds])
        bias, value = choose_bias(logits, labels, cal.offset_grid, classes)
        if best is None or value > best[0]:
            best = (value, tta, bias, logits)
    value, tta, bias, logits = best
    island = 0
    for size in sorted(set(cal.min_island) - {0}):
        candidate = objective(scores(labels, labels_of(logits, bias, size)))
        if candidate > value:
            value, island = candidate, size
    return {"class_bias": bias, "tta": tta, "min_island": island}


def predict(fold: dict, choices: dict) -> np.ndarray:
    return labels_of(fold["logits_tta" if choices["tta"] else "logits"], choices["class_bias"], choices["min_island"])


# ------------------------------------------------------------------------------ out-of-fold logits


def load_folds(cv_dir: str | Path) -> dict[int, dict]:
    """{fold: {'logits', 'logits_tta', 'labels', 'ids', 'recipe', 'data'}} saved by `covseg cv --out cv_dir`;
    every fold of the folds file, all of one recipe and data."""
    cv_dir = Path(cv_dir)
    files = sorted(cv_dir.glob(FOLD_FILE.format(k="*")))
    folds = {}
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                folds[int(f.stem.removeprefix("fold"))] = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise CovsegError(f"{f}: not a fold's logits written by `covseg cv` ({exc})") from None
    if not folds:
        raise CovsegError(f"{cv_dir}: no {FOLD_FILE.format(k='<k>')}: run `covseg cv --out {cv_dir}` first")
    k = int(next(iter(folds.values()))["folds"])
    keys = {(str(f["recipe"]), str(f["data"])) for f in folds.values()}
    if len(keys) > 1:
        raise CovsegError(f"{cv_dir}: the folds' logits come from different recipes or data ({sorted(keys)}); "
                          f"run `covseg cv --out {cv_dir}` again")
    if sorted(folds) != list(range(k)):
        missing = sorted(set(range(k)) - set(folds))
        raise CovsegError(f"{cv_dir}: folds {missing} of {k} have no logits yet; run `covseg cv --out {cv_dir}` "
                          f"(it runs only the missing folds)")
    return folds


def summarise(per_fold: list[dict], part: str) -> dict:
    out = {}
    for m in CV_METRICS:
        values = np.asarray([f[part][m] for f in per_fold], dtype=float)
        out[f"{m}_mean"] = float(np.nanmean(values))
        out[f"{m}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    return out


def nested(folds: dict[int, dict], cal: Calibrate) -> dict:
    """For each fold: the choices made on the other folds, its scores without choices (neutral), with
    offsets alone (no flip, no island removal) and with all the choices; their means and spreads."""
    per_fold = []
    offsets_only = cal.model_copy(update={"tta": [False], "min_island": [0]})
    for k in sorted(folds):
        others = [folds[j] for j in sorted(folds) if j != k]
        chosen, bias_only = choose(others, cal), choose(others, offsets_only)
        per_fold.append({"fold": k, "slices": int(len(folds[k]["labels"])), "choices": chosen,
                         "neutral": scores(folds[k]["labels"], predict(folds[k], NEUTRAL)),
                         "offsets_only": scores(folds[k]["labels"], predict(folds[k], bias_only)),
                         "calibrated": scores(folds[k]["labels"], predict(folds[k], chosen))})
    return {"per_fold": per_fold, **{part: summarise(per_fold, part)
                                     for part in ("neutral", "offsets_only", "calibrated")}}


def calibrate(cv_dir: str | Path, cal: Calibrate, out: str | Path, recipe: str = "") -> dict:
    """Choose the inference-time choices of the recipe `covseg cv` ran into `cv_dir`, measure them by
    nested cross-validation, and write them under its recipe key into the calibration file `out` (other
    recipes' entries kept). Returns the entry."""
    start = time.perf_counter()
    folds = load_folds(cv_dir)
    first = next(iter(folds.values()))
    measured = nested(folds, cal)
    labels = np.concatenate([f["labels"] for f in folds.values()])
    summary_file = Path(cv_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    entry = {
        "recipe": recipe or str(first.get("recipe_name", "")), "data": str(first["data"]),
        "choices": choose(list(folds.values()), cal),
        "oof": {"folds": len(folds), "slices": int(len(labels)),
                f"trivial_{KAGGLE_F1}": trivial_score(labels, KAGGLE_F1), **measured["calibrated"]},
        "nested": measured, "searched": cal.model_dump(mode="json"),
        "cv": {"folder": str(cv_dir), "machine": summary.get("machine", ""), "bf16": summary.get("bf16"),
               "train_seconds_mean": summary.get("train_seconds_mean")},
        "made": time.strftime("%Y-%m-%d"), "by": f"covseg calibrate on {platform.machine()}",
    }
    entries = read(out)
    entries[str(first["recipe"])] = entry
    write_json(dict(sorted(entries.items())), out)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry


def describe(entry: dict) -> str:
    """The choices and the nested out-of-fold scores, one measure a line."""
    n = entry["nested"]
    lines = [f"{entry['recipe'] or 'recipe'}: choices {entry['choices']} (on all {entry['oof']['folds']} folds); "
             f"nested out-of-fold scores on {entry['oof']['slices']} slices, mean +- std over folds:",
             f"  {'':18s} {'neutral':>16s} {'offsets only':>16s} {'calibrated':>16s}"]
    for m in CV_METRICS:
        lines.append(f"  {m:18s} " + " ".join(f"{n[p][m + '_mean']:7.4f} +- {n[p][m + '_std']:.3f}"
                                               for p in ("neutral", "offsets_only", "calibrated")))
    return "\n".join(lines)
