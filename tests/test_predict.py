"""`covseg predict` on small scans the tests write: every format, its geometry back, the report by hand,
every bad input, and the exit code."""
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image
from torch import nn

from covseg import cli
from covseg.errors import CovsegError, DataError
from covseg.model import Segmenter, UNet, save_checkpoint
from covseg.names import ENV_REAL_DATA, PATHS, PREDICT_INDEX, PREDICT_REPORT_JSON, PREDICT_REPORT_SCANS, RAW_IMAGES
from covseg.predict import (
    assign_names,
    grade_legend,
    overlay_slices,
    predict_scans,
    scan_summary,
    severity_grade,
    slice_rows,
)
from covseg.preprocessing import window
from covseg.scans import Source, find_sources, read_scan

ROOT = Path(__file__).resolve().parents[1]
HU_VALUES = np.array([-1000, -700, -500, -200, 100, 350])  # even, and off the threshold model's bin edges
EDGES = np.array([0.25, 0.5, 0.75], dtype=np.float32)
BIN_CLASS = np.array([3, 2, 0, 1])  # windowed value bins -> background, other lung, ground glass, consolidation


class ThresholdModel(nn.Module):
    """A pointwise stand-in for the U-Net: each pixel's class from its windowed value, so the expected
    label of every voxel is known and any shuffle of voxels between input and output shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = torch.as_tensor(BIN_CLASS)[torch.bucketize(x[:, 0], torch.as_tensor(EDGES))]
        return F.one_hot(cls, 4).permute(0, 3, 1, 2).float()


def expected_labels(hu, win) -> np.ndarray:
    return BIN_CLASS[np.searchsorted(EDGES, window(hu, win.hu_min, win.hu_max), side="left")].astype(np.uint8)


def display_volume(n=3, h=20, w=24, seed=0) -> np.ndarray:
    """(N, H, W) HU with air in every slice, every value asymmetric in position."""
    vol = np.random.default_rng(seed).choice(HU_VALUES, size=(n, h, w)).astype(np.float32)
    vol[:, 0, 0] = -1000
    return vol


def pls_affine(dr=0.7, dc=0.8, dz=2.5, origin=(10.0, 20.0, -30.0)) -> np.ndarray:
    """The RAS affine of an array (rows, columns, slices) stored as display slices: rows -> posterior,
    columns -> patient left, slices -> superior."""
    return np.array([[0, -dc, 0, origin[0]], [-dr, 0, 0, origin[1]], [0, 0, dz, origin[2]], [0, 0, 0, 1.0]])


def write_nifti(path, display, axcodes=("S", "R", "A"), dtype=np.int16) -> nib.Nifti1Image:
    """`display` (N, H, W) as a NIfTI whose voxel axes are `axcodes` (not the display order)."""
    img = nib.Nifti1Image(np.moveaxis(display, 0, 2).astype(dtype), pls_affine())
    img = img.as_reoriented(ornt_transform(axcodes2ornt(("P", "L", "S")), axcodes2ornt(axcodes)))
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    return nib.load(path)


def write_dicom_series(folder, display, spacing=(0.7, 0.8), z0=-100.0, dz=2.5, order=None, seed=0,
                       tweak=None, prefix="IM") -> Path:
    """`display` (N, H, W) HU as a CT series, stored as (HU + 1024) / 2 with RescaleSlope 2 and
    RescaleIntercept -1024, files written in a shuffled order under shuffled names; `tweak(k, ds)` edits one."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(display)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if order is None else order
    series = generate_uid()
    for file_number, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = CTImageStorage, "CT", series
        ds.InstanceNumber = int(file_number + 1)
        ds.Rows, ds.Columns = display.shape[1:]
        ds.PixelSpacing = list(spacing)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-50.0, -60.0, z0 + dz * int(k)]
        ds.SliceThickness = dz
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = ((display[k] + 1024) / 2).astype("<u2").tobytes()
        if tweak:
            tweak(int(k), ds)
        ds.save_as(folder / f"{prefix}{(file_number * 7919) % 1000:04d}", enforce_file_format=True)
    return folder


def write_grey_png(path, grey: np.ndarray) -> Path:
    Image.fromarray(grey.astype(np.uint8), mode="L").save(path)
    return Path(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), path)
    return path


def cli_main(*args) -> int:
    return cli.main(["--params", str(ROOT / PATHS.params), "predict", *map(str, args), "--quiet"])


# ------------------------------------------------------------------------------ report arithmetic


def test_report_numbers_against_a_hand_computed_case():
    labels = np.full((3, 10, 10), 3, dtype=np.uint8)  # background everywhere
    labels[0].flat[:85] = 2          # slice 0: 100 lung pixels, 10 ground glass, 5 consolidation
    labels[0].flat[85:95] = 0
    labels[0].flat[95:100] = 1
    labels[2].flat[:40] = 0          # slice 2: 40 lung pixels, all ground glass
    rows = slice_rows("s", labels, pixel_area_mm2=0.25)
    assert [r["lung_pixels"] for r in rows] == [100, 0, 40]
    assert rows[0]["lung_area_mm2"] == 25.0
    assert (rows[0]["ggo_percent"], rows[0]["consolidation_percent"], rows[0]["involvement_percent"]) == (10, 5, 15)
    assert rows[1]["ggo_percent"] is None and rows[1]["involvement_percent"] is None  # no lung, no share
    assert rows[2]["involvement_percent"] == 100
    s = scan_summary(labels, (0.5, 0.5, 2.0), [5, 25, 50, 75])
    # 140 lung pixels of 0.25 mm^2 x 2 mm = 70 mm^3 = 0.07 mL; 50 ground glass, 5 consolidation
    assert s["lung_pixels"] == 140 and s["lung_volume_ml"] == pytest.approx(0.07) and s["lung_area_mm2"] is None
    assert s["ggo_percent"] == pytest.approx(100 * 50 / 140)
    assert s["consolidation_percent"] == pytest.approx(100 * 5 / 140)
    assert s["involvement_percent"] == pytest.approx(100 * 55 / 140) and s["severity_grade"] == 2  # 39 %
    one = scan_summary(labels[:1], (0.5, 0.5, float("nan")), [5, 25, 50, 75])
    assert one["lung_area_mm2"] == 25.0 and one["lung_volume_ml"] is None and one["severity_grade"] == 1
    unknown = scan_summary(labels, None, [5, 25, 50, 75])
    assert unknown["lung_area_mm2"] is None and unknown["lung_volume_ml"] is None and unknown["lung_pixels"] == 140
    empty = scan_summary(np.full((1, 4, 4), 3, np.uint8), None, [5, 25, 50, 75])
    assert empty["involvement_percent"] is None and empty["severity_grade"] is None


@pytest.mark.parametrize("involvement,grade", [(0, 0), (4.99, 0), (5, 1), (24.9, 1), (25, 2), (50, 3), (74.9, 3),
                                               (75, 4), (100, 4), (None, None)])
def test_severity_grade_thresholds(involvement, grade):
    assert severity_grade(involvement, [5, 25, 50, 75]) == grade


def test_grade_legend_and_params_checks(params):
    assert grade_legend([5, 25, 50, 75]) == {"0": "< 5 %", "1": "5 to < 25 %", "2": "25 to < 50 %",
                                             "3": "50 to < 75 %", "4": ">= 75 %"}
    from covseg.errors import ParamsError

    for bad in ([5, 5, 50], [25, 5], [0, 10], [10, 101], []):
        with pytest.raises(ParamsError, match="predict.severity_thresholds"):
            params.override({"predict.severity_thresholds": bad})
    with pytest.raises(ParamsError, match="predict.png_hu_max"):
        params.override({"predict.png_hu_max": -2000})
    with pytest.raises(ParamsError, match="predict.batch_size"):
        params.override({"predict.batch_size": 0})


def test_overlays_show_the_slices_with_most_findings():
    labels = np.full((5, 8, 8), 2, dtype=np.uint8)
    labels[1].flat[:3] = 0
    labels[3].flat[:9] = 1
    labels[4].flat[:5] = 0
    assert overlay_slices(labels, 2) == [3, 4]
    assert overlay_slices(labels, 10) == [0, 1, 2, 3, 4]
    assert overlay_slices(labels, 0) == []


# ------------------------------------------------------------------------------ formats and geometry


def test_nifti_labels_keep_the_input_geometry(tmp_path, pp, win):
    display = display_volume()
    img = write_nifti(tmp_path / "ct.nii.gz", display)
    assert nib.aff2axcodes(img.affine) == ("S", "R", "A")  # axial is not the file's 3rd axis
    scan = read_scan(Source(tmp_path / "ct.nii.gz", "nifti"), pp)
    np.testing.assert_array_equal(scan.hu, display)  # reoriented to the display slices the model knows
    assert scan.spacing == pytest.approx((0.7, 0.8, 2.5))

    result = predict_scans([tmp_path / "ct.nii.gz"], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert not result["failed"]
    out = nib.load(tmp_path / "out" / "ct_labels.nii.gz")
    np.testing.assert_array_equal(out.affine, img.affine)
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    for key in ("dim", "pixdim", "qform_code", "sform_code", "xyzt_units", "quatern_b", "quatern_c", "quatern_d"):
        np.testing.assert_array_equal(out.header[key], img.header[key], err_msg=key)
    # every voxel's label is the label of the same voxel of the input: nothing flipped or transposed
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected_labels(img.get_fdata(), win))
    row = result["scans"][0]
    assert row["slices"] == 3 and (row["height"], row["width"]) == (20, 24)
    assert row["lung_volume_ml"] == pytest.approx(row["lung_pixels"] * 0.7 * 0.8 * 2.5 / 1000)
    assert len(row["overlays"]) == pp.overlays and all((tmp_path / "out" / p).is_file() for p in row["overlays"])


def test_2d_and_float_nifti_with_scaling(tmp_path, pp, win):
    display = display_volume(n=1)
    img = nib.Nifti1Image(display[0].T + 0.25, np.diag([1.5, 1.5, 1, 1]))  # a 2D float image ...
    img.set_data_dtype(np.int16)  # ... stored as int16 with scl_slope / scl_inter, which nibabel picks
    nib.save(img, tmp_path / "flat.nii")
    assert nib.load(tmp_path / "flat.nii").header.get_slope_inter() != (1.0, 0.0)
    scan = read_scan(Source(tmp_path / "flat.nii", "nifti"), pp)
    assert scan.hu.shape == (1, 20, 24)
    np.testing.assert_allclose(np.sort(scan.hu.ravel()), np.sort(display.ravel() + 0.25), atol=0.05)
    result = predict_scans([tmp_path / "flat.nii"], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert result["scans"][0]["labels"] == "flat_labels.nii"
    assert nib.load(tmp_path / "out" / "flat_labels.nii").shape == (24, 20)
    assert result["scans"][0]["lung_area_mm2"] == pytest.approx(result["scans"][0]["lung_pixels"] * 2.25)


def test_dicom_series_in_shuffled_order_with_rescale(tmp_path, pp, win):
    display = display_volume(n=5)
    folder = write_dicom_series(tmp_path / "series", display, order=[3, 0, 4, 1, 2])
    sources, failures, _ = find_sources([tmp_path])
    assert not failures and len(sources) == 1 and sources[0].kind == "dicom" and len(sources[0].files) == 5
    scan = read_scan(sources[0], pp)
    np.testing.assert_array_equal(scan.hu, display)  # slices by position, HU = 2 * stored - 1024
    assert scan.spacing == pytest.approx((0.7, 0.8, 2.5))

    result = predict_scans([folder], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert not result["failed"]
    out = nib.load(tmp_path / "out" / "series_labels.nii.gz")
    assert out.shape == (24, 20, 5)  # (columns, rows, slices) of the series
    # voxel (column i, row j, slice k) -> RAS: LPS position of the first slice, with x and y negated
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], [50.0, 60.0, -100.0, 1])
    np.testing.assert_allclose(out.affine @ [1, 2, 3, 1], [50.0 - 0.8, 60.0 - 2 * 0.7, -100.0 + 3 * 2.5, 1])
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.transpose(expected_labels(display, win), (2, 1, 0)))
    rows = pd.read_csv(tmp_path / "out" / "report_slices.csv")
    # the slice table names each slice's own file, inferior to superior
    file_of_slice = [1, 3, 4, 0, 2]  # order=[3, 0, 4, 1, 2]: file 1 holds slice 0, file 3 slice 1, ...
    assert list(rows["source_slice"]) == [f"IM{(f * 7919) % 1000:04d}" for f in file_of_slice]


def test_png_jpg_and_npy(tmp_path, pp, win):
    grey = np.random.default_rng(0).integers(0, 256, size=(30, 34))
    grey[0, 0] = 0
    write_grey_png(tmp_path / "slice.png", grey)
    Image.fromarray(grey.astype(np.uint8), mode="L").save(tmp_path / "photo_of_ct.jpg", quality=95)
    hu = display_volume(n=2)
    np.save(tmp_path / "kaggle.npy", hu[..., None])
    np.save(tmp_path / "plain.npy", hu.astype(np.int16))

    scan = read_scan(Source(tmp_path / "slice.png", "image"), pp)
    np.testing.assert_allclose(scan.hu[0], pp.png_hu_min + grey / 255 * (pp.png_hu_max - pp.png_hu_min), atol=1e-3)

    result = predict_scans([tmp_path], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert not result["failed"] and {r["scan"] for r in result["scans"]} == {"slice", "photo_of_ct", "kaggle", "plain"}
    labels_png = Image.open(tmp_path / "out" / "slice_labels.png")
    assert labels_png.mode == "P" and labels_png.size == (34, 30)  # a palette PNG: pixel values are classes
    np.testing.assert_array_equal(np.asarray(labels_png), expected_labels(scan.hu, win)[0])
    assert (tmp_path / "out" / "photo_of_ct_labels.png").is_file()
    kaggle = np.load(tmp_path / "out" / "kaggle_labels.npy")
    assert kaggle.shape == (2, 20, 24, 1) and kaggle.dtype == np.uint8
    np.testing.assert_array_equal(kaggle[..., 0], expected_labels(hu, win))
    assert np.load(tmp_path / "out" / "plain_labels.npy").shape == (2, 20, 24)
    png_row = next(r for r in result["scans"] if r["scan"] == "slice")
    assert png_row["pixel_spacing_mm"] == "" and png_row["lung_area_mm2"] is None  # no spacing: pixels only


def test_folder_mixing_formats_and_globs(tmp_path, pp, win, tiny_checkpoint):
    data = tmp_path / "data"
    write_dicom_series(data / "patient1" / "ct_series", display_volume(n=3))
    write_nifti(data / "patient1" / "scan.nii.gz", display_volume(seed=1))
    (data / "patient2").mkdir()
    write_nifti(data / "patient2" / "scan.nii.gz", display_volume(seed=2))  # the same name again
    write_grey_png(data / "patient2" / "slice.png", np.tile(np.arange(0, 250, 10), (8, 1)))
    np.save(data / "stack.npy", display_volume(n=2))
    (data / "README.txt").write_text("notes")
    (data / ".DS_Store").write_text("")
    (data / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # a disc's index: skipped, not a failed series

    result = predict_scans([data], tmp_path / "out", tiny_checkpoint, pp, win, progress=False)
    assert not result["failed"] and result["skipped"] == [str(data / "DICOMDIR"), str(data / "README.txt")]
    names = {r["scan"]: r for r in result["scans"]}
    assert set(names) == {"ct_series", "scan", "scan_2", "slice", "stack"}
    assert {r["format"] for r in result["scans"]} == {"dicom", "nifti", "image", "npy"}
    assert names["scan"]["input"] != names["scan_2"]["input"]
    for name, suffix in [("ct_series", ".nii.gz"), ("scan", ".nii.gz"), ("scan_2", ".nii.gz"), ("slice", ".png"),
                         ("stack", ".npy")]:
        assert (tmp_path / "out" / f"{name}_labels{suffix}").is_file()
    slices = pd.read_csv(tmp_path / "out" / "report_slices.csv")
    assert len(slices) == 3 + 3 + 3 + 1 + 2
    scans = pd.read_csv(tmp_path / "out" / PREDICT_REPORT_SCANS)
    assert len(scans) == 5 and set(scans["status"]) == {"ok"}
    report = json.loads((tmp_path / "out" / PREDICT_REPORT_JSON).read_text())
    assert report["summary"] == {"inputs": 5, "ok": 5, "failed": 0, "skipped": 2}
    assert report["severity"]["thresholds_percent"] == [5, 25, 50, 75]

    # a glob pattern (as a shell that did not expand it passes it) finds the same NIfTI files
    sources, failures, _ = find_sources([str(data / "**" / "*.nii.gz")])
    assert not failures and sorted(s.path.parent.name for s in sources) == ["patient1", "patient2"]
    assert find_sources([str(data / "*.nope")])[1][0]["error"].endswith("the pattern matches no file")


def test_names_stay_with_their_inputs_across_runs(tmp_path, pp, win):
    a, b = tmp_path / "a" / "scan.npy", tmp_path / "b" / "scan.npy"
    for path, seed in ((a, 0), (b, 1)):
        path.parent.mkdir()
        np.save(path, display_volume(n=2, seed=seed))
    out = tmp_path / "out"
    predict_scans([a], out, ThresholdModel(), pp, win, progress=False)
    first = (out / "scan_labels.npy").read_bytes()

    # another input of the same name gets a name of its own; a failed run leaves a's output alone
    a.write_bytes(a.read_bytes()[:100])  # truncated
    result = predict_scans([a, b], out, ThresholdModel(), pp, win, progress=False)
    assert [f["input"] for f in result["failed"]] == [str(a)]
    assert (out / "scan_labels.npy").read_bytes() == first
    assert (out / "scan_2_labels.npy").is_file()
    index = json.loads((out / PREDICT_INDEX).read_text())
    assert index == {"scan": str(a.resolve()), "scan_2": str(b.resolve())}
    assert assign_names([Source(b, "npy"), Source(a, "npy")], index) == ["scan_2", "scan"]
    assert not list(out.glob(".partial-*"))


# ------------------------------------------------------------------------------ bad input


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what its error must say)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(folder / "holiday.png")
    np.save(folder / "normalised.npy", np.random.default_rng(0).random((2, 16, 16), dtype=np.float32))
    write_nifti(folder / "truncated.nii.gz", display_volume())
    data = (folder / "truncated.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[:len(data) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.int16), np.eye(4)), folder / "fmri.nii.gz")
    (folder / "scan.mha").write_bytes(b"ObjectType = Image\n")

    def other_spacing(k, ds):
        if k == 1:
            ds.PixelSpacing = [0.9, 0.9]

    write_dicom_series(folder / "mixed_series", display_volume(n=3), tweak=other_spacing)
    write_dicom_series(folder / "truncated_series", display_volume(n=2))
    victim = sorted((folder / "truncated_series").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:400])
    return {
        "rgb photo": (folder / "holiday.png", "a colour image"),
        "0..1 floats": (folder / "normalised.npy", "not a CT in Hounsfield units"),
        "truncated nifti": (folder / "truncated.nii.gz", "truncated or corrupt"),
        "4D nifti": (folder / "fmri.nii.gz", "4D NIfTI"),
        "unknown extension": (folder / "scan.mha", "unknown file type '.mha'"),
        "mixed geometry": (folder / "mixed_series", "mixed geometry: PixelSpacing differs"),
        "truncated dicom": (victim, "truncated or corrupt"),
    }


def test_every_bad_input_is_one_clear_error_and_the_rest_still_run(tmp_path, pp, win):
    bad = bad_inputs(tmp_path / "in")
    good = tmp_path / "good.npy"
    np.save(good, display_volume(n=2))
    inputs = [path if path.parent.name != "truncated_series" else path.parent for path, _ in bad.values()]
    result = predict_scans([*inputs, good], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    errors = {f["input"]: f["error"] for f in result["failed"]}
    assert len(errors) == len(bad)
    for case, (path, message) in bad.items():
        error = next(e for e in errors.values() if str(path) in e)  # names the file
        assert message in error, (case, error)
    assert [r["scan"] for r in result["scans"] if r["status"] == "ok"] == ["good"]
    assert (tmp_path / "out" / "good_labels.npy").is_file()
    report = json.loads((tmp_path / "out" / PREDICT_REPORT_JSON).read_text())
    assert report["summary"]["failed"] == len(bad) and len(report["failed"]) == len(bad)
    scans = pd.read_csv(tmp_path / "out" / PREDICT_REPORT_SCANS)
    assert (scans["status"] == "failed").sum() == len(bad) and scans["error"].notna().sum() == len(bad)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "_labels" in p.name) == ["good_labels.npy"]


def test_more_refusals(tmp_path, pp):
    np.save(tmp_path / "masks.npy", np.zeros((2, 8, 8, 4), np.uint8))
    np.save(tmp_path / "bytes.npy", np.random.default_rng(0).integers(0, 256, (2, 8, 8)).astype(np.uint8))
    nan = display_volume(n=1)
    nan[0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "no_air.npy", display_volume(n=1) + 900)
    Image.fromarray(np.zeros((8, 8), np.uint16) + 300).save(tmp_path / "sixteen.png")
    cases = {"masks.npy": "a one-hot mask file", "bytes.npy": "not a CT", "nan.npy": "NaN",
             "no_air.npy": "no air", "sixteen.png": "expected an 8-bit grey export"}
    for name, message in cases.items():
        kind = "image" if name.endswith(".png") else "npy"
        with pytest.raises(DataError, match=message) as exc:
            read_scan(Source(tmp_path / name, kind), pp)
        assert str(tmp_path / name) in str(exc.value)

    def uneven(k, ds):
        if k == 2:
            ds.ImagePositionPatient = [-50.0, -60.0, -100.0 + 2.5 * 2 + 1.0]

    def mr(k, ds):
        ds.Modality = "MR"

    for name, tweak, message in (("uneven", uneven, "slice gaps are uneven"), ("mr", mr, "Modality is MR")):
        folder = write_dicom_series(tmp_path / name, display_volume(n=4), tweak=tweak)
        with pytest.raises(DataError, match=message):
            read_scan(find_sources([folder])[0][0], pp)
    two = write_dicom_series(tmp_path / "two", display_volume(n=2))
    write_dicom_series(tmp_path / "two", display_volume(n=2), z0=0.0, prefix="XX")  # a second series
    with pytest.raises(DataError, match="2 series"):
        read_scan(find_sources([two])[0][0], pp)


def test_cli_exit_code_and_errors(tmp_path, capsys, tiny_checkpoint):
    np.save(tmp_path / "good.npy", display_volume(n=2))
    np.save(tmp_path / "bad.npy", np.zeros((2, 8, 8), np.float32))
    assert cli_main(tmp_path / "good.npy", "--out", tmp_path / "out", "--model", tiny_checkpoint) == 0
    assert "good: 2 slice(s)" in capsys.readouterr().out
    assert cli_main(tmp_path / "good.npy", tmp_path / "bad.npy", tmp_path / "nope.nii", "--out", tmp_path / "out2",
                    "--model", tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.npy'}: values span only 0..0" in err and f"{tmp_path / 'nope.nii'}: no such" in err
    assert "2 input(s) failed" in err and (tmp_path / "out2" / "good_labels.npy").is_file()
    assert cli_main(tmp_path / "good.npy", "--out", tmp_path / "out3", "--model", tmp_path / "missing.pt") == 1
    assert "cannot be loaded" in capsys.readouterr().err
    with pytest.raises(CovsegError, match="no scans found"):
        predict_scans([tmp_path / "out3"], tmp_path / "out4", tiny_checkpoint, *_predict_params())


def _predict_params():
    from covseg.params import load_params

    p = load_params(ROOT / PATHS.params)
    return p.predict, p.window


# ------------------------------------------------------------------------------ real slices


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(ENV_REAL_DATA), reason=f"{ENV_REAL_DATA} is not set (a Kaggle-layout folder)")
def test_real_slices_as_a_nifti_volume(tmp_path, pp, win, tiny_checkpoint):
    images = np.load(Path(os.environ[ENV_REAL_DATA]) / RAW_IMAGES, mmap_mode="r")
    display = np.asarray(images[:4, ..., 0], dtype=np.float32)
    img = nib.Nifti1Image(np.moveaxis(display, 0, 2).astype(np.int16), pls_affine(0.8, 0.8, 5.0))
    nib.save(img, tmp_path / "real.nii.gz")
    trained = ROOT / PATHS.model
    model = trained if trained.is_file() else tiny_checkpoint
    result = predict_scans([tmp_path / "real.nii.gz"], tmp_path / "out", model, pp, win, progress=False)
    assert not result["failed"], result["failed"]  # real CT passes the plausibility checks
    out = nib.load(tmp_path / "out" / "real_labels.nii.gz")
    assert out.shape == img.shape and np.allclose(out.affine, img.affine)
    row = result["scans"][0]
    print(json.dumps({k: row[k] for k in ("lung_volume_ml", "ggo_percent", "consolidation_percent",
                                          "severity_grade", "seconds")}))
    if model == trained:
        assert row["lung_pixels"] > 0.05 * display.size  # a trained model finds lung in chest slices
    with gzip.open(tmp_path / "out" / "real_labels.nii.gz") as f:
        assert f.read(4)  # a valid gzip stream
