"""Unlabelled scans: slices of other patients, without the four-class labels. No shipped recipe trains on
them: self-training on their images and their weak labels were cross-validated and not kept (docs/decisions.md).

`covseg data import-unlabelled` reads scans as `covseg predict` does (NIfTI, DICOM, PNG/JPG, .npy; folders
searched), turns each slice as told (`rotate`: quarter turns, for exports stored turned), maps its values to
HU (`intensity`), fits it to the labelled slices' size and checks the lot against the unlabelled-data contract
before anything lands. A folder of weak labels (one grey image a slice, of the same name, 255 = infection:
another model's predictions, say) may come with it. The folder written (PATHS.unlabelled):

    images.npy   (N, H, W) int16 HU, H x W the labelled slices' size: each slice centred, scaled down if larger,
                 its edge pixels repeated to fill
    weak.npy     (N, H, W) uint8, only with weak labels: 0 = none .. 255 = infection (ground glass and
                 consolidation together), fitted like its slice
    slices.csv   one row a slice: its source, the group (volume) it belongs to, its size as read, the contract's
                 facts, the intensity mode and the rotation

Intensity: `hu` takes the values as read (NIfTI and DICOM are HU; a PNG/JPG is mapped by predict.png_hu_*, the
window it was exported with). `match` is for 8-bit exports whose window is unknown and differs by source:
each group's values are mapped, quantile by quantile, onto the HU of the labelled slices inside their lungs'
bounding box (slices cropped to the lungs should be matched to the same region). A group is a volume, or the
slice images of one volume: names `<volume>_<slice number>`.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from covseg.atomic import atomic_output
from covseg.data import RawData, load_raw, one_hot_to_index
from covseg.errors import DataError
from covseg.names import INTENSITIES, NUM_CLASSES, UNLABELLED_IMAGES, UNLABELLED_SLICES, UNLABELLED_WEAK
from covseg.params import Predict, Validate
from covseg.scans import IMAGE, find_sources, read_scan, stem
from covseg.validation import ContractError, name_rows, nearest_raw, raw_thumbnails, run_suite, to_jsonable

QUANTILES = np.linspace(0.5, 99.5, 100)  # the landmarks `match` maps
WEAK_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def group_of(name: str) -> str:
    """The volume a slice file belongs to: its stem without a trailing `_<number>` (`vol_12.jpg` -> `vol`)."""
    name = stem(Path(name))
    return re.sub(r"_\d+$", "", name) or name


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


def matching(slices: list[np.ndarray], reference: np.ndarray, group: str):
    """A monotone map of the values of `slices` (one group) onto `reference` quantiles: its quantiles go to
    the reference's (values shared by several quantiles, such as a saturated white, to their mean)."""
    sample = np.concatenate([s[np.isfinite(s)].ravel()[::3] for s in slices])
    points = np.percentile(sample, QUANTILES)
    xs, inverse = np.unique(points, return_inverse=True)
    ys = np.bincount(inverse, weights=reference) / np.bincount(inverse)
    if len(xs) < 2:
        raise DataError(f"{group}: its slices hold one value almost everywhere: no intensities to match")
    return lambda hu: np.interp(hu, xs, ys)


def fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`image` scaled down to fit `shape` if larger (keeping its aspect), centred, its edges repeated to fill."""
    h, w = image.shape
    factor = min(1.0, shape[0] / h, shape[1] / w)
    if factor < 1.0:
        image = ndimage.zoom(image, factor, order=1, grid_mode=True, mode="nearest")[:shape[0], :shape[1]]
        h, w = image.shape
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return np.pad(image, ((top, shape[0] - h - top), (left, shape[1] - w - left)), mode="edge")


def _weak_file(weak_dir: Path, source: Path) -> Path:
    for ext in WEAK_SUFFIXES:
        if (weak_dir / f"{stem(source)}{ext}").is_file():
            return weak_dir / f"{stem(source)}{ext}"
    raise DataError(f"{source}: no weak label in {weak_dir} (expected {stem(source)}.png or another image of "
                    f"that name)")


def read_weak(path: Path, shape: tuple[int, int], image: Path, pp: Predict) -> np.ndarray:
    """A weak label image (8-bit grey, 0 = none .. 255 = infection; turned as its EXIF orientation says, as
    its slice is) as uint8, checked against its slice's shape as read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL warns of a decompression bomb; the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.size[0] * img.size[1] > pp.max_slice_pixels:
                raise DataError(f"{path}: {img.size[0]}x{img.size[1]} pixels, more than predict.max_slice_pixels "
                                f"({pp.max_slice_pixels:,}); refused without reading it")
            if img.mode not in ("L", "1"):
                raise DataError(f"{path}: a {img.mode} image; a weak label is an 8-bit grey image (0 = none .. "
                                f"255 = infection), not a colour overlay or a class map")
            grey = np.asarray(ImageOps.exif_transpose(img).convert("L"))
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{path}: the image claims too many pixels; refused without reading it") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image, truncated or corrupt ({exc})") from None
    if grey.shape != shape:
        raise DataError(f"{path}: {grey.shape[0]}x{grey.shape[1]} pixels, but its slice {image} is "
                        f"{shape[0]}x{shape[1]}: a weak label must cover its slice pixel for pixel")
    if 0 < grey.max() <= 1:
        raise DataError(f"{path}: values 0..1; a weak label marks infection with 255 (0 = none .. 255)")
    return grey


def _facts(hu: np.ndarray, weak: np.ndarray | None, source: str, index: int, group: str) -> dict:
    finite = np.isfinite(hu)
    values = hu[finite] if finite.any() else np.array([np.nan])
    row = {"file": source, "index": index, "group": group, "nonfinite": int((~finite).sum()),
           "hu_range": float(values.max() - values.min()), "hu_p01": float(np.percentile(values, 1))}
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
    if intensity not in INTENSITIES:
        raise DataError(f"intensity {intensity!r}: expected one of {', '.join(INTENSITIES)}")
    if rotate not in range(4):
        raise DataError(f"rotate {rotate!r}: expected 0, 1, 2 or 3 quarter turns")
    out, weak_dir = Path(out), Path(weak_dir) if weak_dir is not None else None
    if weak_dir is not None and not weak_dir.is_dir():
        raise DataError(f"{weak_dir}: the weak labels' folder does not exist")
    _check_out(out, [Path(raw), *(Path(i) for i in inputs if Path(i).exists()), *([weak_dir] if weak_dir else [])])
    labelled = load_raw(raw)
    shape = tuple(labelled.images.shape[1:3])
    sources, failures, _ = find_sources(inputs, exclude=out)
    if failures:
        raise DataError("; ".join(f"{f['input']}: {f['error']}" for f in failures))
    if weak_dir is not None:  # the weak labels are not scans, even in a folder searched for them
        sources = [s for s in sources if weak_dir.resolve() not in s.path.resolve().parents]
        seen: dict[str, Path] = {}
        for s in sources:
            if stem(s.path) in seen:
                raise DataError(f"{s.path} and {seen[stem(s.path)]}: two slices named {stem(s.path)}; weak labels "
                                f"are matched by name, so each slice needs a name of its own")
            seen[stem(s.path)] = s.path
    if not sources:
        raise DataError(f"{', '.join(map(str, inputs))}: no scan found (NIfTI, DICOM, PNG/JPG or .npy)")
    reference = reference_quantiles(labelled) if intensity == "match" else None
    thumbnails = raw_thumbnails(labelled, v)
    rows, parts = [], []

    def group_key(source) -> str:  # a volume; slice images of one volume: <folder>/<volume>_<k>.png
        return str(source.path.parent / group_of(source.path.name)) if source.kind == IMAGE else str(source.path)

    by_group = groupby(sorted(sources, key=lambda s: (group_key(s), str(s.path))), key=group_key)
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
                        weak = read_weak(_weak_file(weak_dir, source.path), hu.shape, source.path, pp)
                        labels.append(np.rot90(weak, rotate))
                    slices.append(np.rot90(hu, rotate))
                    names.append((str(source.path), scan.slice_names[k] if k < len(scan.slice_names) else str(k),
                                  hu.shape))
            mapped = matching(slices, reference, group) if reference is not None else (lambda hu: hu)
            images = np.stack([np.clip(np.rint(fit(np.nan_to_num(mapped(hu), nan=-1000.0), shape)), -32768, 32767)
                               .astype(np.int16) for hu in slices])
            nearest = nearest_raw(images, thumbnails)
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


def _check_out(out: Path, inputs: list[Path]) -> None:
    """`out` may not be, hold or lie inside an input (it is replaced whole), and an existing folder there must
    be an earlier import (which the new one replaces; DVC keeps its version)."""
    target = out.resolve()
    for path in inputs:
        real = path.resolve()
        if target == real or real in target.parents or target in real.parents:
            raise DataError(f"{out}: the output folder overlaps the input {path}; it is replaced whole, so it must "
                            f"be a folder of its own (default: data/unlabelled)")
    if out.is_dir() and any(out.iterdir()) and not (out / UNLABELLED_SLICES).is_file():
        raise DataError(f"{out}: a folder that is not an earlier unlabelled import (no {UNLABELLED_SLICES}); the "
                        f"import replaces its output folder whole, so choose an empty or new one")


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
