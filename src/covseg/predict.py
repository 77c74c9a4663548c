"""`covseg predict`: segment a person's own scans, write label maps, overlays and a report.

For every input (covseg.scans finds and reads them): HU slices -> the training HU window -> the model,
in batches under `torch.inference_mode` -> class indices, written back in the input's own format and
geometry, plus overlay PNGs of the slices with most findings, and one row per slice and per scan in
the report: lung area or volume, the share of the lung in ground glass and in consolidation, and a
severity grade. A bad input is one error naming it; the others are still processed.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from covseg.atomic import atomic_output, write_json
from covseg.errors import CovsegError, DataError
from covseg.names import (
    CLASSES,
    PATHS,
    PREDICT_INDEX,
    PREDICT_OVERLAYS,
    PREDICT_REPORT_JSON,
    PREDICT_REPORT_SCANS,
    PREDICT_REPORT_SLICES,
)
from covseg.params import Predict, Window
from covseg.scans import DICOM, Scan, Source, find_sources, label_path, read_scan, stem, write_labels

GGO, CONSOLIDATION, LUNG_OTHER = 0, 1, 2
SLICE_COLUMNS = ("scan", "slice", "source_slice", "lung_pixels", "lung_area_mm2", "ggo_pixels",
                 "consolidation_pixels", "ggo_percent", "consolidation_percent", "involvement_percent")
SCAN_COLUMNS = ("scan", "input", "format", "status", "error", "slices", "height", "width", "pixel_spacing_mm",
                "slice_spacing_mm", "lung_pixels", "lung_area_mm2", "lung_volume_ml", "ggo_percent",
                "consolidation_percent", "involvement_percent", "severity_grade", "labels", "overlays", "seconds")


# ------------------------------------------------------------------------------ report arithmetic


def percent(part: float, whole: float) -> float | None:
    """100 * part / whole; None where there is no lung to take a share of."""
    return None if whole <= 0 else 100.0 * float(part) / float(whole)


def severity_grade(involvement: float | None, thresholds: list[float]) -> int | None:
    """The number of thresholds the involvement (% of lung) reaches: [5, 25, 50, 75] -> 0 (< 5 %) .. 4 (>= 75 %)."""
    if involvement is None:
        return None
    return int(np.searchsorted(np.asarray(thresholds, dtype=float), involvement, side="right"))


def counts(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per slice of (N, H, W) class indices: lung (ground glass + consolidation + other lung), ggo, consolidation."""
    flat = labels.reshape(len(labels), -1)
    ggo, cons = (flat == GGO).sum(1), (flat == CONSOLIDATION).sum(1)
    return {"lung": ggo + cons + (flat == LUNG_OTHER).sum(1), "ggo": ggo, "consolidation": cons}


def slice_rows(name: str, labels: np.ndarray, pixel_area_mm2: float | None,
               source_slices: list[str] | None = None) -> list[dict]:
    """One report row per slice."""
    c = counts(labels)
    rows = []
    for k in range(len(labels)):
        lung, ggo, cons = int(c["lung"][k]), int(c["ggo"][k]), int(c["consolidation"][k])
        rows.append({"scan": name, "slice": k, "source_slice": source_slices[k] if source_slices else str(k),
                     "lung_pixels": lung, "lung_area_mm2": None if pixel_area_mm2 is None else lung * pixel_area_mm2,
                     "ggo_pixels": ggo, "consolidation_pixels": cons, "ggo_percent": percent(ggo, lung),
                     "consolidation_percent": percent(cons, lung), "involvement_percent": percent(ggo + cons, lung)})
    return rows


def scan_summary(labels: np.ndarray, spacing: tuple[float, float, float] | None,
                 thresholds: list[float]) -> dict:
    """One report row's numbers for a scan: lung size, shares of ground glass and consolidation, grade.

    `spacing` (row, column, slice mm; slice may be NaN) gives the lung area in mm^2 of a one-slice scan
    and the lung volume in mL of a volume; without it both are None and `lung_pixels` stands alone.
    """
    c = {k: int(v.sum()) for k, v in counts(labels).items()}
    area = volume = None
    if spacing is not None:
        pixel = spacing[0] * spacing[1]
        if len(labels) == 1:
            area = c["lung"] * pixel
        if np.isfinite(spacing[2]) and spacing[2] > 0 and len(labels) > 1:
            volume = c["lung"] * pixel * spacing[2] / 1000.0
    involvement = percent(c["ggo"] + c["consolidation"], c["lung"])
    return {"lung_pixels": c["lung"], "lung_area_mm2": area, "lung_volume_ml": volume,
            "ggo_percent": percent(c["ggo"], c["lung"]),
            "consolidation_percent": percent(c["consolidation"], c["lung"]),
            "involvement_percent": involvement, "severity_grade": severity_grade(involvement, thresholds)}


def grade_legend(thresholds: list[float]) -> dict[str, str]:
    """{'0': '< 5 %', '1': '5 to < 25 %', ..., '4': '>= 75 %'} of lung involved."""
    edges = [f"{t:g}" for t in thresholds]
    out = {"0": f"< {edges[0]} %"}
    for g in range(1, len(edges)):
        out[str(g)] = f"{edges[g - 1]} to < {edges[g]} %"
    out[str(len(edges))] = f">= {edges[-1]} %"
    return out


# ----------------------------------------------------------------------------------------- overlays


def overlay_slices(labels: np.ndarray, count: int) -> list[int]:
    """The `count` slices with most findings (ground glass + consolidation; ties: more lung, then lower index)."""
    c = counts(labels)
    order = np.lexsort((np.arange(len(labels)), -c["lung"], -(c["ggo"] + c["consolidation"])))
    return sorted(int(k) for k in order[:count])


def write_overlays(images: np.ndarray, labels: np.ndarray, slices: list[int], folder: Path, name: str) -> list[Path]:
    """Slices (n, H, W) in [0, 1] beside their labels (red ground glass, green consolidation, blue other lung),
    one PNG per slice named by its number in `slices`, in `folder` (replaced whole)."""
    from PIL import Image

    from covseg.plots import overlay_rgb

    files = []
    with atomic_output(folder, directory=True) as tmp:
        for image, label, k in zip(images, labels, slices):
            grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
            both = np.concatenate([grey, overlay_rgb(image, label)], axis=1)
            file = f"{name}_slice{k:04d}.png"
            Image.fromarray((both * 255).round().astype(np.uint8)).save(tmp / file)
            files.append(folder / file)
    return files


# ----------------------------------------------------------------------------------------- naming


def _load_index(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise ValueError("expected {output name: input path}")
    except ValueError as exc:
        raise DataError(f"{path}: not a covseg predict index ({exc}); remove it or choose another --out") from None
    return index


def assign_names(sources: list[Source], index: dict[str, str]) -> list[str]:
    """A unique output name per source: the name `index` already gives its input, else its file (or DICOM
    folder) name, with _2, _3, ... added while that name belongs to another input or is taken in this run."""
    owned = {v: k for k, v in index.items()}
    taken = set(index)
    names = []
    for src in sources:
        key = str(src.path.resolve())
        name = owned.get(key)
        if name is None or name in names:
            base = re.sub(r"[^A-Za-z0-9._-]+", "_", src.path.name if src.kind == DICOM and src.path.is_dir()
                          else stem(src.path)).strip("._") or "scan"
            name, n = base, 1
            while name in taken or name in names:
                n += 1
                name = f"{base}_{n}"
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------- the run


def _load(model, device, calibration_file):
    if not isinstance(model, str | Path):
        return model.to(device).eval()
    from covseg.modelstore import load_calibrated

    try:
        return load_calibrated(model, calibration_file, device)[0]
    except Exception as exc:  # a missing file, an unknown alias, an unreachable store: one message
        raise CovsegError(f"model {model}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def segment(model, hu: np.ndarray, win: Window, batch_size: int, device, progress=None) -> np.ndarray:
    """(N, H, W) HU -> (N, H, W) uint8 class indices, `batch_size` slices per forward pass."""
    import torch

    from covseg.model import predict_labels
    from covseg.preprocessing import window

    out = np.empty(hu.shape, dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, len(hu), batch_size):
            chunk = window(hu[start:start + batch_size], win.hu_min, win.hu_max)
            out[start:start + len(chunk)] = predict_labels(model, chunk, batch_size, device)
            if progress is not None:
                progress.update(len(chunk))
    return out


def _spacing_text(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def predict_one(scan: Scan, name: str, model, out: Path, pp: Predict, win: Window, device,
                progress=None) -> tuple[dict, list[dict]]:
    """Segment one read scan and write its label map and overlays; (its scan row, its slice rows)."""
    from covseg.preprocessing import window

    labels = segment(model, scan.hu, win, pp.batch_size, device, progress)
    labels_file = write_labels(scan, labels, label_path(out, name, scan.source))
    picks = overlay_slices(labels, pp.overlays)
    overlays = write_overlays(window(scan.hu[picks], win.hu_min, win.hu_max), labels[picks], picks,
                              out / PREDICT_OVERLAYS / name, name) if picks else []
    spacing = scan.spacing
    pixel_area = spacing[0] * spacing[1] if spacing else None
    row = {"scan": name, "input": str(scan.source.path), "format": scan.source.kind, "status": "ok", "error": "",
           "slices": labels.shape[0], "height": labels.shape[1], "width": labels.shape[2],
           "pixel_spacing_mm": _spacing_text(spacing[:2]) if spacing else "",
           "slice_spacing_mm": spacing[2] if spacing and np.isfinite(spacing[2]) and len(labels) > 1 else None,
           **scan_summary(labels, spacing, pp.severity_thresholds),
           "labels": labels_file.name, "overlays": [str(p.relative_to(out)) for p in overlays]}
    return row, slice_rows(name, labels, pixel_area, scan.slice_names)


def write_report(out: Path, scan_rows: list[dict], slices: list[dict], failed: list[dict], skipped: list[str],
                 pp: Predict, win: Window, facts: dict) -> Path:
    """report_slices.csv, report_scans.csv and report.json under `out`, each written atomically."""
    ok = [r for r in scan_rows if r["status"] == "ok"]
    report = {
        **facts, "window": win.model_dump(), "predict": pp.model_dump(),
        "severity": {"of": "involvement_percent = 100 * (ground glass + consolidation) / lung pixels",
                     "thresholds_percent": list(pp.severity_thresholds),
                     "grades": grade_legend(list(pp.severity_thresholds))},
        "classes": list(CLASSES),
        "summary": {"inputs": len(scan_rows), "ok": len(ok), "failed": len(failed), "skipped": len(skipped)},
        "scans": scan_rows, "failed": failed, "skipped": skipped,
    }
    with atomic_output(out / PREDICT_REPORT_SLICES) as tmp:
        pd.DataFrame(slices, columns=list(SLICE_COLUMNS)).to_csv(tmp, index=False)
    with atomic_output(out / PREDICT_REPORT_SCANS) as tmp:
        table = pd.DataFrame(scan_rows, columns=list(SCAN_COLUMNS))
        table["overlays"] = table["overlays"].map(lambda v: ";".join(v) if isinstance(v, list) else "")
        for column in ("slices", "height", "width", "lung_pixels", "severity_grade"):
            table[column] = table[column].astype("Int64")  # blank, not NaN, on a failed scan's row
        table.to_csv(tmp, index=False)
    return write_json(report, out / PREDICT_REPORT_JSON)


def predict_scans(inputs: list[str | Path | Source], out: str | Path, model, pp: Predict, win: Window,
                  progress: bool = True, calibration_file: str | Path = PATHS.calibration) -> dict:
    """Predict every scan in `inputs` (files, folders, glob patterns, or `Source`s) with `model` (a checkpoint path,
    calibrated by `calibration_file`; an MLflow model URI, calibrated when registered; or a loaded torch module);
    write label maps, overlays and the report under `out`.

    Returns {"scans": [row per scan, failures included], "failed": [{"input", "error"}], "skipped": [...],
    "report": path of report.json}. A bad input is a failure in the result and the report, never an
    exception; a model that cannot be loaded, or no input at all, raises CovsegError.
    """
    import torch
    from tqdm import tqdm

    from covseg.model import pick_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources, failed, skipped = find_sources(inputs, exclude=out)
    if not sources and not failed:
        raise CovsegError(f"no scans found in {', '.join(map(str, inputs)) or '(no inputs)'}"
                          + (f" ({len(skipped)} files of other types skipped)" if skipped else ""))
    for failure in failed:
        print(f"covseg predict: error: {failure['error']}", file=sys.stderr)
    index_path = out / PREDICT_INDEX
    index = _load_index(index_path)
    names = assign_names(sources, index)
    if pp.threads:
        torch.set_num_threads(pp.threads)
    device = pick_device(pp.device)
    net = _load(model, device, calibration_file) if sources else None
    scan_rows = [{"scan": "", "input": f["input"], "format": "", "status": "failed", "error": f["error"]}
                 for f in failed]
    all_slices: list[dict] = []
    bar = tqdm(total=0, unit="slice", desc="covseg predict", disable=not progress, file=sys.stderr)
    with bar:
        for src, name in zip(sources, names):
            start = time.perf_counter()
            bar.set_postfix_str(src.path.name)
            try:
                scan = read_scan(src, pp)
                bar.total += len(scan.hu)
                bar.refresh()
                row, rows = predict_one(scan, name, net, out, pp, win, device, bar)
            except Exception as exc:
                if isinstance(exc, DataError):
                    error = str(exc)
                else:  # an unforeseen failure on one file stops only that file
                    error = f"{src.path}: {type(exc).__name__}: {exc}"
                failed.append({"input": str(src.path), "error": error})
                scan_rows.append({"scan": "", "input": str(src.path), "format": src.kind, "status": "failed",
                                  "error": error})
                bar.write(f"covseg predict: error: {error}", file=sys.stderr)
                continue
            row["seconds"] = round(time.perf_counter() - start, 3)
            scan_rows.append(row)
            all_slices += rows
            index[name] = str(src.path.resolve())
            write_json(dict(sorted(index.items())), index_path)
    report = write_report(out, scan_rows, all_slices, failed, skipped, pp, win, {
        "model": str(model) if isinstance(model, str | Path) else type(model).__name__,
        "device": str(device), "threads": torch.get_num_threads()})
    return {"scans": scan_rows, "failed": failed, "skipped": skipped, "report": report}
