import json

import numpy as np
import pytest

from covseg.data import index_to_one_hot, load_raw, one_hot_to_index, synthesize, write_raw
from covseg.errors import DataError


def test_synth_is_deterministic_and_has_every_class():
    a = synthesize(4, 2, 64, seed=3)
    b = synthesize(4, 2, 64, seed=3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    images, masks, test = a
    assert images.shape == (4, 64, 64, 1) and images.dtype == np.float32
    assert masks.shape == (4, 64, 64, 4) and masks.dtype == np.uint8
    assert test.shape == (2, 64, 64, 1)
    assert (masks.sum(-1) == 1).all()
    assert (masks.reshape(-1, 4).sum(0) > 0).all(), "all four classes present"


def test_synth_intensities_are_ct_like():
    images, masks, _ = synthesize(6, 1, 128, seed=0)
    labels = one_hot_to_index(masks)
    hu = images[..., 0]
    assert -1150 < np.median(hu[labels == 3][hu[labels == 3] < -500]) < -850  # outside air
    assert -900 < hu[labels == 2].mean() < -700                              # lung
    assert -750 < hu[labels == 0].mean() < -250                              # ground glass
    assert -200 < hu[labels == 1].mean() < 100                               # consolidation


def test_write_and_load_roundtrip(tmp_path):
    images, masks, test = synthesize(3, 2, 32, seed=0)
    write_raw(tmp_path / "raw", images, masks, test, [10, 11, 12], [7, 8])
    raw = load_raw(tmp_path / "raw")
    assert np.array_equal(raw.images, images) and np.array_equal(raw.masks, masks)
    assert raw.train_ids == [10, 11, 12] and raw.test_ids == [7, 8]
    assert not list(tmp_path.glob(".*raw*")), "no staging folder left behind"


def test_missing_file_is_named(tiny_raw):
    (tiny_raw / "masks_medseg.npy").unlink()
    with pytest.raises(DataError, match=r"masks_medseg\.npy: file is missing"):
        load_raw(tiny_raw)


def test_wrong_shape_is_named(tiny_raw):
    np.save(tiny_raw / "masks_medseg.npy", np.zeros((12, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match=r"masks_medseg\.npy: expected shape \(N, H, W, 4\).*\(12, 64, 64, 3\)"):
        load_raw(tiny_raw)


def test_unreadable_file_is_named(tiny_raw):
    (tiny_raw / "images_medseg.npy").write_text("not an array")
    with pytest.raises(DataError, match=r"images_medseg\.npy: not a readable \.npy"):
        load_raw(tiny_raw)


def test_slice_ids_must_match_counts(tiny_raw):
    (tiny_raw / "slice_ids.json").write_text(json.dumps({"train": [1, 2], "test": [3]}))
    with pytest.raises(DataError, match="slice_ids.json"):
        load_raw(tiny_raw)


def test_one_hot_roundtrip():
    labels = np.array([[[0, 1], [2, 3]]], dtype=np.uint8)
    assert np.array_equal(one_hot_to_index(index_to_one_hot(labels)), labels)
