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


EDGE_HU = (-1000.0, 200.0)  # air .. soft tissue: the range in which the lung's edges are measured (bone and
#                             metal would dominate the image gradient)
EDGE_SIGMA = 0.7            # pixels: the gradient's smoothing (sharper falls off faster when the outline is moved)
BAND_PX = 2                 # pixels: the bands just inside and just outside the lung label's outline
MIN_AIR_FRACTION = 0.01     # a slice's outside air (or in-body air) is measured where it covers this much of it


def _body(hu: np.ndarray, body_hu: float) -> np.ndarray:
    """Inside of the body: tissue, and what it encloses; air connected to the border is outside."""
    return ndimage.binary_fill_holes(hu > body_hu)


def _calibration_facts(hu: np.ndarray, body: np.ndarray, body_hu: float) -> dict:
    """HU of the two anchors a calibration offset moves: outside air (-1000 HU) and aerated lung (about -850)."""
    outside = ndimage.binary_erosion(~body, iterations=2)  # away from the skin's partial-volume edge
    inside = body & (hu < body_hu)
    enough = MIN_AIR_FRACTION * hu.size
    return {"outside_air_hu": float(np.median(hu[outside])) if outside.sum() >= enough else None,
            "lung_parenchyma_hu": float(np.percentile(hu[inside], 25)) if inside.sum() >= enough else None}


def _edge_fit(outline: np.ndarray, gradient: np.ndarray, search_px: int) -> tuple[float, tuple[int, int]]:
    """Mean image gradient under `outline` where it is, divided by the most under it moved by up to `search_px`
    pixels either way (1: it fits best where it is), and the move that fits best."""
    from scipy import fft

    r = search_px
    shape = tuple(fft.next_fast_len(n + r, real=True) for n in outline.shape)  # zero-padded: no wrap-around
    corr = fft.irfft2(np.conj(fft.rfft2(outline.astype(np.float32), shape)) * fft.rfft2(gradient, shape), shape)
    window = np.roll(corr, (r, r), axis=(0, 1))[: 2 * r + 1, : 2 * r + 1]  # window[r + dy, r + dx]: moved by (dy, dx)
    best = np.unravel_index(np.argmax(window), window.shape)
    return float(window[r, r] / max(window.max(), 1e-9)), (int(best[0]) - r, int(best[1]) - r)


def _registration_facts(hu: np.ndarray, labels: np.ndarray, v: Validate) -> dict:
    """Does the lung label (findings included) sit where the image's aerated lung is? Its outline, where aerated
    lung ('lungs other') lies along it, must fit the image's air/tissue edges better than the same outline moved
    by a few pixels, and the image must be darker just inside it than just outside."""
    lung, aerated = labels <= 2, labels == 2
    facts = {"mask_edge_fit": None, "mask_best_fit": "", "mask_edge_contrast_hu": None}
    if aerated.sum() < v.min_finding_pixels or lung.all():
        return facts
    # the lung's bounding box and a margin (the search, the bands, the gradient's reach): the same numbers, faster
    margin = v.registration_search_px + BAND_PX + 4
    (y0, y1), (x0, x1) = ((max(0, int(k[0]) - margin), int(k[-1]) + margin + 1)
                          for k in (np.flatnonzero(lung.any(1)), np.flatnonzero(lung.any(0))))
    hu, lung, aerated = np.clip(hu[y0:y1, x0:x1], *EDGE_HU), lung[y0:y1, x0:x1], aerated[y0:y1, x0:x1]
    near_aerated = ndimage.binary_dilation(aerated, iterations=BAND_PX)
    eroded = ndimage.binary_erosion(lung, border_value=1)
    outline = (ndimage.binary_dilation(lung) ^ eroded) & near_aerated
    if outline.sum() >= v.min_finding_pixels:
        gradient = ndimage.gaussian_gradient_magnitude(hu.astype(np.float32), EDGE_SIGMA)
        fit, (dy, dx) = _edge_fit(outline, gradient, v.registration_search_px)
        facts["mask_edge_fit"] = fit
        facts["mask_best_fit"] = f"fits best moved by ({dy}, {dx}) px" if (dy, dx) != (0, 0) else "fits best in place"
    inner = aerated & ~ndimage.binary_erosion(lung, iterations=BAND_PX, border_value=1)
    outer = near_aerated & ~lung
    if inner.any() and outer.any():
        facts["mask_edge_contrast_hu"] = float(hu[outer].mean() - hu[inner].mean())
    return facts


def _mask_facts(mask: np.ndarray, hu: np.ndarray | None, body: np.ndarray | None, v: Validate) -> dict:
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
    if hu is not None and hu.shape[:2] == mask.shape[:2]:
        lesion = labels <= 1
        facts["lesion_outside_body"] = float((lesion & ~body).sum() / max(lesion.sum(), 1))
        lung = (labels == 2) & body
        facts["lung_hu_mean"] = float(hu[lung].mean()) if lung.any() else -1000.0
        # consolidation is denser than ground glass; where a slice has enough of both, compare them
        ggo, cons = labels == 0, labels == 1
        enough = ggo.sum() >= v.min_finding_pixels and cons.sum() >= v.min_finding_pixels
        facts["consolidation_minus_ggo_hu"] = float(hu[cons].mean() - hu[ggo].mean()) if enough else None
        facts.update(_registration_facts(hu, labels, v))
    facts["frac_lung"] = float((labels <= 2).mean())  # lung, findings included
    return facts


# Near-copies: two slices are compared on thumbnails (box means of about `side` pixels) of their HU minus the
# slice's median (so a calibration offset does not hide a copy), as they are and with one of them mirrored left
# to right, at every move of up to `max_shift` pixels (thumbnails sampled off the grid of block centres).

COPY_HU = 1500.0  # HU clipped to +-this before the comparison (real values lie well inside; bone and metal less)


def _copy_grid(h: int, w: int, side: int, max_shift: int):
    """Block size, and the block centres (rows, columns) at least `max_shift` pixels inside the slice."""
    f = max(1, min(h, w) // side)
    rows = np.arange(max_shift + f // 2, h - max_shift - f + f // 2 + 1, f)
    cols = np.arange(max_shift + f // 2, w - max_shift - f + f // 2 + 1, f)
    return f, rows, cols


def _boxed(image: np.ndarray, f: int) -> tuple[np.ndarray, float]:
    """The slice's HU (NaN as air) minus its median, box-filtered with an odd box of about f pixels (an odd box
    commutes with mirroring); and the median."""
    hu = np.clip(np.nan_to_num(np.asarray(image, np.float32), nan=-1000.0, posinf=COPY_HU, neginf=-COPY_HU),
                 -COPY_HU, COPY_HU)
    median = float(np.median(hu))
    return ndimage.uniform_filter(hu - median, f | 1, mode="nearest"), median


def nearest_slices(images, side: int, max_shift: int, candidates: int = 5) -> list[tuple]:
    """For each slice of `images` ((N, H, W), any sequence of slices): (distance, j, mirrored, (dy, dx), offset)
    of the most similar other slice j: the mean absolute HU difference of the thumbnails where slice i is slice j
    (mirrored left to right if `mirrored`) moved by (dy, dx) pixels, plus `offset` HU (offset removed). Slices are
    first ranked on blurred thumbnails; the `candidates` nearest are then searched for the best move."""
    n = len(images)
    if n < 2:
        return [(np.inf, -1, False, (0, 0), 0.0)] * n
    h, w = np.shape(images[0])[:2]
    f, rows, cols = _copy_grid(h, w, side, max_shift)
    if not (rows.size and cols.size):  # slices too small to compare
        return [(np.inf, -1, False, (0, 0), 0.0)] * n
    plain, mirror, medians, boxes = [], [], [], []
    for image in images:
        boxed, median = _boxed(image, f)
        plain.append(boxed[np.ix_(rows, cols)])
        mirror.append(boxed[:, ::-1][np.ix_(rows, cols)])
        medians.append(median)
        boxes.append(boxed)
    plain, mirror = np.stack(plain), np.stack(mirror)
    blur = (0, max(1.0, max_shift / f), max(1.0, max_shift / f))  # in thumbnail pixels: a move barely changes it
    coarse = ndimage.gaussian_filter(plain, blur).reshape(n, -1)
    coarse_mirror = ndimage.gaussian_filter(mirror, blur).reshape(n, -1)
    moves = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    out: list = [(np.inf, -1, False, (0, 0), 0.0)] * n
    for i in range(n):
        rough = np.minimum(np.abs(coarse - coarse[i]).mean(1), np.abs(coarse_mirror - coarse[i]).mean(1))
        rough[i] = np.inf
        near = np.argsort(rough)[: min(candidates, n - 1)]
        moved = np.stack([boxes[i][np.ix_(rows + dy, cols + dx)] for dy, dx in moves]).reshape(len(moves), -1)
        refs = np.concatenate([plain[near], mirror[near]]).reshape(2 * len(near), -1)
        d = np.abs(moved[:, None, :] - refs[None, :, :]).mean(-1)  # (moves, refs)
        m, r = np.unravel_index(np.argmin(d), d.shape)
        j, mirrored, (dy, dx), dist = int(near[r % len(near)]), bool(r >= len(near)), moves[m], float(d[m, r])
        if dist < out[i][0]:
            out[i] = (dist, j, mirrored, (dy, dx), medians[i] - medians[j])
        if dist < out[j][0]:  # the same pair seen from j: j is i (mirrored back), moved back
            out[j] = (dist, i, mirrored, (-dy, dx) if mirrored else (-dy, -dx), medians[j] - medians[i])
    return out


def raw_thumbnails(raw: RawData, v: Validate) -> dict:
    """Thumbnails (as `nearest_slices` compares them) of every labelled and test slice of `raw`, blurred ones to
    rank them, and their names: what `nearest_raw` compares other slices with."""
    h, w = raw.images.shape[1:3]
    shift = v.near_duplicate_shift_px
    f, rows, cols = _copy_grid(h, w, v.thumbnail_size, shift)
    thumbs, names = [], []
    for file, images in ((RAW_IMAGES, raw.images), (RAW_TEST_IMAGES, raw.test_images)):
        for i in range(len(images)):
            thumbs.append(_boxed(images[i, ..., 0], f)[0][np.ix_(rows, cols)])
            names.append(f"{file} {i}")
    blur = (0, max(1.0, shift / f), max(1.0, shift / f))
    thumbs = np.stack(thumbs)
    return {"thumbs": thumbs, "coarse": ndimage.gaussian_filter(thumbs, blur), "blur": blur, "names": names,
            "grid": (f, rows, cols), "shift": shift}


def nearest_raw(images: np.ndarray, raw: dict, candidates: int = 5) -> list[tuple]:
    """For each of `images` ((N, H, W), the raw slices' size): (distance, name) of the most similar labelled or
    test slice (`raw_thumbnails`): the mean absolute HU difference of their thumbnails, median removed, the
    slice also mirrored and moved by up to validate.near_duplicate_shift_px pixels (as `nearest_slices`)."""
    f, rows, cols = raw["grid"]
    if not (rows.size and cols.size):
        return [(np.inf, "")] * len(images)
    shift = raw["shift"]
    moves = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    out = []
    for image in images:
        boxed = _boxed(image, f)[0]
        best = (np.inf, "")
        for view in (boxed, boxed[:, ::-1]):
            coarse = ndimage.gaussian_filter(view[np.ix_(rows, cols)], raw["blur"][1:])
            near = np.argsort(np.abs(raw["coarse"] - coarse).mean((1, 2)))[:candidates]
            moved = np.stack([view[np.ix_(rows + dy, cols + dx)] for dy, dx in moves])
            d = np.abs(moved[:, None] - raw["thumbs"][near][None]).mean((2, 3))  # (moves, candidates)
            m, r = np.unravel_index(np.argmin(d), d.shape)
            if d[m, r] < best[0]:
                best = (float(d[m, r]), raw["names"][near[r]])
        out.append(best)
    return out


def _describe_copy(name: str, mirrored: bool, move: tuple, offset: float) -> str:
    parts = [name] + (["mirrored"] if mirrored else []) + ([f"moved by {move} px"] if move != (0, 0) else []) \
        + ([f"{offset:+.0f} HU"] if abs(offset) >= 0.5 else [])
    return ", ".join(parts)


def raw_facts(raw: RawData, v: Validate) -> pd.DataFrame:
    """One row per slice of the three raw files, with image and (for labelled slices) mask facts."""
    rows = []
    n_img, n_mask = len(raw.images), len(raw.masks)
    for i in range(max(n_img, n_mask)):
        row = {"file": RAW_IMAGES if i < n_img else RAW_MASKS, "index": i, "role": "labelled",
               "slice_id": raw.train_ids[i] if i < len(raw.train_ids) else i,
               "has_image": i < n_img, "has_mask": i < n_mask}
        image = np.asarray(raw.images[i, ..., 0]) if i < n_img else None
        hu = body = None
        if image is not None:
            hu = np.nan_to_num(image.astype(np.float64), nan=-1000.0)
            body = _body(hu, v.body_hu)
            row.update(_image_facts(image))
            row.update(_calibration_facts(hu, body, v.body_hu))
        if i < n_mask:
            row.update(_mask_facts(np.asarray(raw.masks[i]), hu, body, v))
        rows.append(row)
    for i in range(len(raw.test_images)):
        image = np.asarray(raw.test_images[i, ..., 0])
        hu = np.nan_to_num(image.astype(np.float64), nan=-1000.0)
        rows.append({"file": RAW_TEST_IMAGES, "index": i, "role": "test", "slice_id": raw.test_ids[i],
                     "has_image": True, "has_mask": True, **_image_facts(image),
                     **_calibration_facts(hu, _body(hu, v.body_hu), v.body_hu)})
    table = pd.DataFrame(rows)
    if raw.images.shape[1:] == raw.test_images.shape[1:]:  # else the geometry expectations fail
        every = [raw.images[i, ..., 0] for i in range(n_img)] + \
                [raw.test_images[i, ..., 0] for i in range(len(raw.test_images))]
        names = [f"{RAW_IMAGES} {i}" for i in range(n_img)] + \
                [f"{RAW_TEST_IMAGES} {i}" for i in range(len(raw.test_images))]
        nearest = nearest_slices(every, v.thumbnail_size, v.near_duplicate_shift_px)
        table.loc[table["has_image"], "nearest_slice_hu"] = [d for d, *_ in nearest]
        table.loc[table["has_image"], "nearest_slice"] = [
            _describe_copy(names[j], mirrored, move, offset) if j >= 0 else ""
            for _, j, mirrored, move, offset in nearest]
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
        gxe.ExpectColumnValuesToBeBetween(column="mask_edge_fit", min_value=v.min_mask_edge_fit, **cond,
                                          meta={"check": "the lung label outline sits on the image's edges "
                                                         "(mask not moved against its image)",
                                                "detail": "mask_best_fit"}),
        gxe.ExpectColumnValuesToBeBetween(column="mask_edge_contrast_hu", min_value=v.min_mask_edge_contrast_hu,
                                          **cond, meta={"check": "the lung label is darker than just outside it "
                                                                 "(mask matches image)"}),
        gxe.ExpectColumnValuesToBeBetween(column="nearest_slice_hu", min_value=v.near_duplicate_hu,
                                          meta={"check": "no near-copies among the slices (train or test), "
                                                         "also offset in HU, mirrored or moved a few pixels",
                                                "detail": "nearest_slice"}),
        *_calibration_expectations(facts, v),
    ]


def _calibration_expectations(facts: pd.DataFrame, v: Validate) -> list:
    """Per file: the median over its slices of the HU of outside air and of aerated lung. A slice's own values vary
    with its export; an offset of a whole file moves the median."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    out = []
    for role, file in (("labelled", RAW_IMAGES), ("test", RAW_TEST_IMAGES)):
        for column, top, anchor in (("outside_air_hu", v.outside_air_hu_max, "outside air is near -1000 HU"),
                                    ("lung_parenchyma_hu", v.lung_parenchyma_hu_max,
                                     "aerated lung is near -850 HU")):
            if column in facts and facts.loc[facts["role"] == role, column].notna().any():
                out.append(gxe.ExpectColumnMedianToBeBetween(
                    column=column, max_value=top, row_condition=Column("role") == role,
                    meta={"check": f"HU calibration of {file}: {anchor} (median over its slices)", "rows_of": role}))
    return out


def run_suite(name: str, table: pd.DataFrame, expectations: list, index_columns: list[str] | None = None) -> dict:
    """Run expectations on a table with an ephemeral GX context; return a JSON-able report."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    # GX fingerprints every batch under this many bytes by hashing all its rows: a marker nothing here reads,
    # and 11 of the 17 s that a 25 M-row submission's contract took
    pandas_execution_engine.HASH_THRESHOLD = 0
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
        check.update({k: v for k, v in (cfg.meta or {}).items() if k in ("detail", "rows_of")})
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
                detail = f"; {row[c['detail']]}" if row.get(c.get("detail")) else ""
                by_file.setdefault(row.get("file", row.get("part", "?")), []).append(
                    f"{row.get('index', '?')} ({column}={_short(row.get(column))}{detail})")
            for file, items in by_file.items():
                more = c.get("unexpected_count", len(items)) - len(items) if len(by_file) == 1 else 0
                lines.append(f"    {file}: slices " + ", ".join(items[:12])
                             + (f" ... and {more + len(items) - 12} more" if len(items) > 12 or more > 0 else ""))
        if "observed" in c:
            lines.append(f"    observed: {_short(c['observed'])}")
        if c.get("sample_values"):
            lines.append(f"    {c.get('unexpected_count')} unexpected values, e.g. {c['sample_values']}")
    return "\n".join(lines)


def _short(value):
    return f"{value:.5g}" if isinstance(value, float) else value


def name_rows(report: dict, facts: pd.DataFrame) -> None:
    """Failed checks of a whole file list its slices (`rows_of`, with their values); failing rows get the
    `detail` column of their slice (the slice a near-copy copies, the move a mask fits best at)."""
    by_key = {(r["file"], r["index"]): r for r in facts.to_dict(orient="records")}
    for c in report["checks"]:
        if c["success"]:
            continue
        column = c["kwargs"].get("column")
        if c.get("rows_of"):
            rows = facts[(facts["role"] == c["rows_of"]) & facts[column].notna()]
            c["failing_rows"] = [{"file": r["file"], "index": r["index"], column: r[column]}
                                 for r in rows.head(50).to_dict(orient="records")]
            c["unexpected_count"] = len(rows)
        if c.get("detail"):
            for row in c.get("failing_rows", []):
                row[c["detail"]] = by_key.get((row.get("file"), row.get("index")), {}).get(c["detail"])


def validate_raw(raw: RawData, v: Validate) -> dict:
    """The raw-data contract; raises ContractError on failure, returns the report."""
    facts = raw_facts(raw, v)
    report = run_suite("raw_data", facts, raw_expectations(facts, raw, v), ["file", "index"])
    name_rows(report, facts)
    report = to_jsonable(report)
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
    # each block of `folds` slices (sorted by burden) gives one to every fold; none held out with fold `all`
    lo, hi = (0, 0) if split["fold"] == "all" else (n_labelled // folds, -(-n_labelled // folds))
    held_out = f"1/{folds}" if hi else "none"
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
                                          meta={"check": f"validation is {held_out} of {n_labelled} slices"}),
        gxe.ExpectColumnValuesToBeBetween(column="n_train", min_value=n_labelled - hi, max_value=n_labelled - lo,
                                          meta={"check": "training holds the other slices"}),
        gxe.ExpectColumnValuesToBeBetween(column="val_with_consolidation", min_value=need if hi else 0,
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
