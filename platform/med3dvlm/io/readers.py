"""Trusted dataset readers (preprocessing). Each returns a `Volume`: a (D, H, W) array and whether its values are HU.

PNG/JPEG slice folders (the M3D layout), NIfTI (nibabel), `.npy` (no pickle) and DICOM series (pydicom).
Every failure raises `VolumeError` naming the file and the reason; callers quarantine it.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VolumeError(Exception):
    """A volume that cannot be read; the message names the file and the reason."""


@dataclass
class Volume:
    array: np.ndarray  # (D, H, W); uint8 (or uint16) for slice images, float32 otherwise
    hu: bool  # values are Hounsfield units (a CT window applies)
    source: str
    kind: str  # "slices", "nifti", "npy", "dicom"


IMAGE_EXTS = (".png", ".jpg", ".jpeg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NIFTI_EXTS = (".nii", ".nii.gz")


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(f"{path}: empty file (0 bytes)")
    if size > max_bytes:
        raise VolumeError(f"{path}: {size} bytes exceeds the limit of {max_bytes}")


SLICE_STEM = re.compile(r"-?[0-9]+")  # ASCII digits only: "--1" or superscript digits are not slice numbers


def slice_index(name: str, where) -> int:
    """The integer a slice file is named by (`12.png` -> 12); anything else is an error naming the file."""
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTS:
        raise VolumeError(f"{where}: not an image slice (expected {', '.join(IMAGE_EXTS)})")
    if not SLICE_STEM.fullmatch(stem):
        raise VolumeError(f"{where}: slice name {name!r} is not an integer")
    return int(stem)


def _plain_grey_png(blob: bytes) -> bool:
    """An 8-bit greyscale, non-interlaced PNG (M3D's slices) of a size Pillow would open too (its decompression-bomb
    limit): the IHDR chunk's width, height, bit depth 8, colour type 0 and interlace 0 (PNG specification, 11.2.2)."""
    from PIL import Image

    if blob[:8] != PNG_MAGIC or blob[12:16] != b"IHDR" or len(blob) < 29:
        return False
    w, h = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    return blob[24] == 8 and blob[25] == 0 and blob[28] == 0 and w * h <= (Image.MAX_IMAGE_PIXELS or 0)


def decode_slice(blob: bytes, where) -> np.ndarray:
    """One slice as greyscale: 8-bit images as uint8 (palette and colour converted as M3D does, to 'L'); 16-bit
    greyscale kept as uint16 (never clipped to 8 bits: min-max normalisation comes later, as for NIfTI). Plain 8-bit
    greyscale PNGs are decoded by libspng (`pyspng`: the same pixels, about 1.4x Pillow's speed here); anything else,
    or a file libspng refuses, by Pillow."""
    from PIL import Image

    if _plain_grey_png(blob):
        import pyspng

        try:
            arr = pyspng.load(blob)
            if arr.ndim == 2 and arr.dtype == np.uint8:
                return arr
        except Exception:  # noqa: BLE001 (Pillow decodes it again below and names the reason)
            pass
    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.mode.startswith("I;16"):
                return np.asarray(im).astype(np.uint16)
            if im.mode == "I":
                arr = np.asarray(im)
                if arr.min() < 0 or arr.max() > 65535:
                    raise VolumeError(f"{where}: 32-bit slice values outside 0..65535")
                return arr.astype(np.uint16)
            if im.mode == "P":
                im = im.convert("RGBA")
            return np.asarray(im.convert("L"))
    except VolumeError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt input (OSError, SyntaxError, ValueError, ...)
        raise VolumeError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def stack_slices(slices: list[tuple[int, str, bytes]], source: str) -> Volume:
    """(index, name, bytes) of one series -> (D,H,W): sorted by index, minority-shape slices dropped (M3D)."""
    if not slices:
        raise VolumeError(f"{source}: series holds no slices")
    seen = Counter(i for i, _, _ in slices)
    dup = sorted(i for i, c in seen.items() if c > 1)
    if dup:
        raise VolumeError(f"{source}: slice number {dup[0]} appears more than once")
    arrays = [decode_slice(blob, name) for _, name, blob in sorted(slices, key=lambda s: s[0])]
    depths = {a.dtype for a in arrays}
    if len(depths) > 1:
        raise VolumeError(f"{source}: series mixes 8-bit and 16-bit slices")
    common = Counter(a.shape for a in arrays).most_common(1)[0][0]
    kept = [a for a in arrays if a.shape == common]
    return Volume(np.stack(kept), hu=False, source=source, kind="slices")


def read_slice_folder(folder: str | Path, max_bytes: int = 2 << 30) -> Volume:
    """M3D semantics: slices sorted by integer stem, greyscale, minority-shape slices dropped, stacked (D,H,W).

    Returns uint8 0..255 (uint16 for 16-bit slices); the reference divides by 255, the transform's min-max makes
    that moot."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: series folder does not exist")
    slices = []
    for name in sorted(os.listdir(folder)):
        p = folder / name
        idx = slice_index(name, p)
        _check_size(p, max_bytes)
        slices.append((idx, str(p), p.read_bytes()))
    return stack_slices(slices, str(folder))


def _finite(arr: np.ndarray, path) -> np.ndarray:
    if arr.size == 0:
        raise VolumeError(f"{path}: empty array")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise VolumeError(f"{path}: contains NaN or infinite values")
    return arr


def _as_3d(arr: np.ndarray, path) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {tuple(arr.shape)}")
    if min(arr.shape) < 1:
        raise VolumeError(f"{path}: empty volume of shape {tuple(arr.shape)}")
    return arr


def nifti_version(data: bytes) -> int | None:
    """1 or 2 by the header's magic (NIfTI-1: bytes 344-348; NIfTI-2: bytes 4-8), None for anything else."""
    if data[344:348] in (b"n+1\0", b"ni1\0"):
        return 1
    if data[4:8] in (b"n+2\0", b"ni2\0"):
        return 2
    return None


def nifti_class(data: bytes):
    import nibabel as nib

    return nib.Nifti1Image if nifti_version(data) == 1 else nib.Nifti2Image


def read_nifti(path: str | Path, max_bytes: int = 2 << 30, data: bytes | None = None) -> Volume:
    """NIfTI via nibabel, reoriented to RAS+ and returned as (D,H,W) = (S->I, A->P, R->L): the layout a typical axial
    DICOM series has (rows run anterior to posterior, columns from the patient's right to left), so one scan reads
    the same from either format."""
    import nibabel as nib

    path = Path(path)
    try:
        if data is None:
            _check_size(path, max_bytes)
            data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nifti_class(data).from_bytes(data)
        img = nib.as_closest_canonical(img)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as e:  # nibabel raises many types on corrupt input
        raise VolumeError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    arr = _as_3d(_finite(arr, path), path)
    # RAS array axes (x grows to the right, y anterior, z superior) -> (D=z from superior, H=y from anterior, W=x
    # from the right)
    vol = np.ascontiguousarray(arr.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    return Volume(vol, hu=bool(vol.min() <= -500), source=str(path), kind="nifti")


def read_npy(path: str | Path, max_bytes: int = 2 << 30, data: bytes | None = None) -> Volume:
    """`.npy` without pickle; (D,H,W) or (1,D,H,W). M3D's npy files are float32 in [0,1]."""
    path = Path(path)
    try:
        if data is None:
            _check_size(path, max_bytes)
            arr = np.load(path, allow_pickle=False)
        else:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
    except VolumeError:
        raise
    except ValueError as e:
        raise VolumeError(f"{path}: refused to load ({e})") from None
    except Exception as e:
        raise VolumeError(f"{path}: cannot read .npy ({type(e).__name__}: {e})") from None
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise VolumeError(f"{path}: complex values ({arr.dtype}); a CT volume is real-valued")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise VolumeError(f"{path}: unsupported dtype {arr.dtype}")
    arr = _as_3d(_finite(arr.astype(np.float32), path), path)
    return Volume(arr, hu=bool(arr.min() <= -500), source=str(path), kind="npy")


def _dicom_datasets(files: list[tuple[str, bytes]]):
    import pydicom

    out = []
    for name, blob in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(blob), force=False)
            _ = ds.pixel_array
        except Exception as e:
            raise VolumeError(f"{name}: cannot read DICOM ({type(e).__name__}: {e})") from None
        out.append((name, ds))
    return out


def _dicom_frames(name: str, ds, order: int) -> list[tuple[float, np.ndarray, str, float]]:
    """(sort key, HU pixels, file, patient z) of each frame of one DICOM object; wrong-typed tags name the file."""
    try:
        px = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        px = _finite(px * np.float32(slope) + np.float32(inter), name)
        if px.ndim == 3:  # multi-frame (enhanced) object: frames are slices
            return [(float(k), px[k], name, 0.0) for k in range(px.shape[0])]
        if px.ndim != 2:
            raise VolumeError(f"{name}: pixel data of {px.ndim} dimensions")
        pos = getattr(ds, "ImagePositionPatient", None)
        ori = getattr(ds, "ImageOrientationPatient", None)
        if pos is not None and ori is not None:
            pos, ori = np.array(pos, float), np.array(ori, float)
            if pos.shape != (3,) or ori.shape != (6,) or not (np.isfinite(pos).all() and np.isfinite(ori).all()):
                raise VolumeError(f"{name}: ImagePositionPatient needs 3 finite values and ImageOrientationPatient 6")
            return [(float(np.dot(np.cross(ori[:3], ori[3:]), pos)), px, name, float(pos[2]))]
        return [(float(getattr(ds, "InstanceNumber", order)), px, name, 0.0)]
    except VolumeError:
        raise
    except Exception as e:  # a tag of the wrong type or arity, pixel data that does not decode
        raise VolumeError(f"{name}: unusable DICOM header or pixels ({type(e).__name__}: {e})") from None


def _check_one_series(dss, path) -> None:
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in dss} - {""})
    if len(uids) > 1:
        raise VolumeError(f"{path}: holds {len(uids)} DICOM series (SeriesInstanceUID {', '.join(uids[:4])}); "
                          f"send one series per volume")


def _check_spacing(frames, path) -> None:
    """Missing slices (a gap larger than 1.5x the typical spacing) are an error, not silently interpolated."""
    if len(frames) < 3:
        return
    gaps = np.diff([f[0] for f in frames])
    typical = float(np.median(gaps))
    if typical <= 0:
        raise VolumeError(f"{path}: duplicate slice positions")
    bad = np.nonzero(gaps > 1.5 * typical)[0]
    if bad.size:
        i = int(bad[0])
        raise VolumeError(f"{path}: missing slices between {Path(frames[i][2]).name} and "
                          f"{Path(frames[i + 1][2]).name} (gap {gaps[i]:.2f} mm vs {typical:.2f} mm spacing)")


def read_dicom_series(path: str | Path, max_bytes: int = 2 << 30, files: list[tuple[str, bytes]] | None = None) -> Volume:
    """A folder (or given files) of one DICOM series, sorted by position along the slice normal, in HU."""
    path = Path(path)
    if files is None:
        if not path.is_dir():
            raise VolumeError(f"{path}: DICOM series folder does not exist")
        files = []
        for name in sorted(os.listdir(path)):
            p = path / name
            if p.is_file():
                _check_size(p, max_bytes)
                files.append((str(p), p.read_bytes()))
    if not files:
        raise VolumeError(f"{path}: no DICOM files")
    dss = _dicom_datasets(files)
    _check_one_series(dss, path)
    frames = sorted((f for k, (name, ds) in enumerate(dss) for f in _dicom_frames(name, ds, k)), key=lambda f: f[0])
    shapes = Counter(f[1].shape for f in frames)
    if len(shapes) > 1:
        raise VolumeError(f"{path}: slices of different shapes {sorted(shapes)}")
    _check_spacing(frames, path)
    vol = np.stack([f[1] for f in frames])
    if frames[-1][3] > frames[0][3]:  # patient z (LPS) grows superior: put the superior slice first
        vol = vol[::-1]
    modality = str(getattr(dss[0][1], "Modality", ""))
    return Volume(np.ascontiguousarray(vol), hu=modality == "CT" or vol.min() <= -500, source=str(path), kind="dicom")


def read_volume(path: str | Path, max_bytes: int = 2 << 30) -> Volume:
    """Dispatch on what `path` is: a slice folder, a DICOM folder, NIfTI, or .npy."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
        if entries and all(e.lower().endswith(".dcm") for e in entries):
            return read_dicom_series(path, max_bytes)
        return read_slice_folder(path, max_bytes)
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    if name.endswith(NIFTI_EXTS):
        return read_nifti(path, max_bytes)
    if name.endswith(".npy"):
        return read_npy(path, max_bytes)
    raise VolumeError(f"{path}: unsupported volume format")
