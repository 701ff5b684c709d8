"""Volume readers. Each returns a `Volume`: a (D, H, W) array and whether its values are HU.

PNG/JPEG slice folders (the M3D layout), NIfTI (nibabel), `.npy` (no pickle) and DICOM series (pydicom).
Every failure raises `VolumeError` naming the file and the reason; callers quarantine it.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
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


MAX_DIM = 4096  # voxels along any axis of an upload
MAX_VOXELS = 1 << 28  # 268 M voxels (1 GiB as float32): e.g. 1024 slices of 512x512
MAX_MEMBERS = 4096  # files in an uploaded zip
MAX_RATIO = 200  # compression ratio above which a large zip member is treated as a bomb


def _check_shape(shape, name) -> None:
    shape = tuple(int(x) for x in shape)
    if any(d > MAX_DIM for d in shape) or int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise VolumeError(f"{name}: volume of shape {shape} is beyond the limits ({MAX_DIM} per axis, {MAX_VOXELS} voxels)")


def _gunzip(data: bytes, limit: int, name) -> bytes:
    """Decompress at most `limit` bytes: a gzip bomb stops at the limit instead of filling memory."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise VolumeError(f"{name}: corrupt gzip data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise VolumeError(f"{name}: decompresses to more than the limit of {limit} bytes")
    if not d.eof:
        raise VolumeError(f"{name}: truncated gzip data")
    return out


def sniff(data: bytes) -> str:
    """The container by content, not by file name: gzip, nifti, npy, zip, dicom, png, jpeg or unknown."""
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return "zip"
    if data[344:348] in (b"n+1\0", b"ni1\0") or data[4:8] in (b"n+2\0", b"ni2\0"):
        return "nifti"
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return "unknown"


def _nifti_upload(data: bytes, name: str) -> Volume:
    import nibabel as nib

    try:
        klass = nib.Nifti1Image if data[344:348] in (b"n+1\0", b"ni1\0") else nib.Nifti2Image
        header = klass.header_class.from_fileobj(io.BytesIO(data))
        shape = header.get_data_shape()
    except Exception as e:
        raise VolumeError(f"{name}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    _check_shape(shape, name)
    need = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if len(data) < need:
        raise VolumeError(f"{name}: truncated NIfTI ({len(data)} bytes, the header needs {need})")
    return read_nifti(name, data=data)


def _npy_upload(data: bytes, name: str) -> Volume:
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:
        raise VolumeError(f"{name}: cannot read .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise VolumeError(f"{name}: .npy holds Python objects (pickle); refused")
    _check_shape(shape, name)
    return read_npy(name, data=data)


def _safe_member(m: zipfile.ZipInfo, name: str) -> None:
    p = m.filename.replace("\\", "/")
    if p.startswith("/") or ".." in p.split("/") or (len(p) > 1 and p[1] == ":"):
        raise VolumeError(f"{name}: zip member {m.filename!r} has an unsafe path; refused")
    if m.flag_bits & 0x1:
        raise VolumeError(f"{name}: zip member {m.filename!r} is encrypted")


def _zip_upload(data: bytes, name: str, limit: int) -> Volume:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise VolumeError(f"{name}: not a readable zip file ({e})") from None
    for m in infos:
        _safe_member(m, name)
    members = [m for m in infos if not m.is_dir() and not Path(m.filename).name.startswith(".")
               and "__MACOSX" not in m.filename]
    if not members:
        raise VolumeError(f"{name}: the zip holds no files")
    if len(members) > MAX_MEMBERS:
        raise VolumeError(f"{name}: {len(members)} files in the zip (limit {MAX_MEMBERS})")
    if sum(m.file_size for m in members) > limit:
        raise VolumeError(f"{name}: unpacks to more than the limit of {limit} bytes")
    for m in members:
        if m.file_size > (1 << 20) and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            raise VolumeError(f"{name}: zip member {m.filename!r} compresses {m.file_size // max(m.compress_size, 1)}:1 "
                              "(a zip bomb?); refused")
    files, total = [], 0
    for m in members:
        with zf.open(m) as fh:
            blob = fh.read(m.file_size + 1)  # headers can lie: never read past the declared size
        total += len(blob)
        if len(blob) > m.file_size or total > limit:
            raise VolumeError(f"{name}: zip member {m.filename!r} is larger than declared; refused")
        files.append((m.filename, blob))
    kinds = {sniff(b) for _, b in files}
    if kinds == {"dicom"} or all(n.lower().endswith(".dcm") for n, _ in files):
        return read_dicom_series(name, files=files)
    if kinds <= {"png", "jpeg"}:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for n, b in files:
                (Path(d) / Path(n).name).write_bytes(b)
            vol = read_slice_folder(d)
        vol.source = name
        return vol
    raise VolumeError(f"{name}: a zip must hold one DICOM series or PNG/JPEG slices (found {', '.join(sorted(kinds))})")


def read_upload(filename: str, data: bytes, max_bytes: int = 512 << 20, max_unpacked: int = 2 << 30) -> Volume:
    """An uploaded volume (serving): NIfTI (.nii/.nii.gz), .npy, or a zip of one DICOM series or PNG/JPEG slices.

    The format is sniffed from the content (the file name is only used in messages); no pickle; sizes are checked
    before anything is decompressed or allocated: the upload, gzip output, zip members (count, declared and actual
    size, compression ratio, unsafe paths) and the volume shape (MAX_DIM, MAX_VOXELS). A 2-D image is refused.
    """
    name = filename or "upload"
    if len(data) > max_bytes:
        raise VolumeError(f"{name}: {len(data)} bytes exceeds the upload limit of {max_bytes}")
    if not data:
        raise VolumeError(f"{name}: empty upload")
    kind = sniff(data)
    if kind == "gzip":
        data = _gunzip(data, max_unpacked, name)
        kind = sniff(data)
        if kind not in ("nifti", "npy"):
            raise VolumeError(f"{name}: gzip content is not NIfTI")
    if kind == "nifti":
        vol = _nifti_upload(data, name)
    elif kind == "npy":
        vol = _npy_upload(data, name)
    elif kind == "zip":
        vol = _zip_upload(data, name, max_unpacked)
    elif kind in ("png", "jpeg", "dicom"):
        raise VolumeError(f"{name}: a single 2-D {kind.upper()} image, not a volume (upload a zip of its slices)")
    else:
        raise VolumeError(f"{name}: unrecognised content (expected NIfTI, .npy, or a zip of DICOM or PNG/JPEG slices)")
    if min(vol.array.shape) < 2:
        raise VolumeError(f"{name}: shape {tuple(vol.array.shape)} is a 2-D image, not a volume")
    _check_shape(vol.array.shape, name)
    return vol
