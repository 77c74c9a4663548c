"""Raw HU slices -> model inputs: HU window to [0, 1], one-hot to class index, and the folds.

The folds are written once into a file (folds.json, as nnU-Net's splits_final.json), committed, and read
by everything that splits the labelled slices: the pipeline's validation fold and cross-validation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from covseg.atomic import write_json
from covseg.data import RawData, load_raw, one_hot_to_index
from covseg.errors import DataError, ParamsError
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


def make_folds(raw: RawData, folds: int, seed: int) -> dict:
    """The folds of the labelled slices by their ids (burden-stratified, `assign_folds`), nnU-Net style:
    {"folds": [{"train": [ids], "val": [ids]}, ...]} in the order of the raw files."""
    fold_of = assign_folds(one_hot_to_index(raw.masks), folds, seed)
    ids = list(raw.train_ids)
    return {"made_by": f"covseg folds: burden-stratified, {folds} folds, seed {seed}",
            "folds": [{"train": [ids[i] for i in np.flatnonzero(fold_of != k)],
                       "val": [ids[i] for i in np.flatnonzero(fold_of == k)]} for k in range(folds)]}


def folds_of(folds: dict, raw: RawData, path: str | Path) -> np.ndarray:
    """Each labelled slice's fold, as the folds file says; one DataError naming the file when it does not
    cover exactly the labelled slices of `raw` (other data, or a file edited by hand)."""
    try:
        val = [list(f["val"]) for f in folds["folds"]]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a folds file (expected {{'folds': [{{'train': [...], 'val': [...]}}]}}); "
                        f"run `covseg folds --force`") from exc
    where = {}
    for k, ids in enumerate(val):
        for sid in ids:
            if sid in where:
                raise DataError(f"{path}: slice {sid!r} is in folds {where[sid]} and {k}; run `covseg folds --force`")
            where[sid] = k
    ids = list(raw.train_ids)
    missing, unknown = [s for s in ids if s not in where], [s for s in where if s not in set(ids)]
    if missing or unknown:
        raise DataError(f"{path} does not fit the labelled slices of the data: {len(missing)} slice(s) in no fold "
                        f"{missing[:5]}, {len(unknown)} unknown {unknown[:5]}; for new data run `covseg folds` and "
                        f"commit {Path(path).name}")
    return np.asarray([where[s] for s in ids], dtype=np.int64)


def read_folds(path: str | Path, raw: RawData) -> np.ndarray:
    """Each labelled slice's fold, from the folds file at `path` (`folds_of`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no folds file; run `covseg folds` (it deals the labelled slices into "
                        f"split.folds folds once) and commit it")
    try:
        folds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run `covseg folds --force`") from None
    return folds_of(folds, raw, path)


def write_folds(raw_dir: str | Path, path: str | Path, folds: int, seed: int, force: bool = False) -> bool:
    """Write the folds file of the data in `raw_dir` unless one that fits it (same slices, `folds` folds) is
    there already (`force`: always). Returns whether it wrote one."""
    raw = load_raw(raw_dir)
    if not force and Path(path).is_file():
        try:
            if read_folds(path, raw).max() + 1 == folds:
                return False
        except DataError:
            pass
    write_json(make_folds(raw, folds, seed), path)
    return True


def data_key(fingerprint: str, fold_of: np.ndarray, win: Window) -> str:
    """What a model is trained and cross-validated on: the raw data (its fingerprint), the HU window and
    the folds (params.recipe_key)."""
    key = [fingerprint, [int(f) for f in fold_of], [win.hu_min, win.hu_max]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def preprocess(raw: RawData, out_dir: str | Path, win: Window, split: Split, fold_of: np.ndarray,
               key: str = "") -> dict:
    """Write the processed arrays and split.json into the folder `out_dir` (which may be a staging
    folder), fold `split.fold` of `fold_of` (each labelled slice's fold) being validation (none with
    `all`: the shipped model trains on every labelled slice); `key` is the data key (`data_key`) recorded
    in split.json. Returns the split summary."""
    labels = one_hot_to_index(raw.masks)
    if fold_of.max() + 1 != split.folds:
        raise ParamsError(f"split.folds = {split.folds}, but the folds file has {fold_of.max() + 1} folds: set "
                          f"split.folds to that, or run `covseg folds --force` to deal the slices again")
    held_out = np.zeros(len(fold_of), bool) if split.fold == "all" else fold_of == split.fold
    val, train = np.flatnonzero(held_out), np.flatnonzero(~held_out)
    images = window(raw.images[..., 0], win.hu_min, win.hu_max)
    burden = lesion_burden(labels)
    summary = {
        "folds": split.folds, "fold": split.fold, "data_key": key,
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
