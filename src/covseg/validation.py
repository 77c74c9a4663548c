"""Data contracts with Great Expectations: raw slices, processed arrays, the submission CSV.

Each contract is a table of facts (pandas) and a suite of expectations whose thresholds come from
`params.yaml` (`validate:`). A failed contract raises `ContractError` with a report that names every
failing expectation, the file, the slice indices and the observed values.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from covseg.atomic import to_jsonable
from covseg.data import RawData
from covseg.errors import DataError
from covseg.names import NUM_CLASSES, PARTS, RAW_IMAGES, RAW_MASKS, RAW_TEST_IMAGES, SHORT, processed_file
from covseg.params import Validate
from covseg.preprocessing import load_split


class ContractError(DataError):
    """Data broke a contract; `report` holds the machine-readable result."""

    def __init__(self, report: dict):
        self.report = report
        super().__init__(summary(report))


# --------------------------------------------------------------------------------------------
# Facts


def _image_facts(image: np.ndarray) -> dict:
    finite = np.isfinite(image)
    values = image[finite].astype(np.float64)
    if values.size == 0:
        values = np.array([np.nan])
    p01, p50, p99 = np.percentile(values, [1, 50, 99])
    return {
        "dtype": str(image.dtype), "height": image.shape[0], "width": image.shape[1],
        "nonfinite": int((~finite).sum()), "hu_min": values.min(), "hu_max": values.max(),
        "hu_range": values.max() - values.min(), "hu_mean": values.mean(),
        "hu_p01": p01, "hu_p50": p50, "hu_p99": p99,
        "hash": hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(),
    }


def _mask_facts(mask: np.ndarray, image: np.ndarray | None, body_hu: float,
                min_finding_pixels: int) -> dict:
    binary = np.isin(mask, (0, 1))
    counts = mask.astype(np.int64).sum(-1)
    labels = np.argmax(mask, -1)
    facts = {
        "mask_height": mask.shape[0], "mask_width": mask.shape[1],
        "mask_values_ok": bool(binary.all()), "onehot_bad_pixels": int((counts != 1).sum()),
        **{f"frac_{name}": float((labels == c).mean())
           for c, name in enumerate(SHORT)},
    }
    facts["frac_lesion"] = facts["frac_ggo"] + facts["frac_consolidation"]
    if image is not None and image.shape[:2] == mask.shape[:2]:
        hu = np.nan_to_num(image.astype(np.float64), nan=-1000.0)
        lesion = labels <= 1
        body = ndimage.binary_fill_holes(hu > body_hu)  # air connected to the border is outside the body
        facts["lesion_outside_body"] = float((lesion & ~body).sum() / max(lesion.sum(), 1))
        lung = (labels == 2) & body
        facts["lung_hu_mean"] = float(hu[lung].mean()) if lung.any() else -1000.0
        # consolidation is denser than ground glass; where a slice has enough of both, compare them
        ggo, cons = labels == 0, labels == 1
        enough = ggo.sum() >= min_finding_pixels and cons.sum() >= min_finding_pixels
        facts["consolidation_minus_ggo_hu"] = float(hu[cons].mean() - hu[ggo].mean()) if enough else None
    facts["frac_lung"] = float((labels <= 2).mean())  # lung, findings included
    return facts


def _thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    """(N, H, W) HU -> (N, side', side') block means of the HU clipped to [-1000, 400] (a CT window)."""
    n, h, w = images.shape
    f = max(1, min(h, w) // side)
    cropped = np.clip(np.nan_to_num(images[:, : h // f * f, : w // f * f].astype(np.float32), nan=-1000.0),
                      -1000, 400)
    return cropped.reshape(n, h // f, f, w // f, f).mean((2, 4))


def nearest_slice_distance(images: np.ndarray, side: int) -> np.ndarray:
    """Per slice: mean absolute HU difference (on thumbnails of about `side` pixels) to the most similar
    other slice."""
    thumbs = _thumbnails(images, side).reshape(len(images), -1)
    out = np.full(len(images), np.inf)
    for i in range(len(images)):
        d = np.abs(thumbs - thumbs[i]).mean(1)
        d[i] = np.inf
        out[i] = d.min()
    return out


def raw_facts(raw: RawData, v: Validate) -> pd.DataFrame:
    """One row per slice of the three raw files, with image and (for labelled slices) mask facts."""
    rows = []
    n_img, n_mask = len(raw.images), len(raw.masks)
    for i in range(max(n_img, n_mask)):
        row = {"file": RAW_IMAGES if i < n_img else RAW_MASKS, "index": i, "role": "labelled",
               "slice_id": raw.train_ids[i] if i < len(raw.train_ids) else i,
               "has_image": i < n_img, "has_mask": i < n_mask}
        image = np.asarray(raw.images[i, ..., 0]) if i < n_img else None
        if image is not None:
            row.update(_image_facts(image))
        if i < n_mask:
            row.update(_mask_facts(np.asarray(raw.masks[i]), image, v.body_hu, v.min_finding_pixels))
        rows.append(row)
    for i in range(len(raw.test_images)):
        rows.append({"file": RAW_TEST_IMAGES, "index": i, "role": "test", "slice_id": raw.test_ids[i],
                     "has_image": True, "has_mask": True,
                     **_image_facts(np.asarray(raw.test_images[i, ..., 0]))})
    table = pd.DataFrame(rows)
    if raw.images.shape[1:] == raw.test_images.shape[1:]:  # else the geometry expectations fail
        every = np.concatenate([np.asarray(raw.images[..., 0]), np.asarray(raw.test_images[..., 0])])
        nearest = nearest_slice_distance(every, v.thumbnail_size)
        table.loc[table["has_image"], "nearest_slice_hu"] = nearest
    return table


# --------------------------------------------------------------------------------------------
# Suites


def raw_expectations(facts: pd.DataFrame, raw: RawData, v: Validate) -> list:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    height, width = raw.images.shape[1:3]
    cond = {"row_condition": Column("role") == "labelled"}  # mask facts exist for labelled rows only
    return [
        gxe.ExpectColumnValuesToBeInSet(column="has_mask", value_set=[True],
                                        meta={"check": "every image has a mask"}),
        gxe.ExpectColumnValuesToBeInSet(column="has_image", value_set=[True],
                                        meta={"check": "every mask has an image"}),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[height],
                                        meta={"check": f"geometry {height}x{width}, as the labelled images"}),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[width],
                                        meta={"check": f"geometry {height}x{width}, as the labelled images"}),
        gxe.ExpectColumnValuesToBeInSet(column="mask_height", value_set=[height], **cond,
                                        meta={"check": "masks have the images' geometry"}),
        gxe.ExpectColumnValuesToBeInSet(column="mask_width", value_set=[width], **cond,
                                        meta={"check": "masks have the images' geometry"}),
        gxe.ExpectColumnValuesToBeBetween(column="nonfinite", max_value=0,
                                          meta={"check": "every pixel is finite (no NaN or inf)"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_min", min_value=v.hu_min,
                                          meta={"check": "intensities are Hounsfield units (lowest value)"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_max", max_value=v.hu_max,
                                          meta={"check": "intensities are Hounsfield units (highest value)"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_min", max_value=v.air_hu_max,
                                          meta={"check": "air near -1000 HU (not 0..1 or 0..255 data)"}),
        gxe.ExpectColumnValuesToBeBetween(column="hu_range", min_value=v.min_hu_range,
                                          meta={"check": "a HU-wide range of intensities"}),
        gxe.ExpectColumnValuesToBeInSet(column="mask_values_ok", value_set=[True], **cond,
                                        meta={"check": "mask values are 0 or 1"}),
        gxe.ExpectColumnValuesToBeBetween(column="onehot_bad_pixels", max_value=0, **cond,
                                          meta={"check": "masks are one-hot (exactly one class per pixel)"}),
        gxe.ExpectColumnValuesToBeBetween(column="frac_background", min_value=v.min_background_fraction, **cond,
                                          meta={"check": "background is present"}),
        gxe.ExpectColumnValuesToBeBetween(column="frac_lesion", max_value=v.max_lesion_fraction, **cond,
                                          meta={"check": "lesions are not most of the image"}),
        gxe.ExpectColumnValuesToBeBetween(column="lesion_outside_body", max_value=v.max_lesion_outside_body,
                                          **cond, meta={"check": "lesions lie inside the body, not in outside air"}),
        gxe.ExpectColumnValuesToBeBetween(column="lung_hu_mean", max_value=v.lung_hu_mean_max, **cond,
                                          meta={"check": "'lungs other' labels lie on lung-dark pixels "
                                                         "(mask matches image)"}),
        gxe.ExpectColumnValuesToBeUnique(column="hash", meta={"check": "no duplicate slices (train or test)"}),
        gxe.ExpectColumnValuesToBeBetween(column="frac_lung", min_value=v.min_lung_fraction, **cond,
                                          meta={"check": "labelled slices show lung (labels not wiped)"}),
        gxe.ExpectColumnValuesToBeBetween(column="consolidation_minus_ggo_hu",
                                          min_value=v.min_consolidation_minus_ggo_hu, **cond,
                                          meta={"check": "consolidation is denser than ground glass "
                                                         "(finding channels not swapped)"}),
        gxe.ExpectColumnValuesToBeBetween(column="nearest_slice_hu", min_value=v.near_duplicate_hu,
                                          meta={"check": "no near-copies among the slices (train or test)"}),
    ]


def run_suite(name: str, table: pd.DataFrame, expectations: list, index_columns: list[str] | None = None) -> dict:
    """Run expectations on a table with an ephemeral GX context; return a JSON-able report."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result_format = ({"result_format": "COMPLETE", "unexpected_index_column_names": index_columns}
                     if index_columns else {"result_format": "SUMMARY"})
    result = definition.run(batch_parameters={"dataframe": table}, result_format=result_format)
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "row_condition", "condition_parser")}
        res = r.result or {}
        check = {"expectation": cfg.type, "check": (cfg.meta or {}).get("check", ""), "success": bool(r.success),
                 "kwargs": kwargs}
        if "observed_value" in res:
            check["observed"] = res["observed_value"]
        if not r.success and res.get("unexpected_index_list"):
            check["failing_rows"] = res["unexpected_index_list"][:50]
            check["unexpected_count"] = res.get("unexpected_count")
        elif not r.success and "unexpected_count" in res:
            check["unexpected_count"] = res["unexpected_count"]
            check["sample_values"] = res.get("partial_unexpected_list", [])[:10]
        if r.exception_info and r.exception_info.get("raised_exception"):
            check["error"] = r.exception_info.get("exception_message")
        checks.append(check)
    return to_jsonable({"suite": name, "success": bool(result.success), "rows": len(table), "checks": checks})


def summary(report: dict) -> str:
    """Human summary: one line per failing expectation with the file, slice indices and values."""
    failed = [c for c in report["checks"] if not c["success"]]
    if not failed:
        return f"{report['suite']}: all {len(report['checks'])} expectations passed ({report['rows']} rows)"
    lines = [f"{report['suite']}: {len(failed)} of {len(report['checks'])} expectations failed"
             + (f" in {report['source']}" if report.get("source") else "")]
    for c in failed:
        column = c["kwargs"].get("column", "")
        bounds = {k: c["kwargs"][k] for k in ("min_value", "max_value", "value_set", "value") if k in c["kwargs"]}
        lines.append(f"  FAILED {c['check'] or c['expectation']} [{c['expectation']}({column}) {bounds}]")
        if c.get("error"):
            lines.append(f"    error: {c['error']}")
        if c.get("failing_rows"):
            by_file: dict[str, list[str]] = {}
            for row in c["failing_rows"]:
                by_file.setdefault(row.get("file", row.get("part", "?")), []).append(
                    f"{row.get('index', '?')} ({column}={row.get(column)})")
            for file, items in by_file.items():
                more = c.get("unexpected_count", len(items)) - len(items) if len(by_file) == 1 else 0
                lines.append(f"    {file}: slices " + ", ".join(items[:12])
                             + (f" ... and {more + len(items) - 12} more" if len(items) > 12 or more > 0 else ""))
        elif "observed" in c:
            lines.append(f"    observed: {c['observed']}")
        if c.get("sample_values"):
            lines.append(f"    {c.get('unexpected_count')} unexpected values, e.g. {c['sample_values']}")
    return "\n".join(lines)


def validate_raw(raw: RawData, v: Validate) -> dict:
    """The raw-data contract; raises ContractError on failure, returns the report."""
    facts = raw_facts(raw, v)
    report = run_suite("raw_data", facts, raw_expectations(facts, raw, v), ["file", "index"])
    report["source"] = str(raw.directory)
    report["facts"] = facts.drop(columns=["hash"]).to_dict(orient="records")
    if not report["success"]:
        raise ContractError(report)
    return report


def validate_processed(directory: str | Path, folds: int, n_labelled: int, n_with_consolidation: int) -> dict:
    """The preprocessed-output contract: values in [0, 1], class indices 0..3, split sizes, stratification."""
    import great_expectations.expectations as gxe

    directory = Path(directory)
    split = load_split(directory)
    rows = []
    for part in PARTS:
        images = np.load(directory / processed_file(part, "images"), mmap_mode="r")
        labels_path = directory / processed_file(part, "labels")
        labels = np.load(labels_path, mmap_mode="r") if labels_path.exists() else None
        for i in range(len(images)):
            rows.append({"part": part, "file": processed_file(part, "images"), "index": i,
                         "nonfinite": int((~np.isfinite(images[i])).sum()),
                         "min": float(np.nanmin(images[i])), "max": float(np.nanmax(images[i])),
                         "label_min": int(labels[i].min()) if labels is not None else 0,
                         "label_max": int(labels[i].max()) if labels is not None else 0})
    table = pd.DataFrame(rows)
    n_val = int((table["part"] == "val").sum())
    table["n_val"] = n_val
    table["n_train"] = int((table["part"] == "train").sum())
    # each block of `folds` slices (sorted by burden) gives one to every fold
    lo, hi = n_labelled // folds, -(-n_labelled // folds)
    need = 1 if n_with_consolidation >= folds else 0
    table["val_with_consolidation"] = split["val_with_consolidation"]
    table["train_with_consolidation"] = split["train_with_consolidation"]
    expectations = [
        gxe.ExpectColumnValuesToBeBetween(column="nonfinite", max_value=0,
                                          meta={"check": "every input is finite (no NaN or inf)"}),
        gxe.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, meta={"check": "inputs within [0, 1]"}),
        gxe.ExpectColumnValuesToBeBetween(column="max", max_value=1.0, meta={"check": "inputs within [0, 1]"}),
        gxe.ExpectColumnValuesToBeBetween(column="label_min", min_value=0, meta={"check": "class indices in 0..3"}),
        gxe.ExpectColumnValuesToBeBetween(column="label_max", max_value=NUM_CLASSES - 1,
                                          meta={"check": f"class indices in 0..{NUM_CLASSES - 1}"}),
        gxe.ExpectColumnValuesToBeBetween(column="n_val", min_value=lo, max_value=hi,
                                          meta={"check": f"validation is 1/{folds} of {n_labelled} slices"}),
        gxe.ExpectColumnValuesToBeBetween(column="n_train", min_value=n_labelled - hi, max_value=n_labelled - lo,
                                          meta={"check": "training holds the other slices"}),
        gxe.ExpectColumnValuesToBeBetween(column="val_with_consolidation", min_value=need,
                                          meta={"check": "validation sees consolidation"}),
        gxe.ExpectColumnValuesToBeBetween(column="train_with_consolidation", min_value=need,
                                          meta={"check": "training sees consolidation"}),
    ]
    report = run_suite("processed_data", table, expectations, ["file", "index"])
    report["source"] = str(directory)
    if not report["success"]:
        raise ContractError(report)
    return report


def validate_submission(table: pd.DataFrame, expected_rows: int, path: str | Path) -> dict:
    """The submission contract, checked before the CSV is written."""
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=["Id", "Predicted"],
                                                 meta={"check": "columns Id, Predicted"}),
        gxe.ExpectTableRowCountToEqual(value=expected_rows, meta={"check": "one row per image, pixel and class"}),
        gxe.ExpectColumnValuesToBeUnique(column="Id", meta={"check": "unique Ids"}),
        gxe.ExpectColumnValuesToBeInSet(column="Predicted", value_set=[0, 1], meta={"check": "values 0 or 1"}),
    ]
    report = run_suite("submission", table, expectations)
    report["source"] = str(path)
    if not report["success"]:
        raise ContractError(report)
    return report
