"""Volume readers. Each returns a `Volume`: a (D, H, W) array and whether its values are HU.

PNG/JPEG slice folders (the M3D layout), NIfTI (nibabel), `.npy` (no pickle) and DICOM series (pydicom).
Every failure raises `VolumeError` naming the file and the reason; callers quarantine it.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VolumeError(Exception):
    """A volume that cannot be read; the message names the file and the reason."""


@dataclass
class Volume:
    array: np.ndarray  # (D, H, W); uint8 for slice folders (0..255), float32 otherwise
    hu: bool  # values are Hounsfield units (a CT window applies)
    source: str
    kind: str  # "slices", "nifti", "npy", "dicom"


IMAGE_EXTS = (".png", ".jpg", ".jpeg")
NIFTI_EXTS = (".nii", ".nii.gz")


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(f"{path}: empty file (0 bytes)")
    if size > max_bytes:
        raise VolumeError(f"{path}: {size} bytes exceeds the limit of {max_bytes}")


def read_slice_folder(folder: str | Path, max_bytes: int = 2 << 30) -> Volume:
    """M3D semantics: slices sorted by integer stem, greyscale 'L', minority-shape slices dropped, stacked (D,H,W).

    Returns uint8 0..255 (the reference divides by 255; the transform does that on the small volume).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: series folder does not exist")
    entries = sorted(os.listdir(folder))
    slices = []
    for name in entries:
        p = folder / name
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            raise VolumeError(f"{p}: not an image slice (expected {', '.join(IMAGE_EXTS)})")
        if not stem.lstrip("-").isdigit():
            raise VolumeError(f"{p}: slice name is not an integer")
        slices.append((int(stem), p))
    if not slices:
        raise VolumeError(f"{folder}: series folder holds no slices")
    slices.sort()
    arrays = []
    for _, p in slices:
        _check_size(p, max_bytes)
        try:
            with Image.open(p) as im:
                if im.mode == "P":
                    im = im.convert("RGBA")
                arrays.append(np.asarray(im.convert("L")))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise VolumeError(f"{p}: cannot decode image ({e})") from None
    common = Counter(a.shape for a in arrays).most_common(1)[0][0]
    kept = [a for a in arrays if a.shape == common]
    return Volume(np.stack(kept), hu=False, source=str(folder), kind="slices")


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


def read_nifti(path: str | Path, max_bytes: int = 2 << 30, data: bytes | None = None) -> Volume:
    """NIfTI via nibabel, reoriented to RAS+ and returned as (D,H,W) = (S->I, A->P, R->L image rows/cols)."""
    import nibabel as nib

    path = Path(path)
    try:
        if data is None:
            _check_size(path, max_bytes)
            data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_bytes(data) if data[344:348] in (b"n+1\0", b"ni1\0") else nib.Nifti2Image.from_bytes(data)
        img = nib.as_closest_canonical(img)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as e:  # nibabel raises many types on corrupt input
        raise VolumeError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from None
    arr = _as_3d(_finite(arr, path), path)
    # RAS array axes (x: R, y: A, z: S) -> (D=z from superior, H=y from anterior, W=x)
    vol = np.ascontiguousarray(arr.transpose(2, 1, 0)[::-1, ::-1, :])
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
    except ValueError as e:
        raise VolumeError(f"{path}: refused to load ({e})") from None
    except Exception as e:
        raise VolumeError(f"{path}: cannot read .npy ({type(e).__name__}: {e})") from None
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


def read_dicom_series(path: str | Path, max_bytes: int = 2 << 30, files: list[tuple[str, bytes]] | None = None) -> Volume:
    """A folder (or given files) of one DICOM series, sorted by position along the slice normal, in HU.

    Missing slices (a gap larger than 1.5x the typical spacing) are an error, not silently interpolated.
    """
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
    frames = []
    for name, ds in dss:
        px = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        px = px * slope + inter
        if px.ndim == 3:  # multi-frame (enhanced) object: frames are slices
            for k in range(px.shape[0]):
                frames.append((float(k), px[k], name, 0.0))
            continue
        pos = getattr(ds, "ImagePositionPatient", None)
        ori = getattr(ds, "ImageOrientationPatient", None)
        if pos is not None and ori is not None:
            normal = np.cross(np.array(ori[:3], float), np.array(ori[3:], float))
            key = float(np.dot(normal, np.array(pos, float)))
        else:
            key = float(getattr(ds, "InstanceNumber", len(frames)))
        frames.append((key, px, name, float(pos[2]) if pos is not None else 0.0))
    frames.sort(key=lambda f: f[0])
    shapes = Counter(f[1].shape for f in frames)
    if len(shapes) > 1:
        raise VolumeError(f"{path}: slices of different shapes {sorted(shapes)}")
    if len(frames) >= 3:
        gaps = np.diff([f[0] for f in frames])
        typical = float(np.median(gaps))
        if typical <= 0:
            raise VolumeError(f"{path}: duplicate slice positions")
        bad = np.nonzero(gaps > 1.5 * typical)[0]
        if bad.size:
            i = int(bad[0])
            raise VolumeError(
                f"{path}: missing slices between {Path(frames[i][2]).name} and {Path(frames[i + 1][2]).name} "
                f"(gap {gaps[i]:.2f} mm vs {typical:.2f} mm spacing)"
            )
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


def read_upload(filename: str, data: bytes, max_bytes: int = 512 << 20) -> Volume:
    """An uploaded file (serving): NIfTI, .npy, or a zip of DICOM files or PNG/JPEG slices. No pickle, size-limited."""
    if len(data) > max_bytes:
        raise VolumeError(f"{filename}: {len(data)} bytes exceeds the upload limit of {max_bytes}")
    name = filename.lower()
    if name.endswith(NIFTI_EXTS):
        return read_nifti(filename, data=data)
    if name.endswith(".npy"):
        return read_npy(filename, data=data)
    if name.endswith(".zip"):
        import tempfile

        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as e:
            raise VolumeError(f"{filename}: not a zip file ({e})") from None
        members = [m for m in zf.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
        if sum(m.file_size for m in members) > max_bytes:
            raise VolumeError(f"{filename}: unpacked size exceeds the upload limit of {max_bytes}")
        if members and all(m.filename.lower().endswith(".dcm") for m in members):
            return read_dicom_series(filename, files=[(m.filename, zf.read(m)) for m in members])
        with tempfile.TemporaryDirectory() as d:
            for m in members:
                (Path(d) / Path(m.filename).name).write_bytes(zf.read(m))
            vol = read_slice_folder(d)
            vol.source = filename
            return vol
    raise VolumeError(f"{filename}: unsupported upload format (NIfTI, .npy, or a zip of DICOM or PNG/JPEG slices)")
