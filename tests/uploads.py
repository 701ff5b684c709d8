"""Upload files for the reader and serving tests: good volumes in every format, and every bad input we refuse."""

import gzip
import io
import struct
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


# ------------------------------------------------------------------------------------------------ hostile uploads
def zip_of(members: dict, method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _nifti_offset(value: float) -> bytes:
    b = bytearray(nifti_bytes(volume((4, 10, 12)), gz=False))
    b[108:112] = struct.pack("<f", value)  # vox_offset
    return bytes(b)


def _bad_crc() -> bytes:
    b = bytearray(zip_of({"s/0.png": png(np.zeros((8, 8), np.uint8)), "s/1.png": png(np.ones((8, 8), np.uint8))}))
    i = b.index(b"\x89PNG")
    b[i + 20] ^= 0xFF  # the stored data no longer matches its CRC
    return bytes(b)


def _method(method: int) -> bytes:
    b = bytearray(zip_of({"s/0.png": png(np.zeros((8, 8), np.uint8)), "s/1.png": png(np.ones((8, 8), np.uint8))}))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local and central headers: an unsupported compression method
        i = 0
        while (i := b.find(sig, i)) >= 0:
            off = 8 if sig == b"PK\x03\x04" else 10
            b[i + off:i + off + 2] = struct.pack("<H", method)
            i += 4
    return bytes(b)


def hostile_uploads() -> dict:
    """name -> (bytes, words the refusal must contain): parser failures that once reached clients as a 500."""
    p8, p16 = png(np.full((8, 8), 7, np.uint8)), png(np.full((8, 8), 300, np.uint16))
    return {
        "inf_offset": (_nifti_offset(float("inf")), "offset"), "nan_offset": (_nifti_offset(float("nan")), "offset"),
        "bad_crc": (_bad_crc(), "cannot be read"), "method_99": (_method(99), "cannot be read"),
        "corrupt_local_header": (zip_of({"s/0.png": p8, "s/1.png": p8}).replace(b"PK\x03\x04", b"PK\x03\x05", 1), "zip"),
        "long_name": (zip_of({"x" * 300 + ".png": p8, "1.png": p8}), "slice name"),
        "dot_name": (zip_of({".": p8, "1.png": p8}), "not an image slice"),
        "double_minus": (zip_of({"--1.png": p8, "2.png": p8}), "not an integer"),
        "superscript": (zip_of({"\u00b9.png": p8, "2.png": p8}), "not an integer"),
        "complex_npy": (npy_bytes(np.ones((3, 4, 5), np.complex64)), "complex"),
        "duplicate_slices": (zip_of({"a/0.png": p8, "a/1.png": p8, "b/0.png": p8, "b/1.png": p8}), "both slice"),
        "mixed_depth": (zip_of({"0.png": p8, "1.png": p16, "2.png": p8}), "mixes 8-bit and 16-bit"),
    }


def mutated(data: bytes, rng) -> bytes:
    """`data` with a few random byte flips, extreme header words and a possible truncation."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(0, len(b)))
        if rng.random() < 0.5:
            b[i] ^= 1 << int(rng.integers(0, 8))
        else:
            b[i:i + 4] = struct.pack("<i", int(rng.choice([2**31 - 1, -2**31, 0, -1])))
    return bytes(b[: int(rng.integers(len(b) // 2, len(b) + 1))] if rng.random() < 0.3 else b)


def edited(data: bytes, edits) -> bytes:
    """`data` with byte edits applied in order: (kind, position, value) with kind flip, set, cut, word (an extreme
    8-byte integer, as a header field) or float (an extreme 4-byte float); positions wrap around the length."""
    b = bytearray(data)
    for kind, pos, val in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << (val % 8)
        elif kind == "set":
            b[i] = val % 256
        elif kind == "cut":
            del b[i:]
        elif kind == "word":
            b[i:i + 8] = struct.pack("<q", [2**63 - 1, -2**63, 0, -1, 2**31][val % 5])
        elif kind == "float":
            b[i:i + 4] = struct.pack("<f", [float("inf"), float("nan"), -1e38, 1e-45][val % 4])
    return bytes(b)


def _edits():
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "word", "float"]), st.integers(0, 1 << 20),
                              st.integers(0, 255)), min_size=1, max_size=6)


EDITS = _edits()  # hypothesis strategy of `edited`'s edits (the fuzz test and bench/fuzz.py)
