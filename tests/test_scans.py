"""Hardening of the scan readers (covseg.scans): files whose header claims a huge size are refused before
their data is read, globs and folders walk symlink loops once, covseg's own outputs are never read back as
scans, and quietly wrong or malformed inputs are one clear error naming the file."""
import gzip
import signal
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from test_predict import ThresholdModel, display_volume, write_dicom_series, write_grey_png, write_nifti

from covseg.errors import DataError
from covseg.predict import predict_scans
from covseg.scans import Source, find_sources, read_scan


def refused(path: Path, pp, kind: str, *messages: str) -> str:
    """read_scan refuses `path` with one DataError line naming it and saying each of `messages`."""
    with pytest.raises(DataError) as exc:
        read_scan(Source(path, kind, [path] if kind == "dicom" else []), pp)
    error = str(exc.value)
    assert str(path) in error and "\n" not in error, error
    for message in messages:
        assert message in error, (message, error)
    return error


def raw_nifti(path: Path, shape, dtype=np.int16, affine=None, data: bytes | None = None) -> Path:
    """A single-file NIfTI written byte by byte: its header says `shape`, `dtype`, `affine` (sform), whatever
    follows (`data`, default: the voxels the header claims, all zero) -- a header may claim more than is there."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), 1)
    if affine is not None:
        for key, row in zip(("srow_x", "srow_y", "srow_z"), np.asarray(affine)[:3]):
            header[key] = row
    header["vox_offset"] = 352
    body = header.binaryblock + b"\0" * 4 + (np.zeros(shape, dtype).tobytes() if data is None else data)
    path.write_bytes(gzip.compress(body) if path.name.endswith(".gz") else body)
    return path


def png_bytes(width: int, height: int, mode: int = 0, rows: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit, colour type `mode`) but holds only `rows` rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3, 6: 4}[mode]
    idat = zlib.compress(b"\0" * (rows * (1 + width * channels)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging when the code under test never ends."""
    def timeout(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class NotRead(Exception):
    pass


def forbid(*targets):
    """Replacements that fail the test if the data behind a header is read."""
    def fail(*args, **kwargs):
        raise NotRead(f"the data was read ({targets})")
    return fail


# ------------------------------------------------------------------------------ 1. memory bombs


def test_size_limits_are_params_that_allow_a_long_ct(pp):
    assert pp.max_voxels >= 512 * 512 * 1000  # a 512 x 512 x ~1000 CT volume
    assert pp.max_slice_pixels >= 1024 * 1024
    assert pp.max_voxels < 1024 * 1024 * 512  # the audit's memory bomb


def test_nifti_header_claiming_a_huge_volume_is_refused_unread(tmp_path, pp, monkeypatch):
    bomb = raw_nifti(tmp_path / "bomb.nii.gz", (1024, 1024, 512), data=b"\0" * 4096)
    assert bomb.stat().st_size < 10_000
    for name in ("__array__", "__getitem__", "get_unscaled", "get_scaled", "_get_scaled", "_get_unscaled"):
        if hasattr(nib.arrayproxy.ArrayProxy, name):
            monkeypatch.setattr(nib.arrayproxy.ArrayProxy, name, forbid(name))
    start = time.perf_counter()
    refused(bomb, pp, "nifti", "1024 x 1024 x 512", "predict.max_voxels")
    assert time.perf_counter() - start < 5.0
    # one huge 2D slice: the per-slice limit
    refused(raw_nifti(tmp_path / "wide.nii", (5000, 5000), data=b""), pp, "nifti", "5000 x 5000",
            "predict.max_slice_pixels")
    # a claim within the limits gets as far as reading its voxels (here: forbidden, so an error about them)
    long_ct = raw_nifti(tmp_path / "long.nii.gz", (512, 512, 1000), data=b"\0" * 4096)
    error = refused(long_ct, pp, "nifti", "cannot read its voxels")
    assert "max_voxels" not in error


def test_huge_images_are_refused_before_decoding(tmp_path, pp, monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", forbid("ImageFile.load"))
    # 144 megapixels (PIL only warns), 400 megapixels (PIL's own DecompressionBombError, which says no sides)
    for side, size in ((12000, "12000 x 12000"), (20000, "400000000 pixels")):
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(png_bytes(side, side))
        assert path.stat().st_size < 100_000
        refused(path, pp, "image", size, "predict.max_slice_pixels")
    # a JPEG whose frame header claims 12000 x 12000
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.jpg")
    data = bytearray((tmp_path / "small.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 12000, 12000)
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    refused(tmp_path / "bomb.jpg", pp, "image", "12000 x 12000", "predict.max_slice_pixels")


def test_huge_npy_header_is_refused_unread(tmp_path, pp, monkeypatch):
    path = tmp_path / "bomb.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (512, 1024, 1024)})
        f.write(b"\0" * 4096)
    monkeypatch.setattr(np.lib.format, "read_array", forbid("read_array"))
    refused(path, pp, "npy", "512 x 1024 x 1024", "predict.max_voxels")
    with open(tmp_path / "wide.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (1, 5000, 5000, 1)})
    refused(tmp_path / "wide.npy", pp, "npy", "5000 x 5000", "predict.max_slice_pixels")


def test_huge_dicom_series_is_refused_before_its_pixels_are_read(tmp_path, pp, params, monkeypatch):
    import pydicom

    def wide(k, ds):
        ds.Rows = ds.Columns = 4096  # claimed; the pixel data stays small

    folder = write_dicom_series(tmp_path / "wide", display_volume(n=2), tweak=wide)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(forbid("pixel_array")))
    series = find_sources([folder])[0][0]
    with pytest.raises(DataError, match=r"4096 x 4096.*predict\.max_slice_pixels") as exc:
        read_scan(series, pp)
    assert str(folder) in str(exc.value)
    small = write_dicom_series(tmp_path / "small", display_volume(n=3))  # 3 x 20 x 24 = 1440 voxels
    with pytest.raises(DataError, match=r"3 x 20 x 24.*predict\.max_voxels"):
        read_scan(find_sources([small])[0][0], params.override({"predict.max_voxels": 1000}).predict)


# ------------------------------------------------------------------------------ 2. globs and links


def test_symlink_loops_are_walked_once(tmp_path, pp, win):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    np.save(data / "top.npy", display_volume(n=2, seed=1))
    np.save(data / "a" / "deep.npy", display_volume(n=2, seed=2))
    (data / "a" / "loop").symlink_to("..")  # a/loop -> data
    expected = [(data / "a" / "deep.npy").resolve(), (data / "top.npy").resolve()]
    with time_limit(20):
        for inputs in ([str(data / "**" / "*.npy")], [data], [data, str(data / "**")]):
            sources, failures, _ = find_sources(inputs)
            assert not failures
            assert sorted(s.path.resolve() for s in sources) == expected, inputs
    (data / "a" / "loop2").symlink_to("../a")  # a second loop: every path through both never ends
    (data / "link.npy").symlink_to("top.npy")  # the same file by another name
    with time_limit(20):
        result = predict_scans([str(data / "**" / "*.npy"), data / "top.npy"], tmp_path / "out", ThresholdModel(),
                               pp, win, progress=False)
    assert not result["failed"]
    assert sorted(Path(r["input"]).resolve() for r in result["scans"]) == expected  # each file once


def test_a_symlinked_folder_is_followed(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    np.save(real / "scan.npy", display_volume(n=2))
    data = tmp_path / "data"
    data.mkdir()
    (data / "patient").symlink_to(real)
    sources, failures, _ = find_sources([data])
    assert not failures and [s.path for s in sources] == [data / "patient" / "scan.npy"]


# ------------------------------------------------------------------------------ 3. --out among the inputs


def _scans_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "stack.npy", display_volume(n=2))
    write_nifti(folder / "ct.nii.gz", display_volume(seed=1))
    write_grey_png(folder / "slice.png", np.tile(np.arange(0, 250, 10), (8, 1)))
    write_dicom_series(folder / "series", display_volume(n=3, seed=2))
    return folder


def test_out_equal_to_the_input_folder_reads_no_output_back(tmp_path, pp, win):
    data = _scans_folder(tmp_path / "data")
    runs = [predict_scans([data], data, ThresholdModel(), pp, win, progress=False) for _ in range(2)]
    for result in runs:
        assert not result["failed"] and not result["skipped"], result
        assert sorted(r["scan"] for r in result["scans"]) == ["ct", "series", "slice", "stack"]
        assert not any("_labels" in r["input"] or "overlays" in r["input"] for r in result["scans"])
    assert (data / "stack_labels.npy").is_file() and (data / "overlays").is_dir()
    # the same with globs and with the folder's entries named one by one (a shell's `data/*`)
    for inputs in ([str(data / "*")], sorted(data.iterdir())):
        sources, failures, skipped = find_sources(inputs, exclude=data)
        assert not failures and not skipped
        assert sorted(s.path.name for s in sources) == ["ct.nii.gz", "series", "slice.png", "stack.npy"]
    assert [s.path.name for s in find_sources([str(data / "**" / "*.npy")], exclude=data)[0]] == ["stack.npy"]


def test_out_inside_the_input_folder_and_earlier_runs_are_not_read(tmp_path, pp, win):
    data = _scans_folder(tmp_path / "data")
    first = predict_scans([data], data / "run1", ThresholdModel(), pp, win, progress=False)
    second = predict_scans([data], data / "run2", ThresholdModel(), pp, win, progress=False)  # run1 is in data/
    for result in (first, second):
        assert not result["failed"] and not result["skipped"], result
        assert sorted(r["scan"] for r in result["scans"]) == ["ct", "series", "slice", "stack"]
    (tmp_path / "link_to_out").symlink_to(data / "run2")  # --out reached by another path
    sources, _, _ = find_sources([data], exclude=tmp_path / "link_to_out")
    assert sorted(s.path.name for s in sources) == ["ct.nii.gz", "series", "slice.png", "stack.npy"]


# ------------------------------------------------------------------------------ 4. quietly wrong input


def test_complex_nifti_is_refused(tmp_path, pp):
    data = np.moveaxis(display_volume(), 0, 2).astype(np.complex64) + 1j
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1])), tmp_path / "complex.nii.gz")
    refused(tmp_path / "complex.nii.gz", pp, "nifti", "complex")


def grey(h=30, w=34, seed=0) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 256, size=(h, w)).astype(np.uint8)
    values[0, 0] = 0
    return values


def test_bilevel_transparent_and_animated_images_are_refused(tmp_path, pp):
    Image.fromarray(grey() > 128).convert("1").save(tmp_path / "bilevel.png")
    refused(tmp_path / "bilevel.png", pp, "image", "1-bit")

    alpha = np.full((30, 34), 255, np.uint8)
    alpha[:5] = 0
    Image.fromarray(np.dstack([grey()] * 3 + [alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey(), alpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(grey(), "L").save(tmp_path / "trns.png", transparency=0)  # tRNS: grey 0 transparent
    for name in ("rgba.png", "la.png", "trns.png"):
        refused(tmp_path / name, pp, "image", "transparen")
    opaque = np.dstack([grey()] * 3 + [np.full((30, 34), 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")  # an alpha channel, all opaque: fine
    assert read_scan(Source(tmp_path / "opaque.png", "image"), pp).hu.shape == (1, 30, 34)

    frames = [Image.fromarray(grey(seed=k), "L") for k in range(3)]
    frames[0].save(tmp_path / "animated.png", save_all=True, append_images=frames[1:])
    refused(tmp_path / "animated.png", pp, "image", "3 frames")


def test_exif_orientation_is_applied(tmp_path, pp, win):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(grey(), "L").save(tmp_path / "rotated.png", exif=exif)
    scan = read_scan(Source(tmp_path / "rotated.png", "image"), pp)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.png")))
    assert upright.shape == (34, 30)
    np.testing.assert_allclose(scan.hu[0], pp.png_hu_min + upright / 255 * (pp.png_hu_max - pp.png_hu_min),
                               atol=1e-3)
    Image.fromarray(grey(), "L").save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert read_scan(Source(tmp_path / "rotated.jpg", "image"), pp).hu.shape == (1, 34, 30)
    result = predict_scans([tmp_path / "rotated.png"], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert not result["failed"]
    assert Image.open(tmp_path / "out" / "rotated_labels.png").size == (30, 34)  # labels as the viewer shows it


# ------------------------------------------------------------------------------ 5. one line, not a traceback


def test_degenerate_nifti_affine_is_one_error(tmp_path, pp):
    voxels = np.moveaxis(display_volume(n=2, h=8, w=8), 0, 2).astype(np.int16).tobytes(order="F")
    nan = np.diag([0.7, 0.8, 2.5, 1.0])
    nan[0, 0] = np.nan
    flat = np.diag([0.7, 0.8, 2.5, 1.0])
    flat[:3, 2] = flat[:3, 0]  # two voxel axes along one direction
    for name, affine in (("zero", np.zeros((4, 4))), ("nan", nan), ("flat", flat)):
        path = raw_nifti(tmp_path / f"{name}.nii", (8, 8, 2), affine=affine, data=voxels)
        refused(path, pp, "nifti", "affine")


def test_bad_dicom_geometry_is_named(tmp_path, pp):
    def negative(k, ds):
        ds.PixelSpacing = [-0.7, 0.8]

    def zero_orientation(k, ds):
        ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]

    def parallel(k, ds):
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]

    def nan_position(k, ds):
        ds.ImagePositionPatient = [-50.0, float("nan"), 3.0 * k]

    cases = {"negative": (negative, "PixelSpacing"), "zero": (zero_orientation, "ImageOrientationPatient"),
             "parallel": (parallel, "ImageOrientationPatient"), "nan": (nan_position, "ImagePositionPatient")}
    for name, (tweak, key) in cases.items():
        folder = write_dicom_series(tmp_path / name, display_volume(n=3), tweak=tweak)
        with pytest.raises(DataError) as exc:
            read_scan(find_sources([folder])[0][0], pp)
        error = str(exc.value)
        assert key in error and str(tmp_path / name) in error and "same position" not in error, (name, error)
    with pytest.raises(DataError, match="ImageOrientationPatient is degenerate"):
        read_scan(find_sources([tmp_path / "zero"])[0][0], pp)


def test_zip_named_npy_is_one_error(tmp_path, pp, win):
    np.savez(tmp_path / "archive.npz", images=display_volume(n=2))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    refused(tmp_path / "archive.npy", pp, "npy", "not a .npy array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(tmp_path / "objects.npy", pp, "npy", "dtype object")
    result = predict_scans([tmp_path / "archive.npy"], tmp_path / "out", ThresholdModel(), pp, win, progress=False)
    assert [f["error"].split(":")[0] for f in result["failed"]] == [str(tmp_path / "archive.npy")]
