"""Raw HU slices -> model inputs: HU window to [0, 1], one-hot to class index, burden-stratified folds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covseg.data import RawData, one_hot_to_index
from covseg.errors import ParamsError
from covseg.names import SPLIT_FILE, processed_file
from covseg.params import Split, Window


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


def burden_order(labels: np.ndarray) -> np.ndarray:
    """Slice indices sorted by (has consolidation, total lesion burden): the order folds are dealt in."""
    burden = lesion_burden(labels)
    return np.lexsort((burden.sum(1), burden[:, 1] > 0))


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of every slice, stratified by lesion burden.

    Slices are sorted by (has consolidation, total lesion burden) and dealt in consecutive blocks of
    `folds`; each block gives one slice to every fold, in a seeded random order. So every fold spans
    the whole range of burden, and every fold sees consolidation once there are `folds` slices with it.
    """
    if folds < 2 or folds > len(labels):
        raise ParamsError(f"split.folds = {folds} is not allowed: must be between 2 and the number of labelled "
                          f"slices ({len(labels)})")
    order = burden_order(labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(order), folds):
        block = order[start:start + folds]
        fold_of[block] = rng.permutation(folds)[:len(block)]
    return fold_of


def preprocess(raw: RawData, out_dir: str | Path, win: Window, split: Split, seed: int) -> dict:
    """Write the processed arrays and split.json into the folder `out_dir` (which may be a staging
    folder); returns the split summary."""
    labels = one_hot_to_index(raw.masks)
    fold_of = assign_folds(labels, split.folds, seed)
    val = np.flatnonzero(fold_of == split.fold)
    train = np.flatnonzero(fold_of != split.fold)
    images = window(raw.images[..., 0], win.hu_min, win.hu_max)
    burden = lesion_burden(labels)
    summary = {
        "folds": split.folds, "fold": split.fold,
        "train_index": train.tolist(), "val_index": val.tolist(),
        "train_slice_ids": [raw.train_ids[i] for i in train],
        "val_slice_ids": [raw.train_ids[i] for i in val],
        "test_slice_ids": list(raw.test_ids),
        "train_with_consolidation": int((burden[train, 1] > 0).sum()),
        "val_with_consolidation": int((burden[val, 1] > 0).sum()),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / processed_file("train", "images"), images[train])
    np.save(out_dir / processed_file("train", "labels"), labels[train])
    np.save(out_dir / processed_file("val", "images"), images[val])
    np.save(out_dir / processed_file("val", "labels"), labels[val])
    np.save(out_dir / processed_file("test", "images"), window(raw.test_images[..., 0], win.hu_min, win.hu_max))
    (out_dir / SPLIT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def load_processed(directory: str | Path, part: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels) of a split part: 'train', 'val' or 'test' (test has no labels)."""
    directory = Path(directory)
    images = np.load(directory / processed_file(part, "images"))
    labels_path = directory / processed_file(part, "labels")
    return images, (np.load(labels_path) if labels_path.exists() else None)


def load_split(directory: str | Path) -> dict:
    return json.loads((Path(directory) / SPLIT_FILE).read_text())
