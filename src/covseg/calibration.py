"""Per-class logit offsets (params.yaml: model.class_bias), chosen by cross-validation and measured by nested CV.

A U-Net trained with class weights calls some classes too rarely or too often; a constant added to a
class's logits moves every decision boundary of that class at once. The offsets are chosen on the
held-out logits that `covseg cv` saves beside each fold (`<name>.fold<k>.logits.npz`), never on test
slices, and measured honestly: the offset scored on fold k is chosen on the other folds only. The labels
are a plain argmax: island removal (model.min_island) is not part of the choice.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from covseg.errors import CovsegError
from covseg.evaluation import confusion_matrix, dice_metrics, summary_metrics
from covseg.names import DICE, KAGGLE_F1, NUM_CLASSES, SCORED, SHORT

# offsets tried for each scored class (lungs other and background stay at 0): a grid, not a fit
GRID = tuple(np.round(np.arange(-1.0, 2.01, 0.25), 2))
F1 = tuple(f"f1_{SHORT[c]}" for c in SCORED)


def load_fold_logits(cv_out: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """{fold: {'logits', 'labels', 'ids'}} of the folds `covseg cv --out cv_out` saved logits for; they
    must all come from the same recipe (params and data)."""
    cv_out = Path(cv_out)
    files = sorted(cv_out.parent.glob(f"{cv_out.stem}.fold*.logits.npz"))
    if len(files) < 2:
        raise CovsegError(f"{cv_out.parent}: {len(files)} {cv_out.stem}.fold<k>.logits.npz file(s); nested "
                          "cross-validation needs two or more (run `covseg cv` again without the fold's "
                          ".json to save them)")
    folds, recipes = {}, {}
    for f in files:
        with np.load(f) as z:
            folds[int(f.name.split(".fold")[1].split(".")[0])] = {k: z[k] for k in ("logits", "labels", "ids")}
            recipes[f.name] = str(z["recipe"]) if "recipe" in z else "unknown"
    if len(set(recipes.values())) > 1:
        raise CovsegError(f"{cv_out.parent}: the saved logits come from different recipes ({recipes}); run "
                          "`covseg cv` again for the folds of the recipe to calibrate")
    return folds


def predict(logits: np.ndarray, bias) -> np.ndarray:
    """Class indices of (N, C, H, W) logits with `bias` (C,) added."""
    shifted = torch.from_numpy(logits).float() + torch.tensor(bias, dtype=torch.float32)[:, None, None]
    return shifted.argmax(1).numpy().astype(np.uint8)


def scores(logits: np.ndarray, labels: np.ndarray, bias) -> dict:
    preds = predict(logits, bias)
    pixel = summary_metrics(confusion_matrix(labels, preds))
    return {**dice_metrics(labels, preds), **{m: pixel[m] for m in (*F1, KAGGLE_F1)}}


def objective(s: dict) -> float:
    """What the offsets maximise: the mean of the scored classes' per-slice Dice (the published measure,
    blind to findings called on slices without that class) and pixel F1 (which counts them)."""
    return float(np.mean([s[m] for m in (*DICE, *F1)]))


class Search:
    """`objective` of many offsets on the same slices, fast: each pixel is reduced to the margins of the
    scored classes over its best other class, and a pixel that no scored class can win with the largest
    offset is dropped (it keeps its other class whatever the offsets). Ties go to the lower class index,
    as argmax does. Gives the same scores as `scores` (tests/test_calibration.py)."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray, grid=GRID):
        if SCORED != (0, 1):
            raise NotImplementedError("the margins below assume the scored classes are 0 and 1")
        self.top = max(grid)
        lg = torch.from_numpy(logits).float()
        other = lg[:, 2:].amax(1)
        margins = (lg[:, :2] - other[:, None]).permute(0, 2, 3, 1)  # (N, H, W, 2)
        open_ = margins.amax(-1) + max(grid) >= 0
        self.n = len(labels)
        self.slice_of = torch.arange(self.n)[:, None, None].expand_as(open_)[open_].numpy()
        self.margins = margins[open_].numpy()
        truth = np.asarray(labels)[open_.numpy()]
        self.truth = [truth == c for c in SCORED]
        self.support = np.stack([(np.asarray(labels) == c).sum((1, 2)) for c in SCORED], 1)

    def objective(self, bias) -> float:
        if max(bias[:2]) > self.top or any(bias[2:]):
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
        return float(np.mean(values))


def choose_bias(logits: np.ndarray, labels: np.ndarray, grid=GRID, classes=SCORED) -> list[float]:
    """The offsets of `classes` (scored classes; the others stay 0), on `grid`, that maximise `objective`
    on these slices; zero unless an offset does strictly better, and the smallest offsets among equals."""
    if not set(classes) <= set(SCORED):
        raise ValueError(f"offsets are chosen for scored classes only ({SCORED}), not {classes}")
    search = Search(logits, labels, grid)
    best, best_bias = search.objective([0.0] * NUM_CLASSES), [0.0] * NUM_CLASSES
    for combo in sorted(itertools.product(grid, repeat=len(classes)), key=lambda c: sum(map(abs, c))):
        bias = [0.0] * NUM_CLASSES
        for c, b in zip(classes, combo):
            bias[c] = float(b)
        value = search.objective(bias)
        if value > best:
            best, best_bias = value, bias
    return best_bias


def nested_cv(folds: dict[int, dict[str, np.ndarray]], grid=GRID, classes=SCORED) -> dict:
    """For each fold: offsets of `classes` chosen on the other folds, its scores without and with them;
    and the offsets chosen on all folds (what params.yaml should hold)."""
    def pooled(keys):
        return (np.concatenate([folds[k]["logits"] for k in keys]),
                np.concatenate([folds[k]["labels"] for k in keys]))

    per_fold = []
    for k in sorted(folds):
        bias = choose_bias(*pooled([j for j in folds if j != k]), grid, classes)
        before = scores(folds[k]["logits"], folds[k]["labels"], [0.0] * NUM_CLASSES)
        after = scores(folds[k]["logits"], folds[k]["labels"], bias)
        per_fold.append({"fold": k, "class_bias": bias, "without": before, "with": after})
    return {"per_fold": per_fold, "class_bias": choose_bias(*pooled(list(folds)), grid, classes),
            "grid": [float(g) for g in grid], "classes": [SHORT[c] for c in classes]}
