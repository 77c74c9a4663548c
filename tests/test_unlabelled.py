"""`covseg data import-unlabelled`: unlabelled slices (8-bit exports of unknown windows, stored turned, cropped to
the lungs, with weak labels) checked and fitted to the labelled slices, or refused with the file named."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covseg import cli
from covseg.data import load_raw, synth_slice
from covseg.errors import DataError
from covseg.names import UNLABELLED_IMAGES, UNLABELLED_SLICES, UNLABELLED_WEAK
from covseg.unlabelled import group_of, import_unlabelled
from covseg.validation import ContractError

ROOT = Path(__file__).resolve().parents[1]


def export(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """An 8-bit export of `hu` with the window lo..hi (grey 0 -> lo, 255 -> hi)."""
    return np.rint((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def write_volume(folder, name: str, seeds, window=(-1350.0, 150.0), crop=True, turn=-1):
    """Slices `<name>_<k>.png` of synthetic 64x64 slices as another site exports them: cropped to the lungs,
    turned by `turn` quarter turns, 8-bit in `window`; their weak labels (255 = infection) in <folder>-weak."""
    weak = folder.with_name(f"{folder.name}-weak")
    folder.mkdir(parents=True, exist_ok=True)
    weak.mkdir(exist_ok=True)
    slices = []
    for k, seed in enumerate(seeds):
        hu, label = synth_slice(np.random.default_rng([7, seed]), 64)
        if crop:
            rows, cols = np.flatnonzero((label < 3).any(1)), np.flatnonzero((label < 3).any(0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            hu, label = hu[box], label[box]
        Image.fromarray(np.rot90(export(hu, *window), turn)).save(folder / f"{name}_{k}.png")
        Image.fromarray(np.rot90((label < 2).astype(np.uint8) * 255, turn)).save(weak / f"{name}_{k}.png")
        slices.append((hu, label))
    return slices


def test_group_of_a_slice_file_is_its_volume():
    assert group_of("Data-1_coronacases_org_001_17.jpg") == "Data-1_coronacases_org_001"
    assert group_of("scan.nii.gz") == "scan"


def test_slices_are_turned_back_fitted_and_keep_their_weak_labels(tmp_path, tiny_raw, params):
    slices = write_volume(tmp_path / "in", "vol", range(3))
    out = tmp_path / "unlabelled"
    result = import_unlabelled([tmp_path / "in" / f"vol_{k}.png" for k in range(3)], out, tiny_raw, params.predict,
                               params.validate_, tmp_path / "in-weak", rotate=1, intensity="hu")
    assert result["slices"] == 3 and result["groups"] == 1
    images, weak = np.load(out / UNLABELLED_IMAGES), np.load(out / UNLABELLED_WEAK)
    assert images.shape == weak.shape == (3, 64, 64) and images.dtype == np.int16 and weak.dtype == np.uint8
    table = pd.read_csv(out / UNLABELLED_SLICES)
    for k, (hu, label) in enumerate(slices):
        h, w = hu.shape
        top, left = (64 - h) // 2, (64 - w) // 2
        inner = np.s_[top:top + h, left:left + w]
        # turned back to the labelled slices' view; the window's 8 bits leave about 3 HU of rounding
        assert np.abs(images[k][inner] - np.clip(hu, -1350, 150)).max() <= 4
        assert ((weak[k][inner] >= 128) == (label < 2)).all()
        assert (images[k][:top] == images[k][top]).all()  # filled by repeating the edge
        assert table.loc[k, "read_height"] == w and table.loc[k, "read_width"] == h  # as stored: turned
    assert set(table["group"]) == {str(tmp_path / "in" / "vol")}


def test_match_maps_volumes_of_unknown_windows_onto_the_same_hu(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "a", "siteA", range(4), window=(-1350.0, 150.0), turn=0)
    write_volume(tmp_path / "b", "siteB", range(4), window=(-1100.0, 500.0), turn=0)
    out = tmp_path / "unlabelled"
    import_unlabelled([tmp_path / "a", tmp_path / "b"], out, tiny_raw, params.predict, params.validate_,
                      intensity="match")
    images = np.load(out / UNLABELLED_IMAGES).astype(float)
    table = pd.read_csv(out / UNLABELLED_SLICES)
    site_a, site_b = table["group"].str.endswith("siteA"), table["group"].str.endswith("siteB")
    assert site_a.sum() == site_b.sum() == 4
    a, b = images[site_a], images[site_b]
    assert np.abs(a - b).mean() < 30  # the same slices: once matched, the windows no longer show
    # read as HU by the PNG window (predict.png_hu_*) instead, site B's lungs would read hundreds of HU off
    import_unlabelled([tmp_path / "a", tmp_path / "b"], out, tiny_raw, params.predict, params.validate_)
    plain = np.load(out / UNLABELLED_IMAGES).astype(float)
    assert np.abs(plain[site_a] - plain[site_b]).mean() > 100


def test_a_copy_of_a_test_slice_is_refused_and_named(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "in", "vol", range(2), turn=0)
    test_slice = load_raw(tiny_raw).test_images[1, ..., 0]
    Image.fromarray(export(np.fliplr(test_slice), -1350, 150)).save(tmp_path / "in" / "leak_0.png")
    Image.fromarray(export(np.roll(test_slice, 2, axis=0), -1350, 150)).save(tmp_path / "in" / "leak_1.png")
    out = tmp_path / "unlabelled"
    import_unlabelled([tmp_path / "in" / "vol_0.png"], out, tiny_raw, params.predict, params.validate_)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ContractError) as err:
        import_unlabelled([tmp_path / "in"], out, tiny_raw, params.predict, params.validate_)
    assert "not a copy of a labelled or test slice" in str(err.value) and "leak_0.png" in str(err.value)
    assert "leak_0.png: slices 0" in str(err.value) and "leak_1.png: slices 1" in str(err.value)
    assert "test_images_medseg.npy 1" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # the earlier import stays as it was


def test_weak_labels_must_exist_and_cover_their_slice(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "in", "vol", range(2), turn=0)
    weak = tmp_path / "in-weak"
    (weak / "vol_1.png").unlink()
    with pytest.raises(DataError, match=r"vol_1.png: no weak label in .*in-weak \(expected vol_1.png"):
        import_unlabelled([tmp_path / "in" / "vol_1.png"], tmp_path / "out", tiny_raw, params.predict,
                          params.validate_, weak)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(weak / "vol_0.png")
    with pytest.raises(DataError, match=r"vol_0.png: 10x10 pixels, but its slice .*in/vol_0.png is"):
        import_unlabelled([tmp_path / "in" / "vol_0.png"], tmp_path / "out", tiny_raw, params.predict,
                          params.validate_, weak)
    shape = np.asarray(Image.open(tmp_path / "in" / "vol_0.png")).shape
    for bad, said in ((np.zeros((*shape, 3), np.uint8), "a RGB image; a weak label is an 8-bit grey image"),
                      (np.ones(shape, np.uint8), "values 0..1; a weak label marks infection with 255")):
        Image.fromarray(bad).save(weak / "vol_0.png")
        with pytest.raises(DataError, match=said):
            import_unlabelled([tmp_path / "in" / "vol_0.png"], tmp_path / "out", tiny_raw, params.predict,
                              params.validate_, weak)
    assert not (tmp_path / "out").exists()


def test_weak_labels_are_not_read_as_scans_and_names_must_be_unique(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "in", "vol", range(2), turn=0)
    (tmp_path / "in-weak").rename(tmp_path / "in" / "weak")  # weak labels kept inside the scans' folder
    result = import_unlabelled([tmp_path / "in"], tmp_path / "out", tiny_raw, params.predict, params.validate_,
                               tmp_path / "in" / "weak")
    assert result["slices"] == 2
    write_volume(tmp_path / "other", "vol", range(1), turn=0)
    with pytest.raises(DataError, match=r"two slices named vol_0; weak labels are matched by name"):
        import_unlabelled([tmp_path / "in", tmp_path / "other"], tmp_path / "out", tiny_raw, params.predict,
                          params.validate_, tmp_path / "in" / "weak")


def test_the_output_folder_may_not_overlap_an_input_nor_replace_other_files(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "in", "vol", range(2), turn=0)
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    for out in (tmp_path / "in", tmp_path / "in" / "sub", tmp_path, tiny_raw):
        with pytest.raises(DataError, match="the output folder overlaps the input"):
            import_unlabelled([tmp_path / "in"], out, tiny_raw, params.predict, params.validate_)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="a folder that is not an earlier unlabelled import"):
        import_unlabelled([tmp_path / "in"], tmp_path / "mine", tiny_raw, params.predict, params.validate_)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_slice_without_air_or_lung_is_refused(tmp_path, tiny_raw, params):
    write_volume(tmp_path / "in", "vol", range(2), turn=0)
    Image.fromarray(np.full((40, 40), 250, np.uint8)).save(tmp_path / "in" / "vol_1.png")
    with pytest.raises(DataError, match=r"vol_1.png: grey levels mapped to HU .* span only"):
        import_unlabelled([tmp_path / "in"], tmp_path / "out", tiny_raw, params.predict, params.validate_)
    soft_tissue = np.full((40, 40), 250, np.uint8)
    soft_tissue[0, :8] = 0  # a few dark pixels: read as a CT, but 99 % of it is brighter than any lung
    Image.fromarray(soft_tissue).save(tmp_path / "in" / "vol_1.png")
    with pytest.raises(ContractError, match=r"a slice shows air or lung[^\n]*\n.*vol_1.png: slices 1"):
        import_unlabelled([tmp_path / "in"], tmp_path / "out", tiny_raw, params.predict, params.validate_)


def test_cli_imports_and_records_with_dvc(tmp_path, tiny_raw, sh, monkeypatch, capsys):
    write_volume(tmp_path / "in", "vol", range(2))
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    sh("git init -q && dvc init -q", project)
    monkeypatch.chdir(project)
    slices = [str(tmp_path / "in" / f"vol_{k}.png") for k in range(2)]
    assert cli.main(["--params", str(ROOT / "params.yaml"), "data", "import-unlabelled", *slices,
              "--weak-labels", str(tmp_path / "in-weak"), "--rotate", "1", "--raw", str(tiny_raw)]) == 0
    said = capsys.readouterr().out
    assert "imported 2 unlabelled slices of 1 volumes -> data/unlabelled" in said and "data/unlabelled.dvc" in said
    assert "md5:" in (project / "data" / "unlabelled.dvc").read_text()
    assert np.load(project / "data" / "unlabelled" / UNLABELLED_IMAGES).shape == (2, 64, 64)
