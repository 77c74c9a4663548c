"""Pictures a person opens: loss curves, confusion matrix, overlays (ground glass red, consolidation
green, other lung blue)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from covseg.names import KAGGLE_F1, SHORT

COLOURS = {0: (1.0, 0.0, 0.0), 1: (0.0, 1.0, 0.0), 2: (0.0, 0.3, 1.0)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Training loss and, where a fold was held out, validation loss and F1 per epoch."""
    if "val_loss" not in history.columns:  # the shipped model: every slice trains, none is scored
        fig, ax1 = plt.subplots(figsize=(5.5, 4))
        ax1.plot(history["epoch"], history["train_loss"], label="train")
        ax1.set(xlabel="epoch", ylabel="loss", title="Training loss (no slice held out)")
        return _save(fig, Path(path))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    val = history.dropna(subset=["val_loss"])  # validation is scored every train.val_every epochs
    ax1.plot(history["epoch"], history["train_loss"], label="train")
    ax1.plot(val["epoch"], val["val_loss"], ".-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    for c in SHORT:
        ax2.plot(val["epoch"], val[f"val_f1_{c}"], ".-", label=c)
    ax2.plot(val["epoch"], val[f"val_{KAGGLE_F1}"], "k--", label=KAGGLE_F1)
    ax2.set(xlabel="epoch", ylabel="F1", title="Validation F1", ylim=(0, 1))
    ax2.legend(fontsize=8)
    return _save(fig, Path(path))


def confusion(cm: np.ndarray, path: str | Path) -> Path:
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{cm[i, j]:,}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xticklabels=SHORT, yticklabels=SHORT,
           xlabel="predicted", ylabel="label", title="Confusion matrix (row-normalised)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.colorbar(im, ax=ax)
    return _save(fig, Path(path))


def overlay_rgb(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey image in [0, 1] with the finding classes painted over it."""
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    for c, colour in COLOURS.items():
        sel = labels == c
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.array(colour)
    return rgb


def overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, title: str, path: str | Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, img, name in zip(axes, (np.clip(image, 0, 1), overlay_rgb(image, label), overlay_rgb(image, pred)),
                             ("image", "label", "prediction")):
        ax.imshow(img, cmap="gray")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}   red: ground glass, green: consolidation, blue: other lung")
    return _save(fig, Path(path))
