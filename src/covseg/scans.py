"""Scans a person brings: find them, read them as axial HU slices, write label maps back in their own format.

Formats (by extension; DICOM also by its `DICM` marker):
    NIfTI   .nii, .nii.gz     a 3D volume in HU (a 2D one is one slice); 4D is refused
    DICOM   a folder of one series (.dcm or no extension), or one .dcm file; RescaleSlope / Intercept
            applied, slices ordered by ImagePositionPatient along the slice normal, mixed geometry refused
    PNG/JPG .png, .jpg, .jpeg  one 8-bit grey slice exported with a known HU window (predict.png_hu_*), turned
                              as its EXIF orientation says; 1-bit, transparent or multi-frame images are refused
    NumPy   .npy              the Kaggle layout: (N, H, W, 1) or (N, H, W) in HU, one scan of N slices

A scan whose header claims more than predict.max_voxels, or slices of more than predict.max_slice_pixels, is
refused before its data is read or decoded.

Every scan is read as `Scan.hu` (N, H, W) float32 in the radiological display orientation the model was
trained on: rows run anterior to posterior, columns patient right to left, slices inferior to
superior (volumes are reoriented from their affine; the label map is turned back before it is written,
so it has the input's own voxel grid and affine). A bad file is one `DataError` naming it and the problem.
"""
from __future__ import annotations

import fnmatch
import glob
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covseg.atomic import atomic_output
from covseg.errors import DataError
from covseg.names import (
    LABELS_SUFFIX,
    NUM_CLASSES,
    PREDICT_INDEX,
    PREDICT_OVERLAYS,
    PREDICT_REPORT_JSON,
    PREDICT_REPORT_SCANS,
    PREDICT_REPORT_SLICES,
)
from covseg.params import Predict

NIFTI, DICOM, IMAGE, NPY = "nifti", "dicom", "image", "npy"
SUFFIXES = {".nii": NIFTI, ".nii.gz": NIFTI, ".dcm": DICOM, ".png": IMAGE, ".jpg": IMAGE, ".jpeg": IMAGE,
            ".npy": NPY}
DISPLAY = ("P", "L", "S")  # the model's slice orientation: rows -> posterior, columns -> left, slices -> up
# Label-map colours of a PNG label map (palette indices are the class indices; background black).
PALETTE = [255, 0, 0, 0, 255, 0, 0, 77, 255, 0, 0, 0]
# What `covseg predict` writes in an --out folder besides overlays/: never read back as a scan.
OUTPUT_FILES = {PREDICT_INDEX, PREDICT_REPORT_JSON, PREDICT_REPORT_SCANS, PREDICT_REPORT_SLICES}
LABEL_FILES = tuple(f"{LABELS_SUFFIX}{ext}" for ext in (".nii.gz", ".nii", ".png", ".npy"))


@dataclass
class Source:
    """One scan to read: a file, or the DICOM files of one folder."""
    path: Path
    kind: str
    files: list[Path] = field(default_factory=list)  # DICOM only


@dataclass
class Scan:
    source: Source
    hu: np.ndarray                       # (N, H, W) float32, display orientation
    spacing: tuple[float, float, float] | None = None  # mm: row, column, slice (None: unknown)
    slice_names: list[str] = field(default_factory=list)  # where each slice comes from in the input
    meta: dict = field(default_factory=dict)  # what writing the labels back needs


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem(path: Path) -> str:
    return path.name[:-len(suffix(path))] if suffix(path) else path.name


def is_dicom(path: Path) -> bool:
    if suffix(path) == ".dcm":
        return True
    if suffix(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _output_name(name: str) -> bool:
    """Whether a file name is one that `covseg predict` writes in its --out folder."""
    return name.lower() in OUTPUT_FILES or name.lower().endswith(LABEL_FILES)


def _glob_match(parts: tuple[str, ...], pats: tuple[str, ...], prefix: bool = False) -> bool:
    """Whether path components match glob components as `glob.glob(recursive=True)` does (`**`: zero or more
    folders; `*` and `**` skip hidden names); with `prefix`, whether something under `parts` still may."""
    if not parts:
        return prefix or all(p == "**" for p in pats)
    if not pats:
        return False
    head, name = pats[0], parts[0]
    if head == "**":
        return (_glob_match(parts, pats[1:], prefix)
                or (not name.startswith(".") and _glob_match(parts[1:], pats, prefix)))
    return (fnmatch.fnmatchcase(name, head) and (head.startswith(".") or not name.startswith("."))
            and _glob_match(parts[1:], pats[1:], prefix))


def _walk(root: Path, prune) -> Iterable[tuple[Path, tuple[str, ...], list[str]]]:
    """(folder, its path components under `root`, its file names): os.walk following folder links, but never
    into a folder already walked (by real path), so a link loop (`a/loop -> ..`) ends; `prune(path, real_path,
    components)` drops a folder."""
    visited = {root.resolve()}
    top = str(root)
    for folder, dirs, files in os.walk(top, followlinks=True):
        rel = () if folder == top else tuple(os.path.relpath(folder, top).split(os.sep))
        kept = []
        for name in sorted(dirs):
            real = Path(folder, name).resolve()
            if real not in visited and not prune(Path(folder, name), real, (*rel, name)):
                visited.add(real)
                kept.append(name)
        dirs[:] = kept
        yield Path(folder), rel, sorted(files)


def find_sources(inputs: Iterable[str | Path | Source], exclude: Path | None = None) -> tuple[list[Source], list[dict],
                                                                                         list[str]]:
    """Inputs (files, folders, glob patterns) -> (sources, failures, skipped).

    A folder is searched recursively (following folder links, each real folder once): the DICOM files of each
    folder are one scan, other files are taken by extension; files of other types inside folders are skipped
    (and listed), hidden ones ignored. A named file of an unknown type, or a missing path, is a failure
    {"input", "error"}. A file reached twice (by two inputs, a link or a glob) is one scan.

    `exclude` is `--out`: nothing under it is read when it lies inside a searched folder, and covseg predict's
    own outputs (label maps, reports, index, overlays/) in it, or in any folder holding a predict index, never
    are, even when `--out` is an input folder itself.
    """
    sources: list[Source] = []
    failures: list[dict] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    out = exclude.resolve() if exclude else None

    def output_folder(folder: Path) -> bool:
        return folder == out or (folder / PREDICT_INDEX).is_file()

    def excluded(real: Path, root: Path) -> bool:
        """Whether the file or folder at `real` is --out's content (searched from `root`) or predict's output."""
        if out is not None and _inside(real, out) and not _inside(root, out):
            return True
        if _output_name(real.name) and output_folder(real.parent):
            return True
        return any(p.name == PREDICT_OVERLAYS and output_folder(p.parent) for p in (real, *real.parents))

    def add(source: Source) -> None:
        key = source.path.resolve()
        if key not in seen:
            seen.add(key)
            sources.append(source)

    def add_file(path: Path, named: bool) -> None:
        kind = DICOM if is_dicom(path) else SUFFIXES.get(suffix(path))
        if kind is None:
            if named:
                failures.append({"input": str(path), "error": f"{path}: unknown file type {suffix(path) or '(none)'!r}"
                                 f"; expected one of {', '.join(sorted(SUFFIXES))} or a DICOM folder"})
            else:
                skipped.append(str(path))
        elif kind == DICOM:
            add(Source(path, DICOM, [path]))
        else:
            add(Source(path, kind))

    def add_folder(folder: Path) -> None:
        root = folder.resolve()
        if excluded(root, root):
            return
        for path, _, files in _walk(folder, lambda p, real, rel: rel[-1].startswith(".") or excluded(real, root)):
            dicom = []
            for name in files:
                file = path / name
                if name.startswith(".") or (_output_name(name) and excluded(file.resolve(), root)):
                    continue  # (folders are pruned above: only a file's own name can make it an output here)
                if name.upper() == "DICOMDIR":  # a DICOM disc's index, no image: not a scan
                    skipped.append(str(file))
                elif is_dicom(file):
                    dicom.append(file)
                else:
                    add_file(file, named=False)
            if dicom:
                add(Source(path, DICOM, dicom))

    def expand(pattern: str) -> tuple[list[str], Path]:
        """(a glob pattern's matches, sorted; the real folder it searches); `**` is walked here, so that a
        folder link loop ends."""
        parts = pattern.split("/")
        first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        prefix = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
        top = Path(prefix or ".")
        root = top.resolve()
        if "**" not in parts:
            return sorted(glob.glob(pattern)), root
        if not top.is_dir():
            return [], root
        pats = tuple(p for p in parts[first:] if p)
        matches = [prefix or "."] if _glob_match((), pats) else []

        def prune(path: Path, real: Path, rel: tuple[str, ...]) -> bool:
            return excluded(real, root) or not _glob_match(rel, pats, prefix=True)

        for _, rel, files in _walk(top, prune):
            if rel and _glob_match(rel, pats):
                matches.append(os.path.join(prefix, *rel))
            matches += [os.path.join(prefix, *rel, name) for name in files if _glob_match((*rel, name), pats)]
        return sorted(matches), root

    for item in inputs:
        if isinstance(item, Source):  # already found (the predict flow hands chunks of sources around)
            add(item)
            continue
        path = Path(item)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            if not excluded(path.resolve(), path.resolve()):
                add_file(path, named=True)
        elif glob.has_magic(str(item)):
            matches, root = expand(str(item))
            if not matches:
                failures.append({"input": str(item), "error": f"{item}: the pattern matches no file"})
            for match in map(Path, matches):
                if excluded(match.resolve(), root):
                    continue
                if match.is_dir():
                    add_folder(match)
                else:
                    add_file(match, named=True)
        else:
            failures.append({"input": str(item), "error": f"{item}: no such file or folder"})
    return sources, failures, skipped


# ----------------------------------------------------------------------------------------- reading


def read_scan(source: Source, pp: Predict) -> Scan:
    """Read a source as HU slices in display orientation and check that it looks like a CT in HU."""
    reader = {NIFTI: _read_nifti, DICOM: _read_dicom, IMAGE: _read_image, NPY: _read_npy}[source.kind]
    scan = reader(source, pp)
    check_hu(scan.hu, source.path, pp, png=source.kind == IMAGE)
    return scan


def check_hu(hu: np.ndarray, path: Path, pp: Predict, png: bool = False) -> None:
    """A CT in Hounsfield units spans hundreds of HU and holds air; 0..1 or 0..255 data does not."""
    if hu.size == 0 or min(hu.shape[1:]) < 1:
        raise DataError(f"{path}: no pixels (shape {tuple(hu.shape)})")
    if not np.isfinite(hu).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    low, high = float(hu.min()), float(hu.max())
    what = "grey levels mapped to HU with predict.png_hu_min/max" if png else "values"
    if high - low < pp.min_hu_range:
        raise DataError(f"{path}: {what} span only {low:g}..{high:g}, less than predict.min_hu_range "
                        f"({pp.min_hu_range:g} HU): not a CT in Hounsfield units (a 0..1 or 0..255 export?)")
    if low > pp.air_hu_max:
        raise DataError(f"{path}: darkest value is {low:g} HU, above predict.air_hu_max ({pp.air_hu_max:g}): "
                        f"no air, so not a CT in Hounsfield units")


def check_claimed_size(path: Path, shape: tuple[int, ...], slice_shape: tuple[int, int] | None, pp: Predict,
                       what: str = "its header claims") -> None:
    """Refuse a scan whose header claims more than predict.max_slice_pixels per slice or predict.max_voxels in
    all, before its data is read: a small file may claim a huge array (a memory bomb)."""
    pixels = math.prod(int(n) for n in slice_shape or ())
    if slice_shape is not None and pixels > pp.max_slice_pixels:
        raise DataError(f"{path}: {what} {' x '.join(map(str, slice_shape))} = {pixels:,} pixels per slice, more "
                        f"than predict.max_slice_pixels ({pp.max_slice_pixels:,}); refused without reading it")
    voxels = math.prod(int(n) for n in shape)
    if voxels > pp.max_voxels:
        raise DataError(f"{path}: {what} {' x '.join(map(str, shape))} = {voxels:,} voxels, more than "
                        f"predict.max_voxels ({pp.max_voxels:,}); refused without reading it")


def _orientations(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input voxel axes -> display, display -> input voxel axes) nibabel orientation transforms."""
    import nibabel as nib

    src, dst = nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(DISPLAY)
    return nib.orientations.ornt_transform(src, dst), nib.orientations.ornt_transform(dst, src)


def _to_display(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) voxels + affine -> ((N, H, W) display slices, the transform used)."""
    import nibabel as nib

    forward, _ = _orientations(affine)
    return np.moveaxis(nib.orientations.apply_orientation(data, forward), 2, 0), forward


def _from_display(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of _to_display: (N, H, W) display slices -> the input's own voxel order."""
    import nibabel as nib

    _, back = _orientations(affine)
    return nib.orientations.apply_orientation(np.moveaxis(slices, 0, 2), back)


def _display_spacing(affine: np.ndarray, ornt: np.ndarray, unit_mm: float) -> tuple[float, float, float]:
    import nibabel as nib

    sizes = nib.affines.voxel_sizes(affine) * unit_mm
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = float(sizes[axis])
    return out[0], out[1], out[2]


def _input_slice_order(n: int, ornt: np.ndarray) -> tuple[int, list[int]]:
    """(the input's voxel axis that became the slice axis, its index of each display slice)."""
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, [n - 1 - k if ornt[axis, 1] < 0 else k for k in range(n)]


def _read_nifti(source: Source, pp: Predict) -> Scan:
    import nibabel as nib

    path = source.path
    try:
        img = nib.load(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: a {len(img.shape)}D NIfTI image {tuple(img.shape)}; expected a 3D CT volume "
                        f"(or a 2D slice)")
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise DataError(f"{path}: complex voxels (dtype {dtype}), as of an MR phase or k-space image; expected real "
                        f"numbers in HU")
    if dtype.kind not in "iuf":
        raise DataError(f"{path}: voxels of dtype {dtype}; expected real numbers in HU")
    affine = img.affine
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: the NIfTI affine (voxel to world, sform / qform) holds NaN or infinite values")
    try:
        if np.linalg.matrix_rank(affine[:3, :3]) < 3:
            raise ValueError("singular")
        ornt, _ = _orientations(affine)
    except (ValueError, np.linalg.LinAlgError):
        raise DataError(f"{path}: the NIfTI affine (voxel to world, sform / qform) is degenerate: a zero voxel size "
                        f"or two voxel axes along one direction") from None
    dims = tuple(shape) + (1,) * (3 - len(shape))
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])  # the voxel axis that becomes the slice axis
    check_claimed_size(path, tuple(shape), tuple(n for k, n in enumerate(dims) if k != axis), pp)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # a truncated or corrupt file fails here, when the voxels are read
        raise DataError(f"{path}: cannot read its voxels, the file is truncated or corrupt ({exc})") from None
    if data.ndim == 2:
        data = data[..., None]
    unit = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}.get(img.header.get_xyzt_units()[0], 1.0)
    hu, ornt = _to_display(data, affine)
    axis, index = _input_slice_order(len(hu), ornt)
    return Scan(source, np.ascontiguousarray(hu), _display_spacing(affine, ornt, unit),
                [f"voxel axis {axis} index {k}" for k in index], {"image": img, "shape": img.shape})


def _dicom_float(ds, key: str, path: Path, count: int, positive: bool = False) -> np.ndarray:
    value = ds.get(key)
    if value is None:
        raise DataError(f"{path}: DICOM file lacks {key}, needed to place its slice")
    try:
        array = np.asarray([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: DICOM {key} is not numeric ({value!r})") from None
    if array.shape != (count,):
        raise DataError(f"{path}: DICOM {key} has {array.size} values, expected {count}")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: DICOM {key} holds NaN or infinite values ({list(array)})")
    if positive and (array <= 0).any():
        raise DataError(f"{path}: DICOM {key} must be positive, it is {' / '.join(f'{v:g}' for v in array)} mm")
    return array


UNIT_TOLERANCE = 0.01  # ImageOrientationPatient: row and column directions are unit vectors, at right angles


def _dicom_orientation(ds, path: Path) -> np.ndarray:
    iop = _dicom_float(ds, "ImageOrientationPatient", path, 6)
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > UNIT_TOLERANCE or abs(np.linalg.norm(col) - 1) > UNIT_TOLERANCE
            or abs(float(row @ col)) > UNIT_TOLERANCE):
        raise DataError(f"{path}: DICOM ImageOrientationPatient is degenerate ({' '.join(f'{v:g}' for v in iop)}): "
                        f"its row and column directions must be two unit vectors at right angles")
    return iop


def _dicom_thickness(ds) -> float | None:
    try:
        value = float(ds.get("SliceThickness") or 0)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _read_dicom(source: Source, pp: Predict) -> Scan:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    if not source.files:
        raise DataError(f"{source.path}: no DICOM files")
    headers = []  # every file's header first: geometry and claimed size are checked before any pixel is read
    for path in source.files:
        try:
            ds = pydicom.dcmread(path, defer_size="256 KB")  # large values (the pixel data) are read when used
            rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            frames = int(ds.get("NumberOfFrames") or 1)
        except Exception as exc:
            raise DataError(f"{path}: not a readable DICOM image, truncated or corrupt ({exc})") from None
        if "PixelData" not in ds:
            raise DataError(f"{path}: not a readable DICOM image, truncated or corrupt (it holds no pixel data)")
        modality = ds.get("Modality")
        if modality and modality != "CT":
            raise DataError(f"{path}: DICOM Modality is {modality}, expected CT")
        check_claimed_size(path, (frames, rows, columns), (rows, columns), pp, what="its DICOM header claims")
        headers.append((path, ds, frames, rows, columns))
    sizes = {(rows, columns) for *_, rows, columns in headers}
    frames = sum(frames for _, _, frames, _, _ in headers)
    check_claimed_size(source.path, (frames, *sizes.pop()) if len(sizes) == 1
                       else (sum(f * r * c for _, _, f, r, c in headers),), None, pp, what="the DICOM series claims")
    slices = [{"path": path, "ds": ds, "uid": ds.get("SeriesInstanceUID"), "iop": _dicom_orientation(ds, path),
               "ipp": _dicom_float(ds, "ImagePositionPatient", path, 3),
               "spacing": _dicom_float(ds, "PixelSpacing", path, 2, positive=True),
               "thickness": _dicom_thickness(ds)} for path, ds, *_ in headers]
    for item in slices:
        path, ds = item["path"], item.pop("ds")
        try:
            pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)  # RescaleSlope / Intercept
        except Exception as exc:
            raise DataError(f"{path}: not a readable DICOM image, truncated or corrupt ({exc})") from None
        if pixels.ndim != 2:
            raise DataError(f"{path}: DICOM pixel data has shape {pixels.shape}, expected one grey slice")
        item["pixels"] = pixels
    where = source.path
    first = slices[0]
    problems = []
    if len({s["uid"] for s in slices}) > 1:
        problems.append(f"{len({s['uid'] for s in slices})} series (SeriesInstanceUID) in one folder")
    if len({s["pixels"].shape for s in slices}) > 1:
        problems.append(f"slice sizes differ: {sorted({s['pixels'].shape for s in slices})}")
    for key, tol, label in (("iop", 1e-4, "ImageOrientationPatient"), ("spacing", 1e-4, "PixelSpacing")):
        if any(not np.allclose(s[key], first[key], atol=tol) for s in slices):
            problems.append(f"{label} differs between slices")
    if problems:
        raise DataError(f"{where}: DICOM series with mixed geometry: {'; '.join(problems)}")
    row_cos, col_cos = first["iop"][:3], first["iop"][3:]
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda s: float(s["ipp"] @ normal))
    first = slices[0]  # the affine's origin: the first slice along the normal, not the first file read
    positions = np.array([s["ipp"] for s in slices])
    tol = pp.dicom_tolerance_mm
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        step = steps.mean(0)
        gaps = steps @ normal
        if gaps.min() < tol:
            raise DataError(f"{where}: DICOM series with mixed geometry: two slices at the same position "
                            f"({gaps.min():.3f} mm apart along the slice normal)")
        if np.abs(steps - step).max() > tol:
            raise DataError(f"{where}: DICOM series with mixed geometry: slice gaps are uneven ({gaps.min():.3f} to "
                            f"{gaps.max():.3f} mm; predict.dicom_tolerance_mm = {tol:g})")
    else:
        step = normal * (first["thickness"] or 1.0)
    row_mm, col_mm = first["spacing"]  # PixelSpacing: between rows, between columns
    # Voxel (i = column, j = row, k = slice) -> patient LPS, then RAS (the NIfTI world).
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * col_mm, col_cos * row_mm, step, first["ipp"]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = np.stack([s["pixels"].T for s in slices], axis=-1)  # (columns, rows, slices)
    hu, ornt = _to_display(volume, affine)
    spacing = _display_spacing(affine, ornt, 1.0)
    if len(slices) == 1 and first["thickness"] is None:
        spacing = (spacing[0], spacing[1], float("nan"))  # no slice thickness known: areas only
    axis, index = _input_slice_order(len(hu), ornt)
    names = ([slices[k]["path"].name for k in index] if axis == 2  # an axial series: its own files
             else [f"voxel axis {axis} index {k}" for k in index])
    return Scan(source, np.ascontiguousarray(hu), spacing, names, {"affine": affine, "shape": volume.shape})


def _read_image(source: Source, pp: Predict) -> Scan:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = source.path
    try:
        with warnings.catch_warnings():  # PIL warns of a decompression bomb; the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only: size, mode, frames
        with img:
            width, height = img.size
            check_claimed_size(path, (1, height, width), (height, width), pp)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise DataError(f"{path}: an image of {frames} frames (animated or multi-picture); expected one "
                                f"slice, not a series of images")
            mode = img.mode
            if mode == "1":
                raise DataError(f"{path}: a 1-bit (bilevel, black and white) image is not a CT export; expected an "
                                f"8-bit grey slice")
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(f"{path}: a {mode} (16-bit or float) image; expected an 8-bit grey export")
            img.load()
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation: how a viewer turns the stored pixels
            if orientation != 1:
                img = ImageOps.exif_transpose(img)  # the slice as a viewer shows it (a copy)
            rgba = np.asarray(img.convert("RGBA"))  # transparency (alpha, tRNS, a palette's) becomes alpha
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: the image claims too many pixels ({exc}); predict.max_slice_pixels is "
                        f"{pp.max_slice_pixels:,}; refused without reading it") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image, truncated or corrupt ({exc})") from None
    transparent = int((rgba[..., 3] < 255).sum())
    if transparent:
        raise DataError(f"{path}: an image with transparency ({transparent} pixels not fully opaque): a transparent "
                        f"pixel has no CT value; export the slice without alpha")
    rgb = rgba[..., :3].astype(np.float32)
    spread = max(np.abs(rgb[..., 0] - rgb[..., 1]).mean(), np.abs(rgb[..., 1] - rgb[..., 2]).mean())
    if spread > pp.colour_tolerance:
        raise DataError(f"{path}: a colour image (channels differ by {spread:.1f} grey levels on average, "
                        f"predict.colour_tolerance = {pp.colour_tolerance:g}): not a grey CT slice")
    grey = rgb.mean(-1)
    hu = pp.png_hu_min + grey / 255.0 * (pp.png_hu_max - pp.png_hu_min)
    return Scan(source, hu[None].astype(np.float32), None, [path.name], {"mode": mode, "exif_orientation": orientation})


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header, without reading its data."""
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic != b"\x93NUMPY":
            what = "a zip archive (an .npz file?)" if magic.startswith(b"PK") else "no .npy header"
            raise DataError(f"{path}: not a .npy array: {what}; expected one array saved with numpy.save")
        f.seek(0)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DataError(f"{path}: a .npy file of format version {version}; expected an array of real numbers")
    return tuple(shape), dtype


def _read_npy(source: Source, pp: Predict) -> Scan:
    path = source.path
    try:
        shape, dtype = _npy_header(path)
    except DataError:
        raise
    except Exception as exc:  # numpy raises several types for a corrupt or truncated header
        raise DataError(f"{path}: not a readable .npy array, truncated or corrupt ({exc})") from None
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{path}: dtype {dtype}; expected real numbers in HU")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)) or 0 in shape:
        raise DataError(f"{path}: shape {shape}; expected (N, H, W, 1) or (N, H, W) HU slices"
                        + (" (a one-hot mask file?)" if len(shape) == 4 and shape[-1] == NUM_CLASSES else ""))
    check_claimed_size(path, shape[:3], shape[1:3], pp)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a corrupt or truncated file
        raise DataError(f"{path}: not a readable .npy array, truncated or corrupt ({exc})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise DataError(f"{path}: not a readable .npy array (its data do not match its header {shape})")
    hu = array.reshape(shape[:3]).astype(np.float32)
    return Scan(source, hu, None, [f"index {k}" for k in range(len(hu))], {"shape": array.shape})


# ----------------------------------------------------------------------------------------- writing


def label_path(out_dir: Path, name: str, source: Source) -> Path:
    """Where a scan's label map goes: NIfTI keeps its suffix, DICOM becomes .nii.gz, images .png."""
    ext = {NIFTI: suffix(source.path) if source.kind == NIFTI else "", DICOM: ".nii.gz", IMAGE: ".png",
           NPY: ".npy"}[source.kind]
    return out_dir / f"{name}{LABELS_SUFFIX}{ext}"


def write_labels(scan: Scan, labels: np.ndarray, path: Path) -> Path:
    """Write (N, H, W) class indices (display orientation) in the input's own format and geometry, atomically."""
    labels = labels.astype(np.uint8)
    kind = scan.source.kind
    with atomic_output(path) as tmp:
        if kind == NIFTI:
            import nibabel as nib

            img = scan.meta["image"]
            data = _from_display(labels, img.affine).reshape(scan.meta["shape"])
            header = img.header.copy()
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1, 0)
            header.set_intent("label")
            header["cal_min"], header["cal_max"] = 0, NUM_CLASSES - 1
            header["descrip"] = b"covseg labels: 0 ggo 1 consolidation 2 lung 3 background"
            out = type(img)(data, img.affine, header)
            out.set_qform(img.get_qform(), int(img.header["qform_code"]))
            out.set_sform(img.get_sform(), int(img.header["sform_code"]))
            nib.save(out, tmp)
        elif kind == DICOM:
            import nibabel as nib

            data = _from_display(labels, scan.meta["affine"]).reshape(scan.meta["shape"])
            out = nib.Nifti1Image(data, scan.meta["affine"])
            out.set_qform(scan.meta["affine"], 1)  # scanner coordinates
            out.set_sform(scan.meta["affine"], 1)
            out.header.set_xyzt_units("mm")
            out.header.set_intent("label")
            out.header["cal_min"], out.header["cal_max"] = 0, NUM_CLASSES - 1
            nib.save(out, tmp)
        elif kind == IMAGE:
            from PIL import Image

            img = Image.fromarray(labels[0])  # L; the palette makes it P, pixel values stay class indices
            img.putpalette(PALETTE)
            img.save(tmp, format="PNG")
        else:
            np.save(tmp, labels.reshape(scan.meta["shape"]))
    return path
