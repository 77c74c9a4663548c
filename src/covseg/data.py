"""Raw data in the Kaggle `covid-segmentation` layout: load, import, synthesise, record with DVC.

A raw folder holds
    images_medseg.npy       (N, H, W, 1) float, Hounsfield units
    masks_medseg.npy        (N, H, W, 4) one-hot: ground glass, consolidation, lungs other, background
    test_images_medseg.npy  (M, H, W, 1) float, Hounsfield units
    slice_ids.json          optional: {"train": [...], "test": [...]} source slice numbers
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from covseg import shell
from covseg.atomic import atomic_output
from covseg.errors import DataError
from covseg.names import NUM_CLASSES, PATHS, RAW_IMAGES, RAW_MASKS, RAW_TEST_IMAGES, SLICE_IDS


@dataclass
class RawData:
    images: np.ndarray       # (N, H, W, 1)
    masks: np.ndarray        # (N, H, W, 4)
    test_images: np.ndarray  # (M, H, W, 1)
    train_ids: list[int]
    test_ids: list[int]
    directory: Path


RAW_FILES = (RAW_IMAGES, RAW_MASKS, RAW_TEST_IMAGES, SLICE_IDS)


def _load_array(file: Path, channels: int, path: Path) -> np.ndarray:
    """`file` memory-mapped and checked; errors name `path` (`file`, or the file it is a staged copy of)."""
    if not file.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a corrupt file
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim != 4 or array.shape[-1] != channels or array.shape[0] == 0:
        raise DataError(
            f"{path}: expected shape (N, H, W, {channels}) with N > 0, found {tuple(array.shape)}"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"{path}: expected a numeric array, found dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise DataError(f"{path}: complex values ({array.dtype}); expected real numbers (HU or 0/1 masks)")
    return array


def load_raw(directory: str | Path, shown_as: str | Path | None = None) -> RawData:
    """Load a Kaggle-layout folder, memory-mapped. Checks structure only; content is `validation`'s job.
    With `shown_as`, errors and the result's `directory` name that folder instead (a staged copy of it)."""
    directory = Path(directory)
    shown = Path(shown_as) if shown_as is not None else directory
    images = _load_array(directory / RAW_IMAGES, 1, shown / RAW_IMAGES)
    masks = _load_array(directory / RAW_MASKS, NUM_CLASSES, shown / RAW_MASKS)
    test_images = _load_array(directory / RAW_TEST_IMAGES, 1, shown / RAW_TEST_IMAGES)
    train_ids, test_ids = list(range(len(images))), list(range(len(test_images)))
    ids_file, ids_path = directory / SLICE_IDS, shown / SLICE_IDS
    if ids_file.is_file():
        try:
            ids = json.loads(ids_file.read_text())
            train_ids, test_ids = [int(i) for i in ids["train"]], [int(i) for i in ids["test"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ids_path}: expected {{'train': [...], 'test': [...]}} ({exc})") from exc
        if len(train_ids) != len(images) or len(test_ids) != len(test_images):
            raise DataError(
                f"{ids_path}: lists {len(train_ids)} train and {len(test_ids)} test ids for "
                f"{len(images)} images and {len(test_images)} test images"
            )
    return RawData(images, masks, test_images, train_ids, test_ids, shown)


def write_raw(directory: str | Path, images, masks, test_images, train_ids=None, test_ids=None) -> Path:
    """Write a Kaggle-layout folder atomically: the old folder stays until the new one is complete."""
    with atomic_output(directory, directory=True) as tmp:
        np.save(tmp / RAW_IMAGES, np.asarray(images))
        np.save(tmp / RAW_MASKS, np.asarray(masks))
        np.save(tmp / RAW_TEST_IMAGES, np.asarray(test_images))
        ids = {
            "train": list(train_ids) if train_ids is not None else list(range(len(images))),
            "test": list(test_ids) if test_ids is not None else list(range(len(test_images))),
        }
        (tmp / SLICE_IDS).write_text(json.dumps(ids) + "\n")
    return Path(directory)


def fingerprint(directory: str | Path) -> str:
    """sha1 over the raw files' bytes: which data a validation report was made for."""
    import hashlib

    h = hashlib.sha1()
    for name in RAW_FILES:
        path = Path(directory) / name
        h.update(name.encode())
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


@contextmanager
def staged_copy(source: str | Path, directory: str | Path) -> Iterator[RawData]:
    """Copy the raw files of the Kaggle-layout folder `source`, each read once, byte for byte, into a staging
    sibling of `directory`, and yield that copy loaded (errors and its `directory` name `source`). What the
    block checks is what lands: the staged copy replaces `directory` in one rename when the block ends
    without error; on error it is removed and `directory` stays as it was. A source without slice ids gets
    the default ones (0, 1, ...), as write_raw writes them."""
    source = Path(source)
    with atomic_output(directory, directory=True) as staged:
        for name in RAW_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staged / name)
        raw = load_raw(staged, shown_as=source)
        if not (staged / SLICE_IDS).is_file():
            (staged / SLICE_IDS).write_text(json.dumps({"train": raw.train_ids, "test": raw.test_ids}) + "\n")
        yield raw


def record_with_dvc(dvc_file: str | Path = PATHS.dvc_file) -> str:
    """Record the current content of the folder tracked by `dvc_file`; returns the new md5."""
    dvc_file = Path(dvc_file)
    shell.run(["dvc", "commit", "--force", "--quiet", dvc_file.name], cwd=dvc_file.parent)
    return data_version(dvc_file)


def data_version(dvc_file: str | Path = PATHS.dvc_file) -> str:
    """The md5 that `dvc_file` records for the data, or '' if there is none."""
    try:
        outs = yaml.safe_load(Path(dvc_file).read_text()).get("outs", [])
    except (OSError, AttributeError):
        return ""
    return str(outs[0].get("md5", "")) if outs else ""


# --------------------------------------------------------------------------------------------
# The embedded default: a deterministic generator of CT-like slices with all four classes.


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 16) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] at full resolution."""
    coarse = ndimage.gaussian_filter(rng.normal(size=(cells, cells)), 1.0)
    field = ndimage.zoom(coarse, size / cells, order=3)[:size, :size]
    return field / (np.abs(field).max() + 1e-6)


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def synth_slice(rng: np.random.Generator, size: int = 512, lesions: bool = True):
    """One CT-like slice in HU (float32, (H, W)) and its class-index label (uint8, (H, W))."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hu = np.full((size, size), -1000.0)
    label = np.full((size, size), 3, np.uint8)

    body = _ellipse(yy, xx, 0.05, 0.0, rng.uniform(0.62, 0.72), rng.uniform(0.82, 0.9)) < 1
    hu[body] = -100.0  # subcutaneous fat
    muscle = _ellipse(yy, xx, 0.05, 0.0, rng.uniform(0.55, 0.58), rng.uniform(0.74, 0.78)) < 1
    hu[muscle & body] = 45.0
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        shape = _ellipse(yy, xx, rng.uniform(-0.05, 0.05), side * rng.uniform(0.33, 0.4),
                         rng.uniform(0.4, 0.48), rng.uniform(0.22, 0.28))
        lungs |= shape + 0.15 * _smooth_noise(rng, size, 8) < 1
    heart = _ellipse(yy, xx, 0.12, 0.08, 0.2, 0.17) < 1
    spine = _ellipse(yy, xx, 0.52, 0.0, 0.09, 0.08) < 1
    lungs &= ~heart & ~spine & muscle
    hu[lungs] = (-860.0 + 30 * _smooth_noise(rng, size))[lungs]
    hu[heart] = 40.0
    hu[spine] = 700.0

    # vessels: small bright blobs inside the lungs, labelled as lung
    ly, lx = np.nonzero(lungs)
    for k in rng.integers(0, len(ly), size=40 if len(ly) else 0):
        r = rng.uniform(0.008, 0.02)
        hu[(_ellipse(yy, xx, yy[ly[k], lx[k]], xx[ly[k], lx[k]], r, r) < 1) & lungs] = rng.uniform(-80, 40)
    label[lungs] = 2

    if lesions and len(ly):
        texture = _smooth_noise(rng, size, 32)
        for cls, count, (lo, hi) in ((0, rng.integers(1, 5), (-700, -300)), (1, rng.integers(0, 4), (-100, 50))):
            for _ in range(count):
                k = rng.integers(len(ly))
                cy, cx = yy[ly[k], lx[k]], xx[ly[k], lx[k]]
                if cls == 1:  # consolidation sits posterior (dependent lung)
                    cy = min(cy + 0.15, 0.4)
                ry, rx = rng.uniform(0.05, 0.15, size=2)
                blob = (_ellipse(yy, xx, cy, cx, ry, rx) + 0.5 * _smooth_noise(rng, size, 12) < 1) & lungs
                hu[blob] = rng.uniform(lo, hi) + 60 * texture[blob]
                label[blob] = cls

    hu = ndimage.gaussian_filter(hu, 0.8) + rng.normal(0, 25, size=hu.shape)
    return hu.astype(np.float32), label


def synthesize(n_labelled: int = 40, n_test: int = 10, size: int = 512, seed: int = 0):
    """Deterministic synthetic data set in the Kaggle layout: (images, masks, test_images)."""
    def make(offset: int, n: int):
        slices = [synth_slice(np.random.default_rng([seed, offset + i]), size, lesions=(i % 8 != 7))
                  for i in range(n)]
        images = np.stack([s[0] for s in slices])[..., None]
        onehot = np.eye(NUM_CLASSES, dtype=np.uint8)[np.stack([s[1] for s in slices])]
        return images, onehot

    images, masks = make(0, n_labelled)
    test_images, _ = make(1_000_000, n_test)
    return images, masks, test_images


def one_hot_to_index(masks: np.ndarray) -> np.ndarray:
    """(N, H, W, C) one-hot -> (N, H, W) uint8 class index."""
    return np.argmax(masks, axis=-1).astype(np.uint8)


def index_to_one_hot(labels: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """(N, H, W) class index -> (N, H, W, C) uint8 one-hot."""
    return np.eye(classes, dtype=np.uint8)[labels]
