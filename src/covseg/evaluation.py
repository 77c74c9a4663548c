"""Pixel-wise metrics (confusion matrix, precision, recall, F1, IoU), the Kaggle score, per-slice table."""
from __future__ import annotations

import numpy as np
import pandas as pd

from covseg.names import DICE, KAGGLE_F1, NUM_CLASSES, SCORED, SHORT


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """(classes, classes) int64 counts, rows = label, columns = prediction."""
    labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"labels and predictions differ in size: {labels.shape} vs {preds.shape}")
    small = np.uint8 if classes * classes <= 256 else np.int64  # uint8: 30x faster than int64 on 13 M pixels
    labels, preds = labels.astype(small, copy=False), preds.astype(small, copy=False)
    if labels.size and max(labels.max(), preds.max()) >= classes:
        raise ValueError(f"a class index is not in 0..{classes - 1}")
    idx = labels * small(classes) + preds
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def _ratio(num, den):
    """num / den, defined as 1.0 where both are 0 (nothing to find, nothing found)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, 0.0, 1.0))


def class_scores(cm: np.ndarray) -> pd.DataFrame:
    """Per-class precision, recall, F1 and IoU from a confusion matrix (one row per class)."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    return pd.DataFrame({
        "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
        "support": cm.sum(1),
    }, index=list(SHORT[:len(cm)]))


def pooled_f1(cm: np.ndarray, scored=SCORED) -> float:
    """F1 over the scored classes' one-hot channels together, as the Kaggle CSV rows are scored."""
    tp = sum(cm[c, c] for c in scored)
    fp = sum(cm[:, c].sum() - cm[c, c] for c in scored)
    fn = sum(cm[c, :].sum() - cm[c, c] for c in scored)
    return float(_ratio(2 * tp, 2 * tp + fp + fn))


def summary_metrics(cm: np.ndarray) -> dict:
    """Flat metrics dict: <metric>_<class> for every class, kaggle_f1 and pooled_f1."""
    scores = class_scores(cm)
    out = {f"{m}_{c}": float(scores.loc[c, m]) for c in scores.index for m in ("precision", "recall", "f1", "iou")}
    out[KAGGLE_F1] = float(np.mean([scores.loc[SHORT[c], "f1"] for c in SCORED]))
    out["pooled_f1"] = pooled_f1(cm)
    return out


def per_slice_dice(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """(N, len(SCORED)) Dice of each slice for each scored class; NaN where the slice has no such label
    (as MONAI's `compute_dice(ignore_empty=True)`), so a slice without findings neither helps nor hurts."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and predictions differ in size: {labels.shape} vs {preds.shape}")
    out = np.full((len(labels), len(SCORED)), np.nan)
    for i, c in enumerate(SCORED):
        truth, found = labels == c, preds == c
        support, tp = truth.sum((1, 2)), (truth & found).sum((1, 2))
        has = support > 0
        out[has, i] = 2 * tp[has] / (support[has] + found.sum((1, 2))[has])
    return out


def dice_metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
    """{'dice_ggo': ..., 'dice_consolidation': ...}: per-slice Dice averaged over the slices that have the
    class (the published results' measure); NaN when no slice has it."""
    dice = per_slice_dice(labels, preds)
    with np.errstate(all="ignore"):
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in dice.T]
    return dict(zip(DICE, means))


def per_slice_table(labels: np.ndarray, preds: np.ndarray, slice_ids) -> pd.DataFrame:
    """One row per slice: its id, per-class pixel counts (label / prediction), F1 and kaggle_f1."""
    rows = []
    dice = per_slice_dice(labels, preds)
    for sid, y, p, d in zip(slice_ids, labels, preds, dice):
        m = summary_metrics(confusion_matrix(y, p))
        row = {"slice_id": sid}
        for c, name in enumerate(SHORT):
            row[f"pixels_{name}"] = int((y == c).sum())
            row[f"pred_pixels_{name}"] = int((p == c).sum())
            row[f"f1_{name}"] = m[f"f1_{name}"]
        row.update(zip(DICE, map(float, d)))
        row[KAGGLE_F1] = m[KAGGLE_F1]
        rows.append(row)
    return pd.DataFrame(rows)


def trivial_score(labels: np.ndarray, metric: str = KAGGLE_F1) -> float:
    """Best `metric` of a constant predictor (every pixel one class) on these labels: a floor to beat."""
    return max(summary_metrics(confusion_matrix(labels, np.full_like(labels, c)))[metric]
               for c in range(NUM_CLASSES))


def trivial_kaggle_f1(labels: np.ndarray) -> float:
    return trivial_score(labels, KAGGLE_F1)


def score_model(model, images: np.ndarray, labels: np.ndarray, batch_size: int,
                device) -> tuple[np.ndarray, np.ndarray]:
    """Predict `images` with `model`; (predicted class indices, confusion matrix against `labels`)."""
    from covseg.model import predict_labels

    preds = predict_labels(model, images, batch_size, device)
    return preds, confusion_matrix(labels, preds)
