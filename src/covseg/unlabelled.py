"""Unlabelled scans: slices of other patients, without the four-class labels, for semi-supervised training.

`covseg data import-unlabelled` reads scans as `covseg predict` does (NIfTI, DICOM, PNG/JPG, .npy; folders
searched), turns each slice as told (`rotate`: quarter turns, for exports stored turned), maps its values to
HU (`intensity`), fits it to the labelled slices' size and checks the lot against the unlabelled-data contract
before anything lands. A folder of weak labels (one grey image a slice, of the same name, 255 = infection:
another model's predictions, say) may come with it. The folder written (PATHS.unlabelled):

    images.npy   (N, H, W) int16 HU, H x W the labelled slices' size: each slice centred, scaled down if larger,
                 its edge pixels repeated to fill
    weak.npy     (N, H, W) uint8, only with weak labels: 0 = none .. 255 = infection (ground glass and
                 consolidation together), fitted like its slice
    slices.csv   one row a slice: its source, the group (volume) it belongs to, its size as read, the HU mapping

Intensity: `hu` takes the values as read (NIfTI and DICOM are HU; a PNG/JPG is mapped by predict.png_hu_*, the
window it was exported with). `match` is for 8-bit exports whose window is unknown and differs by source:
each group's values are mapped, quantile by quantile, onto the HU of the labelled slices inside their lungs'
bounding box (slices cropped to the lungs should be matched to the same region). A group is a volume, or the
slice images of one volume: names `<volume>_<slice number>`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from covseg.atomic import atomic_output
from covseg.data import RawData, load_raw, one_hot_to_index
from covseg.errors import DataError
from covseg.names import NUM_CLASSES, UNLABELLED_IMAGES, UNLABELLED_SLICES, UNLABELLED_WEAK
from covseg.params import Predict, Validate
from covseg.validation import ContractError, name_rows, nearest_raw, raw_thumbnails, run_suite, to_jsonable

QUANTILES = np.linspace(0.5, 99.5, 100)  # the landmarks `match` maps
INTENSITIES = ("hu", "match")
WEAK_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def group_of(name: str) -> str:
    """The volume a slice file belongs to: its stem without a trailing `_<number>` (`vol_12.jpg` -> `vol`)."""
    stem = name.split(".", 1)[0]
    return re.sub(r"_\d+$", "", stem) or stem


def reference_quantiles(raw: RawData) -> np.ndarray:
    """HU at QUANTILES of the labelled slices inside their lungs' bounding box (labels other than background)."""
    values = []
    for i in range(len(raw.images)):
        lungs = one_hot_to_index(np.asarray(raw.masks[i])) < NUM_CLASSES - 1
        if not lungs.any():
            continue
        rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
        box = np.asarray(raw.images[i, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, 0], np.float32)
        values.append(box[np.isfinite(box)][::7])  # a sample is plenty for 100 quantiles, in bounded memory
    if not values:
        raise DataError(f"{raw.directory}: no labelled slice shows lungs: nothing to match intensities to")
    return np.percentile(np.concatenate(values), QUANTILES)


def matching(slices: list[np.ndarray], reference: np.ndarray):
    """A monotone map of the values of `slices` (one group) onto `reference` quantiles: its quantiles go to
    the reference's (values shared by several quantiles, such as a saturated white, to their mean)."""
    sample = np.concatenate([s[np.isfinite(s)].ravel()[::3] for s in slices])
    points = np.percentile(sample, QUANTILES)
    xs, inverse = np.unique(points, return_inverse=True)
    ys = np.bincount(inverse, weights=reference) / np.bincount(inverse)
    if len(xs) < 2:
        raise DataError("a group of slices of one constant value: nothing to map")
    return lambda hu: np.interp(hu, xs, ys)


def fit(image: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """`image` scaled down to fit `shape` if larger (keeping its aspect), centred, its edges repeated to fill."""
    h, w = image.shape
    factor = min(1.0, shape[0] / h, shape[1] / w)
    if factor < 1.0:
        image = ndimage.zoom(image, factor, order=order, grid_mode=True, mode="nearest")[:shape[0], :shape[1]]
        h, w = image.shape
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return np.pad(image, ((top, shape[0] - h - top), (left, shape[1] - w - left)), mode="edge")


def _weak_file(weak_dir: Path, name: str) -> Path:
    stem = name.split(".", 1)[0]
    for ext in WEAK_SUFFIXES:
        if (weak_dir / f"{stem}{ext}").is_file():
            return weak_dir / f"{stem}{ext}"
    raise DataError(f"{weak_dir}: no weak label for slice {name} (expected {stem}.png or another image of that name)")


def read_weak(path: Path, shape: tuple[int, int], image_name: str, pp: Predict) -> np.ndarray:
    """A weak label image as uint8 0..255, checked against its slice's shape as read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > pp.max_slice_pixels:
                raise DataError(f"{path}: {img.size[0]}x{img.size[1]} pixels, more than predict.max_slice_pixels")
            grey = np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image, truncated or corrupt ({exc})") from None
    if grey.shape != shape:
        raise DataError(f"{path}: {grey.shape[0]}x{grey.shape[1]} pixels, but its slice {image_name} is "
                        f"{shape[0]}x{shape[1]}: a weak label must cover its slice pixel for pixel")
    return grey


def _facts(hu: np.ndarray, weak: np.ndarray | None, source: str, index: int, group: str) -> dict:
    finite = np.isfinite(hu)
    values = hu[finite] if finite.any() else np.array([np.nan])
    row = {"file": source, "index": index, "group": group, "nonfinite": int((~finite).sum()),
           "hu_range": float(values.max() - values.min()), "hu_p01": float(np.percentile(values, 1)),
           "has_weak": weak is not None}
    if weak is not None:
        row["weak_fraction"] = float((weak >= 128).mean())
    return row


def _expectations(with_weak: bool, v: Validate) -> list:
    import great_expectations.expectations as gxe

    checks = [
        gxe.ExpectColumnValuesToBeBetween(column="nonfinite", max_value=0,
                                          meta={"check": "no NaN or infinite value"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_range", min_value=v.min_hu_range,
                                          meta={"check": "a slice spans at least validate.min_hu_range HU"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_p01", max_value=v.body_hu,
                                          meta={"check": "a slice shows air or lung (1st percentile below "
                                                         "validate.body_hu): else its window is wrong"}),
        gxe.ExpectColumnValuesToBeBetween(column="nearest_raw_hu", min_value=v.near_duplicate_hu,
                                          meta={"check": "not a copy of a labelled or test slice (an external "
                                                         "slice only joins training)", "detail": "nearest_raw"}),
    ]
    if with_weak:
        checks.append(gxe.ExpectColumnValuesToBeBetween(
            column="weak_fraction", max_value=v.max_lesion_fraction,
            meta={"check": "a weak label marks at most validate.max_lesion_fraction of its slice"}))
    return checks


def import_unlabelled(inputs: Iterable[str | Path], out: str | Path, raw: str | Path, pp: Predict, v: Validate,
                      weak_dir: str | Path | None = None, rotate: int = 0, intensity: str = "hu") -> dict:
    """Read the scans of `inputs`, check them, and write them to the folder `out` in one rename (on any error
    `out` stays as it was). `raw` is the labelled data (its slice size, its intensities for `match`, its
    slices for the copy check). Returns {"report", "slices", "groups"}."""
    from covseg.scans import find_sources, read_scan

    if intensity not in INTENSITIES:
        raise DataError(f"intensity {intensity!r}: expected one of {', '.join(INTENSITIES)}")
    labelled = load_raw(raw)
    shape = tuple(labelled.images.shape[1:3])
    sources, failures, _ = find_sources(inputs, exclude=Path(out))
    if failures:
        raise DataError("; ".join(f"{f['input']}: {f['error']}" for f in failures))
    if not sources:
        raise DataError(f"{', '.join(map(str, inputs))}: no scan found (NIfTI, DICOM, PNG/JPG or .npy)")
    reference = reference_quantiles(labelled) if intensity == "match" else None
    weak_dir = Path(weak_dir) if weak_dir is not None else None
    thumbnails = raw_thumbnails(labelled, v)
    rows, parts = [], []
    by_group = groupby(sorted(sources, key=lambda s: (group_of(s.path.name), str(s.path))),
                       key=lambda s: group_of(s.path.name))
    with atomic_output(out, directory=True) as tmp:
        for g, (group, members) in enumerate(by_group):  # one group in memory at a time
            slices, labels, names = [], [], []
            for source in members:
                scan = read_scan(source, pp)
                if weak_dir is not None and len(scan.hu) != 1:
                    raise DataError(f"{source.path}: a volume of {len(scan.hu)} slices; weak labels come as one "
                                    f"image a slice, so import the volume's slices as images")
                for k, hu in enumerate(scan.hu):
                    if weak_dir is not None:
                        weak = read_weak(_weak_file(weak_dir, source.path.name), hu.shape, source.path.name, pp)
                        labels.append(np.rot90(weak, rotate))
                    slices.append(np.rot90(hu, rotate))
                    names.append((str(source.path), scan.slice_names[k] if k < len(scan.slice_names) else str(k),
                                  hu.shape))
            mapped = matching(slices, reference) if reference is not None else (lambda hu: hu)
            images = np.stack([np.clip(np.rint(fit(np.nan_to_num(mapped(hu), nan=-1000.0), shape)), -32768, 32767)
                               .astype(np.int16) for hu in slices])
            nearest = nearest_raw(images, thumbnails, v)
            for k, (hu, (path, name, read_shape)) in enumerate(zip(slices, names)):
                rows.append({**_facts(mapped(hu), labels[k] if labels else None, path, len(rows), group),
                             "slice": name, "read_height": read_shape[0], "read_width": read_shape[1],
                             "nearest_raw_hu": nearest[k][0], "nearest_raw": nearest[k][1]})
            np.save(tmp / f"part{g}.images.npy", images)
            if labels:
                np.save(tmp / f"part{g}.weak.npy",
                        np.stack([fit(w.astype(np.float32), shape).round().astype(np.uint8) for w in labels]))
            parts.append(g)
        facts = pd.DataFrame(rows)
        report = run_suite("unlabelled_data", facts, _expectations(weak_dir is not None, v), ["file", "index"])
        name_rows(report, facts)
        report = to_jsonable(report)
        report["source"] = ", ".join(map(str, inputs))
        if not report["success"]:
            raise ContractError(report)
        _concatenate(tmp, parts, "images", UNLABELLED_IMAGES, (len(rows), *shape), np.int16)
        if weak_dir is not None:
            _concatenate(tmp, parts, "weak", UNLABELLED_WEAK, (len(rows), *shape), np.uint8)
        facts.assign(intensity=intensity, rotate=rotate).drop(columns=["index"]).to_csv(
            tmp / UNLABELLED_SLICES, index_label="index")
    return {"report": report, "slices": len(rows), "groups": len(parts)}


def _concatenate(folder: Path, parts: list[int], kind: str, name: str, shape: tuple, dtype) -> None:
    """The groups' part files of `kind` into one .npy `name`, written part by part (bounded memory)."""
    array = np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=shape)
    at = 0
    for g in parts:
        part = np.load(folder / f"part{g}.{kind}.npy")
        array[at:at + len(part)] = part
        at += len(part)
        (folder / f"part{g}.{kind}.npy").unlink()
    array.flush()
    del array
