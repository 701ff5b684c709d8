"""Untrusted uploads (serving): the container sniffed by content, sizes and zip members checked before anything is
decompressed or allocated, no pickle. Every refusal is a `VolumeError` naming the upload and the reason."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

from med3dvlm.io.readers import PNG_MAGIC, Volume, VolumeError, nifti_class, nifti_version, read_dicom_series, \
    read_nifti, read_npy, slice_index, stack_slices

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
    if nifti_version(data):
        return "nifti"
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == PNG_MAGIC:
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return "unknown"


def _nifti_upload(data: bytes, name: str) -> Volume:
    try:
        header = nifti_class(data).header_class.from_fileobj(io.BytesIO(data))
        shape = header.get_data_shape()
    except Exception as e:
        raise VolumeError(f"{name}: cannot read NIfTI header ({type(e).__name__}: {e})") from None
    _check_shape(shape, name)
    offset = float(header.get_data_offset())
    if not (np.isfinite(offset) and 0 <= offset <= len(data)):
        raise VolumeError(f"{name}: NIfTI data offset {offset} is outside the file ({len(data)} bytes)")
    need = int(offset) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
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
    files = _read_members(zf, members, name, limit)
    kinds = {sniff(b) for _, b in files}
    if kinds == {"dicom"} or all(n.lower().endswith(".dcm") for n, _ in files):
        return read_dicom_series(name, files=files)
    if kinds <= {"png", "jpeg"}:
        return _zip_slices(files, name)
    raise VolumeError(f"{name}: a zip must hold one DICOM series or PNG/JPEG slices (found {', '.join(sorted(kinds))})")


def _read_members(zf: zipfile.ZipFile, members, name: str, limit: int) -> list[tuple[str, bytes]]:
    """Each member's bytes, never past its declared size; a corrupt member (CRC, method, header) is named."""
    files, total = [], 0
    for m in members:
        try:
            with zf.open(m) as fh:
                blob = fh.read(m.file_size + 1)  # headers can lie: never read past the declared size
        except (zipfile.BadZipFile, NotImplementedError, zlib.error, EOFError, OSError, ValueError, RuntimeError) as e:
            raise VolumeError(f"{name}: zip member {m.filename!r} cannot be read ({type(e).__name__}: {e})") from None
        total += len(blob)
        if len(blob) > m.file_size or total > limit:
            raise VolumeError(f"{name}: zip member {m.filename!r} is larger than declared; refused")
        files.append((m.filename, blob))
    return files


def _zip_slices(files: list[tuple[str, bytes]], name: str) -> Volume:
    """PNG/JPEG slices from memory (member names never touch the disk): one folder's worth, numbered once each."""
    slices, seen = [], {}
    for member, blob in files:
        base = member.replace("\\", "/").rsplit("/", 1)[-1]
        if base in seen:
            raise VolumeError(f"{name}: {member!r} and {seen[base]!r} are both slice {base!r}: one series per zip")
        seen[base] = member
        slices.append((slice_index(base, f"{name}: {member}"), f"{name}: {member}", blob))
    return stack_slices(slices, name)


def read_upload(filename: str, data: bytes, max_bytes: int = 512 << 20, max_unpacked: int = 2 << 30) -> Volume:
    """An uploaded volume (serving): NIfTI (.nii/.nii.gz), .npy, or a zip of one DICOM series or PNG/JPEG slices.

    The format is sniffed from the content (the file name is only used in messages); no pickle; sizes are checked
    before anything is decompressed or allocated: the upload, gzip output, zip members (count, declared and actual
    size, compression ratio, unsafe paths) and the volume shape (MAX_DIM, MAX_VOXELS). A 2-D image is refused.
    """
    name = filename or "upload"
    try:
        return _read_upload(name, data, max_bytes, max_unpacked)
    except VolumeError:
        raise
    except Exception as e:  # whatever else a malformed upload makes a parser raise is still the upload's fault
        raise VolumeError(f"{name}: cannot parse ({type(e).__name__}: {e})") from None


def _read_upload(name: str, data: bytes, max_bytes: int, max_unpacked: int) -> Volume:
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
