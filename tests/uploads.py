"""Upload files for the reader and serving tests: good volumes in every format, and every bad input we refuse."""

import gzip
import io
import zipfile

import numpy as np
from PIL import Image


def volume(shape=(12, 40, 48), seed=0) -> np.ndarray:
    """A CT-like volume in HU: air outside, soft tissue inside, a bright blob."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.mgrid[:d, :h, :w]
    body = ((y - h / 2) ** 2 / (h / 2.4) ** 2 + (x - w / 2) ** 2 / (w / 2.4) ** 2) < 1
    vol = np.where(body, 40.0, -1000.0) + rng.normal(0, 5, shape)
    vol[(z - d / 2) ** 2 + (y - h / 2) ** 2 + (x - w / 3) ** 2 < 16] = 300.0
    return vol.astype(np.float32)


def nifti_bytes(vol: np.ndarray, gz: bool = True) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)).to_bytes()
    return gzip.compress(raw) if gz else raw


def npy_bytes(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=True)
    return b.getvalue()


def png_zip(vol: np.ndarray) -> bytes:
    u8 = ((vol - vol.min()) / (np.ptp(vol) + 1e-6) * 255).astype(np.uint8)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, sl in enumerate(u8):
            b = io.BytesIO()
            Image.fromarray(sl).save(b, format="PNG")
            zf.writestr(f"series/{i}.png", b.getvalue())
    return buf.getvalue()


def dicom_zip(tmp_dir, n: int = 6) -> bytes:
    """A DICOM series built with pydicom (`med3dvlm.data.synthetic.dicom_series`), zipped."""
    from pathlib import Path

    from med3dvlm.data.synthetic import dicom_series

    folder = Path(tmp_dir) / "dicom_series"
    dicom_series(folder, n=n)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.writestr(f"series/{f.name}", f.read_bytes())
    return buf.getvalue()


def good_uploads(tmp_dir) -> dict:
    v = volume()
    return {"scan.nii.gz": nifti_bytes(v), "scan.nii": nifti_bytes(v, gz=False), "scan.npy": npy_bytes(v),
            "slices.zip": png_zip(v), "dicom.zip": dicom_zip(tmp_dir)}


def bad_uploads() -> dict:
    """name -> (bytes, a phrase the refusal must contain)."""
    v = volume()
    png = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png, format="PNG")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("0.png", b"\0" * (64 << 20))
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../etc/cron.d/x.png", png.getvalue())
    absurd = io.BytesIO()
    np.lib.format.write_array_header_1_0(absurd, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000, 3)})
    return {
        "random.bin": (np.random.default_rng(0).bytes(4096), "unrecognised content"),
        "truncated.nii.gz": (nifti_bytes(v)[:600], "truncated"),
        "slice.png": (png.getvalue(), "2-D"),
        "flat.npy": (npy_bytes(np.zeros((64, 64), np.float32)), "3-D"),
        "absurd.npy": (absurd.getvalue(), "beyond the limits"),
        "pickle.npy": (npy_bytes(np.array([{"a": 1}], dtype=object)), "pickle"),
        "bomb.zip": (bomb.getvalue(), "zip bomb"),
        "traversal.zip": (evil.getvalue(), "unsafe path"),
    }
