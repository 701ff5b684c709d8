"""Readers on real files: the synthetic M3D tree, nibabel's bundled NIfTI files, pydicom's CT slice."""

import io
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import CropForeground, Resize
from PIL import Image

from med3dvlm.data.synthetic import dicom_series
from med3dvlm.data.transform import preprocess_volume
from med3dvlm.io import VolumeError, read_dicom_series, read_nifti, read_npy, read_slice_folder, read_upload, read_volume

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def _png(path, arr):
    Image.fromarray(arr).save(path)


def test_slice_folder_sorts_by_integer_stem_and_drops_minority_shapes(tmp_path):
    for i in range(1, 12):  # 1..11: lexical order would put 10, 11 before 2
        _png(tmp_path / f"{i}.png", np.full((8, 10), i * 10, np.uint8))
    _png(tmp_path / "12.png", np.full((9, 9), 250, np.uint8))  # minority shape: dropped, as the reference
    vol = read_slice_folder(tmp_path)
    assert vol.array.shape == (11, 8, 10) and vol.array.dtype == np.uint8
    assert list(vol.array[:, 0, 0]) == [i * 10 for i in range(1, 12)]


def test_palette_and_rgb_slices_become_grey(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "1.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "2.png")
    vol = read_slice_folder(tmp_path)
    assert np.array_equal(vol.array[0], np.asarray(Image.fromarray(rgb).convert("L")))
    with Image.open(tmp_path / "2.png") as im:
        assert im.mode == "P"
        assert np.array_equal(vol.array[1], np.asarray(im.convert("RGBA").convert("L")))


def test_nibabel_example_reoriented_and_preprocessed():
    vol = read_nifti(NIB_DATA / "anatomical.nii")
    img = nib.as_closest_canonical(nib.load(NIB_DATA / "anatomical.nii"))
    # depth is the superior-inferior axis, superior first; rows anterior first; columns from the patient's right
    # (RAS x grows to the right, so the last x first)
    assert vol.array.shape == tuple(img.shape[i] for i in (2, 1, 0))
    assert np.array_equal(vol.array[0], np.asarray(img.dataobj, np.float32)[:, :, -1].T[::-1, ::-1])
    out = preprocess_volume(vol, (16, 32, 32), window_mode="never")
    assert out.shape == (16, 32, 32) and out.dtype == np.uint8
    x = (vol.array - vol.array.min()) / (vol.array.max() - vol.array.min())
    ref = Resize((16, 32, 32), mode="trilinear")(CropForeground(allow_smaller=True)(x[None]))[0]
    assert np.abs(out / 255.0 - np.asarray(ref)).max() <= 1 / 255


def test_4d_nifti_with_several_frames_is_an_error():
    with pytest.raises(VolumeError, match="example4d.nii.gz: expected a 3-D volume"):
        read_nifti(NIB_DATA / "example4d.nii.gz")


def test_dicom_series_sorted_by_position_in_hu(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    dicom_series(tmp_path / "s", n=5)
    # shuffle file names against positions: order must come from ImagePositionPatient
    names = sorted(os.listdir(tmp_path / "s"))
    for a, b in zip(names, reversed(names)):
        if a < b:
            os.rename(tmp_path / "s" / a, tmp_path / "s" / "tmp")
            os.rename(tmp_path / "s" / b, tmp_path / "s" / a)
            os.rename(tmp_path / "s" / "tmp", tmp_path / "s" / b)
    vol = read_dicom_series(tmp_path / "s")
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu0 = ref.pixel_array.astype(np.float32) * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    assert vol.hu and vol.array.shape == (5, 128, 128)
    # superior (highest z) first: slice k was written with +40*k, so the first slice is k=4
    assert np.allclose(vol.array[0], np.clip(ref.pixel_array.astype(np.int32) + 160, 0, 4000) * float(ref.RescaleSlope) + float(ref.RescaleIntercept))
    assert np.allclose(vol.array[-1], hu0)
    windowed = preprocess_volume(vol, (4, 32, 32))
    assert windowed.dtype == np.uint8 and windowed.max() == 255


def test_dicom_gap_is_reported(tmp_path):
    dicom_series(tmp_path / "g", n=6, skip=2)
    with pytest.raises(VolumeError, match="missing slices between 001.dcm and 003.dcm"):
        read_volume(tmp_path / "g")


def test_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match="evil.npy: refused to load"):
        read_npy(tmp_path / "evil.npy")
    np.save(tmp_path / "ok.npy", np.random.rand(1, 4, 5, 6).astype(np.float32))
    assert read_npy(tmp_path / "ok.npy").array.shape == (4, 5, 6)


def test_uploads_zip_of_slices_and_size_limit(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            b = io.BytesIO()
            Image.fromarray(np.full((4, 4), 50 * i, np.uint8)).save(b, format="PNG")
            zf.writestr(f"series/{i}.png", b.getvalue())
    vol = read_upload("scan.zip", buf.getvalue())
    assert vol.array.shape == (3, 4, 4) and list(vol.array[:, 0, 0]) == [0, 50, 100]
    with pytest.raises(VolumeError, match="exceeds the upload limit"):
        read_upload("scan.zip", buf.getvalue(), max_bytes=10)
    with pytest.raises(VolumeError, match="unrecognised content"):
        read_upload("scan.exe", b"MZ")


def test_uploads_are_sniffed_by_content_in_every_format(tmp_path):
    from uploads import good_uploads, volume

    for name, data in good_uploads(tmp_path).items():
        vol = read_upload("no-extension", data)  # the name plays no part
        assert vol.array.ndim == 3 and min(vol.array.shape) >= 2, name
        if name.startswith("scan"):
            assert vol.array.shape == volume().shape and vol.hu, name


@pytest.mark.parametrize("name", ["random.bin", "truncated.nii.gz", "slice.png", "flat.npy", "absurd.npy",
                                  "pickle.npy", "bomb.zip", "traversal.zip"])
def test_bad_uploads_are_refused_with_the_reason(name):
    from uploads import bad_uploads

    data, reason = bad_uploads()[name]
    with pytest.raises(VolumeError, match=reason):
        read_upload(name, data)


def test_nifti_and_dicom_of_one_scan_read_the_same(tmp_path):
    """One physical scan stored both ways must give one array, not a mirror image. The NIfTI is written from the
    DICOM standard's geometry (PS3.3 C.7.6.2.1.1: voxel (column c, row r) of a slice lies at ImagePositionPatient +
    c * column spacing * the row direction cosines + r * row spacing * the column cosines, in LPS) and NIfTI-1's
    world frame (RAS: x and y negated), never from our reader."""
    import pydicom

    dicom_series(tmp_path / "s", n=4)
    dss = sorted((pydicom.dcmread(p) for p in (tmp_path / "s").iterdir()), key=lambda d: d.InstanceNumber)
    X, Y = np.array(dss[0].ImageOrientationPatient[:3], float), np.array(dss[0].ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in dss[0].PixelSpacing)  # row spacing, column spacing
    p0, p1 = np.array(dss[0].ImagePositionPatient, float), np.array(dss[1].ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = X * dc, Y * dr, p1 - p0, p0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), ras), tmp_path / "scan.nii.gz")  # (c, r, s)
    from_dicom, from_nifti = read_dicom_series(tmp_path / "s").array, read_nifti(tmp_path / "scan.nii.gz").array
    assert from_dicom.shape == from_nifti.shape
    assert np.allclose(from_dicom, from_nifti)


def _png_bytes(arr, mode=None, **save):
    buf = io.BytesIO()
    (Image.fromarray(arr).convert(mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_fast_png_decoder_gives_pillows_pixels_and_pillows_errors():
    """Plain 8-bit greyscale PNGs go to libspng (pyspng), everything else to Pillow: the pixels are Pillow's
    `convert("L")`, exactly, for every kind; a corrupt file is still refused with the reason."""
    from med3dvlm.io.readers import _plain_grey_png, decode_slice

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    smooth = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))  # compresses: filters and long runs
    kinds = {"grey": (_png_bytes(grey), True), "smooth": (_png_bytes(smooth, optimize=True), True),
             "rgb": (_png_bytes(np.stack([grey] * 3, -1)), False), "palette": (_png_bytes(grey, "P"), False),
             "grey+alpha": (_png_bytes(grey, "LA"), False)}
    for name, (blob, plain) in kinds.items():
        assert _plain_grey_png(blob) is plain, name
        with Image.open(io.BytesIO(blob)) as im:
            want = np.asarray(im.convert("RGBA" if im.mode == "P" else im.mode).convert("L"))
        got = decode_slice(blob, name)
        assert got.dtype == np.uint8 and np.array_equal(got, want), name
        if plain:  # libspng itself decodes it (no silent fallback)
            assert np.array_equal(__import__("pyspng").load(blob), want), name
    blob = _png_bytes(grey)
    with pytest.raises(VolumeError, match="truncated.png: cannot decode image"):
        decode_slice(blob[: len(blob) // 2], "truncated.png")
    huge = bytearray(blob)
    huge[16:24] = (1 << 20).to_bytes(4, "big") * 2  # a header claiming 2^40 pixels: left to Pillow's bomb check
    assert not _plain_grey_png(bytes(huge))
    with pytest.raises(VolumeError, match="huge.png"):
        decode_slice(bytes(huge), "huge.png")
