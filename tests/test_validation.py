"""The data contracts: good data passes, each kind of corruption fails with the right expectation named."""
import re

import numpy as np
import pandas as pd
import pytest

from covseg.data import load_raw, write_raw
from covseg.errors import DataError
from covseg.names import RAW_IMAGES, RAW_TEST_IMAGES
from covseg.validation import ContractError, summary, validate_raw, validate_submission


def test_good_synthetic_data_passes(tiny_raw, params):
    report = validate_raw(load_raw(tiny_raw), params.validate_)
    assert report["success"] and len(report["checks"]) >= 15
    assert "all" in summary(report)


def _corrupt(tmp_path, arrays, fn):
    images, masks, test = (a.copy() for a in arrays)
    images, masks, test = fn(images, masks, test)
    return write_raw(tmp_path / "bad", images, masks, test)


def _nan(images, masks, test):
    images[4, 10:20, 10:20] = np.nan
    return images, masks, test


def _bytes(images, masks, test):  # exported as 8-bit 0..255 instead of HU
    return np.clip((images + 1000) / 1400 * 255, 0, 255).round(), masks, test


def _unit(images, masks, test):  # exported already scaled to 0..1
    return np.clip((images + 1000) / 1400, 0, 1), masks, test


def _not_one_hot(images, masks, test):
    masks[2, 30:34, 30:34, 0] = 1  # a patch labelled both ground glass and background/lung
    return images, masks, test


def _values_not_binary(images, masks, test):
    return images, masks * 255, test  # 0/255 masks


def _shifted(images, masks, test):  # channel order off by one
    return images, np.roll(masks, 1, axis=-1), test


def _other_version(images, masks, test):  # masks of another export: shifted by a quarter of the width
    return images, np.roll(masks, masks.shape[2] // 4, axis=2), test


def _duplicate(images, masks, test):
    images[5], masks[5] = images[3], masks[3]
    return images, masks, test


def _missing_masks(images, masks, test):
    return images, masks[:-2], test


def _test_geometry(images, masks, test):
    return images, masks, test[:, :32, :32]


def _mask_geometry(images, masks, test):
    return images, masks[:, :32, :32], test


def _lesion_in_air(images, masks, test):
    masks[6, :6, :6] = [1, 0, 0, 0]  # ground glass painted in the outside air corner
    return images, masks, test


def _swapped_findings(images, masks, test):  # ground glass and consolidation channels swapped
    return images, masks[..., [1, 0, 2, 3]], test


def _wiped_labels(images, masks, test):  # a labelled slice whose mask is all background
    masks[4] = [0, 0, 0, 1]
    return images, masks, test


def _no_lung(images, masks, test):  # lung and findings relabelled as background
    masks[4, ..., 3] = 1
    masks[4, ..., :3] = 0
    masks[4, :2, :2] = [0, 0, 1, 0]  # a few stray lung pixels
    return images, masks, test


def _near_copy_in_test(images, masks, test):  # a test slice that is a labelled slice + 0.5 HU
    test[1] = images[2] + 0.5
    return images, masks, test


def _masks_moved(dy, dx):  # masks registered a few pixels off their images
    def fn(images, masks, test):
        return images, np.roll(masks, (dy, dx), axis=(1, 2)), test
    fn.__name__ = f"_masks_moved_{dy}_{dx}"
    return fn


def _masks_flipped(images, masks, test):  # masks upside down relative to their images
    return images, masks[:, ::-1], test


def _masks_of_other_slices(images, masks, test):  # every mask paired with the next slice's image
    return images, np.roll(masks, 1, axis=0), test


def _hu_offset(images, masks, test):  # a calibration offset: every labelled image +100 HU
    return images + 100, masks, test


def _test_hu_offset(images, masks, test):  # the test file alone +100 HU
    return images, masks, test + 100


def _leak(transform):  # test slice 1 is labelled slice 2 under a simple transform
    def fn(images, masks, test):
        test[1] = transform(images[2])
        return images, masks, test
    fn.__name__ = f"_leak_{transform.__name__}"
    return fn


def plus_20_hu(x):
    return x + 20


def mirrored(x):
    return x[:, ::-1]


def shifted_2_px(x):
    return np.roll(x, 2, axis=1)


def shifted_3_px_down_1_left(x):
    return np.roll(x, (3, -1), axis=(0, 1))


def mirrored_shifted_and_offset(x):
    return np.roll(x[:, ::-1], (-2, 1), axis=(0, 1)) - 30


REGISTRATION = ("mask_edge_fit", "mask_edge_contrast_hu")
CALIBRATION = ("outside_air_hu", "lung_parenchyma_hu")


@pytest.mark.parametrize("corruption,column", [
    (_masks_moved(0, 3), REGISTRATION),
    (_masks_moved(3, 0), REGISTRATION),
    (_masks_moved(-2, 2), REGISTRATION),
    (_masks_moved(0, -6), REGISTRATION),
    (_masks_flipped, REGISTRATION),
    (_masks_of_other_slices, REGISTRATION),
    (_hu_offset, CALIBRATION),
    (_test_hu_offset, CALIBRATION),
    (_leak(plus_20_hu), "nearest_slice_hu"),
    (_leak(mirrored), "nearest_slice_hu"),
    (_leak(shifted_2_px), "nearest_slice_hu"),
    (_leak(shifted_3_px_down_1_left), "nearest_slice_hu"),
    (_leak(mirrored_shifted_and_offset), "nearest_slice_hu"),
    (_swapped_findings, "consolidation_minus_ggo_hu"),
    (_wiped_labels, "frac_lung"),
    (_no_lung, "frac_lung"),
    (_near_copy_in_test, "nearest_slice_hu"),
    (_nan, "nonfinite"),
    (_bytes, "hu_min"),
    (_unit, "hu_range"),
    (_not_one_hot, "onehot_bad_pixels"),
    (_values_not_binary, "mask_values_ok"),
    (_shifted, "frac_lesion"),
    (_other_version, ("lung_hu_mean", "lesion_outside_body")),
    (_duplicate, "hash"),
    (_missing_masks, "has_mask"),
    (_test_geometry, "height"),
    (_mask_geometry, "mask_height"),
    (_lesion_in_air, "lesion_outside_body"),
])
def test_corruption_fails_with_the_right_expectation(tmp_path, tiny_arrays, params, corruption, column):
    bad = _corrupt(tmp_path, tiny_arrays, corruption)
    with pytest.raises(ContractError) as info:
        validate_raw(load_raw(bad), params.validate_)
    failed = {c["kwargs"].get("column") for c in info.value.report["checks"] if not c["success"]}
    assert failed & set((column,) if isinstance(column, str) else column), summary(info.value.report)
    message = str(info.value)
    assert str(bad) in message and "FAILED" in message
    assert "_medseg.npy: slices" in message, "names the file and the slice indices"


def test_complex_images_are_refused(tmp_path, tiny_arrays):
    images, masks, test = tiny_arrays
    bad = write_raw(tmp_path / "bad", images.astype(np.complex64), masks, test)
    with pytest.raises(DataError, match=r"images_medseg\.npy: complex values \(complex64\)"):
        load_raw(bad)


def test_summary_names_file_slice_and_value(tmp_path, tiny_arrays, params):
    bad = _corrupt(tmp_path, tiny_arrays, _nan)
    with pytest.raises(ContractError, match=r"images_medseg\.npy: slices 4 \(nonfinite=100\)"):
        validate_raw(load_raw(bad), params.validate_)


def test_thresholds_come_from_params(tiny_raw, params):
    strict = params.override({"validate.max_lesion_fraction": 0.0})
    with pytest.raises(ContractError, match="lesions are not most of the image"):
        validate_raw(load_raw(tiny_raw), strict.validate_)


def test_contract_error_is_a_data_error():
    assert issubclass(ContractError, DataError)


def test_submission_contract():
    good = pd.DataFrame({"Id": np.arange(8), "Predicted": np.array([0, 1] * 4, np.uint8)})
    assert validate_submission(good, 8, "sub.csv")["success"]
    bad = good.assign(Predicted=[0, 1, 2, 0, 0, 0, 0, 0], Id=[0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(ContractError) as info:
        validate_submission(bad, 9, "sub.csv")
    failed = {c["expectation"] for c in info.value.report["checks"] if not c["success"]}
    assert failed == {"expect_table_row_count_to_equal", "expect_column_values_to_be_unique",
                      "expect_column_values_to_be_in_set"}


def _failures(tmp_path, arrays, corruption, params):
    bad = _corrupt(tmp_path, arrays, corruption)
    with pytest.raises(ContractError) as info:
        validate_raw(load_raw(bad), params.validate_)
    checks = {c["kwargs"].get("column"): c for c in info.value.report["checks"] if not c["success"]}
    return checks, str(info.value)


def test_misregistered_masks_fail_on_every_slice_and_name_the_better_fit(tmp_path, tiny_arrays, params):
    checks, message = _failures(tmp_path, tiny_arrays, _masks_moved(0, 3), params)
    rows = checks["mask_edge_fit"]["failing_rows"]
    assert sorted(r["index"] for r in rows) == list(range(len(tiny_arrays[0]))), message
    assert "fits best moved by (0, -3) px" in message, message


def test_calibration_offset_names_the_file_its_slices_and_the_median(tmp_path, tiny_arrays, params):
    checks, message = _failures(tmp_path, tiny_arrays, _hu_offset, params)
    air = [c for c in checks.values() if c["kwargs"].get("column") == "outside_air_hu"]
    assert air and all(RAW_TEST_IMAGES not in c["check"] for c in air), "the test file is well calibrated"
    assert -920 < air[0]["observed"] < -880, air[0]
    assert f"{RAW_IMAGES}: slices 0 (outside_air_hu=" in message, message
    assert re.search(r"observed: -(899|900)", message), message


@pytest.mark.parametrize("transform,what", [(plus_20_hu, "+20 HU"), (mirrored, "mirrored"),
                                            (shifted_2_px, "moved by (0, 2) px"),
                                            (mirrored_shifted_and_offset, "mirrored, moved by (-2, 1) px, -30 HU")])
def test_leak_names_both_slices_and_the_transform(tmp_path, tiny_arrays, params, transform, what):
    checks, message = _failures(tmp_path, tiny_arrays, _leak(transform), params)
    rows = {(r["file"], r["index"]): r for r in checks["nearest_slice_hu"]["failing_rows"]}
    assert set(rows) == {(RAW_TEST_IMAGES, 1), (RAW_IMAGES, 2)}, message
    assert rows[RAW_TEST_IMAGES, 1]["nearest_slice_hu"] < 1, rows
    assert f"{RAW_TEST_IMAGES}: slices 1 (nearest_slice_hu=" in message, message
    assert f"{RAW_IMAGES} 2, {what}" in message, message
    assert f"{RAW_IMAGES}: slices 2 (" in message and f"{RAW_TEST_IMAGES} 1" in message, message


@pytest.mark.parametrize("key,value,check", [
    ("validate.min_mask_edge_fit", 1.01, "label outline sits on the image's edges"),
    ("validate.min_mask_edge_contrast_hu", 5000, "lung label is darker than just outside it"),
    ("validate.outside_air_hu_max", -1100, "HU calibration"),
    ("validate.lung_parenchyma_hu_max", -1000, "HU calibration"),
    ("validate.near_duplicate_hu", 1e6, "no near-copies"),
])
def test_new_thresholds_come_from_params(tiny_raw, params, key, value, check):
    with pytest.raises(ContractError, match=check):
        validate_raw(load_raw(tiny_raw), params.override({key: value}).validate_)
