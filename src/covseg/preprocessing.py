"""Raw HU slices -> model inputs: HU window to [0, 1], one-hot to class index, burden-stratified folds."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from covseg.data import RawData, one_hot_to_index, replace_dir

def window(hu: np.ndarray, hu_min: float = -1000.0, hu_max: float = 400.0) -> np.ndarray:
    """Clip Hounsfield units to [hu_min, hu_max] and scale linearly to [0, 1] (float32)."""
    if hu_max <= hu_min:
        raise ValueError(f"HU window is empty: hu_min={hu_min} >= hu_max={hu_max}")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(hu_min)) / np.float32(hu_max - hu_min)
    return np.clip(out, 0.0, 1.0)


def lesion_burden(labels: np.ndarray) -> np.ndarray:
    """Per slice: (ground-glass fraction, consolidation fraction), shape (N, 2)."""
    flat = labels.reshape(len(labels), -1)
    return np.stack([(flat == 0).mean(1), (flat == 1).mean(1)], axis=1)


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every slice, stratified by lesion burden.

    Slices are sorted by (has consolidation, total lesion burden) and dealt in consecutive blocks of
    `folds`; each block gives one slice to every fold, in a seeded random order. So every fold spans
    the whole range of burden, and every fold sees consolidation once there are `folds` slices with it.
    """
    if folds < 2 or folds > len(labels):
        raise ValueError(f"split.folds must be between 2 and the number of slices ({len(labels)}), got {folds}")
    burden = lesion_burden(labels)
    order = np.lexsort((burden.sum(1), burden[:, 1] > 0))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(order), folds):
        block = order[start:start + folds]
        fold_of[block] = rng.permutation(folds)[:len(block)]
    return fold_of


def preprocess(raw: RawData, out_dir: str | Path, params: dict) -> dict:
    """Write the processed arrays and split.json into `out_dir`, atomically; returns the split summary."""
    win, split = params["window"], params["split"]
    labels = one_hot_to_index(raw.masks)
    fold_of = assign_folds(labels, split["folds"], params["seed"])
    if not 0 <= split["fold"] < split["folds"]:
        raise ValueError(f"split.fold must be in [0, {split['folds']}), got {split['fold']}")
    val = np.flatnonzero(fold_of == split["fold"])
    train = np.flatnonzero(fold_of != split["fold"])
    images = window(raw.images[..., 0], win["hu_min"], win["hu_max"])
    burden = lesion_burden(labels)
    summary = {
        "folds": split["folds"], "fold": split["fold"],
        "train_index": train.tolist(), "val_index": val.tolist(),
        "train_slice_ids": [raw.train_ids[i] for i in train],
        "val_slice_ids": [raw.train_ids[i] for i in val],
        "test_slice_ids": list(raw.test_ids),
        "train_with_consolidation": int((burden[train, 1] > 0).sum()),
        "val_with_consolidation": int((burden[val, 1] > 0).sum()),
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        np.save(tmp / "train_images.npy", images[train])
        np.save(tmp / "train_labels.npy", labels[train])
        np.save(tmp / "val_images.npy", images[val])
        np.save(tmp / "val_labels.npy", labels[val])
        np.save(tmp / "test_images.npy", window(raw.test_images[..., 0], win["hu_min"], win["hu_max"]))
        (tmp / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def load_processed(directory: str | Path, part: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels) of a split part: 'train', 'val' or 'test' (test has no labels)."""
    directory = Path(directory)
    images = np.load(directory / f"{part}_images.npy")
    labels_path = directory / f"{part}_labels.npy"
    return images, (np.load(labels_path) if labels_path.exists() else None)
