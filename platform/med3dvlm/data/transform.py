"""The one preprocessing function shared by preprocessing, evaluation and serving.

Reference semantics (M3D's `m3d_cap_data_prepare.py`, Med3DVLM's `m3d_cap_data_prepare_128.py`): intensities in [0,1] (slices /255; raw CT windowed
first), min-max over the volume, crop the foreground (> 0, margin 0), trilinear resize (align_corners=False, no
anti-aliasing) to the configured shape.

Speed: min-max is affine and trilinear resizing is linear, so they commute. The foreground test `x_norm > 0` is
`raw > raw.min()`, done on the raw (uint8) volume. Trilinear is separable: depth is interpolated one output plane at
a time from the two source planes it reads (first when it shrinks, last when it grows), height and width one plane
at a time while it is in cache, so the full-size volume is never converted to float; the affine min-max then runs in
place on the small, resized volume (always a fresh array). Equal to the reference order (PyTorch's trilinear) within
float rounding, in numpy alone: a preprocessing worker never imports torch (3.3 s of start-up on this project's
machine).
"""

from __future__ import annotations

import numpy as np

from med3dvlm.io import Volume, VolumeError


def apply_window(arr: np.ndarray, width: float, level: float) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and map to [0, 1]."""
    lo = level - width / 2.0
    return np.clip((arr.astype(np.float32) - lo) / float(width), 0.0, 1.0)


def foreground_bbox(arr: np.ndarray, threshold) -> tuple[slice, slice, slice]:
    """Bounding box of `arr > threshold` in a (D, H, W) volume (MONAI CropForeground with margin 0), from two maximum
    projections (per plane, and over the planes) rather than a full-size mask."""
    depth = arr.reshape(arr.shape[0], -1).max(axis=1) > threshold
    plane = arr.max(axis=0) > threshold
    box = []
    for inside in (depth, plane.any(axis=1), plane.any(axis=0)):
        idx = np.flatnonzero(inside)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis as PyTorch does it (align_corners=False, output size given): the two
    source indices of each output position and the weight of the second."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def _lerp(arr: np.ndarray, axis: int, taps) -> np.ndarray:
    """`arr` linearly interpolated along `axis` at `taps` (from `_taps`), in float32."""
    i0, i1, w = taps
    lo = np.take(arr, i0, axis=axis).astype(np.float32, copy=False)
    hi = np.take(arr, i1, axis=axis).astype(np.float32, copy=False)
    hi -= lo
    hi *= w.reshape([-1 if a == axis else 1 for a in range(arr.ndim)])
    hi += lo
    return hi


def _resize_depth(arr: np.ndarray, n: int) -> np.ndarray:
    """Along the first axis, one output plane at a time (lo + w (hi - lo) while the plane is in cache)."""
    if arr.shape[0] == n:
        return arr.astype(np.float32, copy=False)
    out = np.empty((n,) + arr.shape[1:], np.float32)
    for o, a, b, wj in zip(out, *_taps(arr.shape[0], n)):
        np.subtract(arr[b], arr[a], out=o, dtype=np.float32)
        o *= wj
        o += arr[a]
    return out


def _resize_in_plane(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Each (H, W) plane resized on its own, the axis that shrinks most first: its work stays in cache."""
    out = np.empty((arr.shape[0],) + tuple(hw), np.float32)
    steps = [(a, _taps(arr.shape[1 + a], hw[a])) for a in sorted((0, 1), key=lambda a: hw[a] / arr.shape[1 + a])
             if arr.shape[1 + a] != hw[a]]
    for o, plane in zip(out, arr):
        for axis, taps in steps:
            plane = _lerp(plane, axis, taps)
        o[...] = plane
    return out


def resize_trilinear(arr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) -> `shape`, trilinear (align_corners=False, no anti-aliasing), float32. Depth first when it
    shrinks (the in-plane work then runs on the output's planes only), last when it grows."""
    if shape[0] < arr.shape[0]:
        return _resize_in_plane(_resize_depth(arr, shape[0]), shape[1:])
    return _resize_depth(_resize_in_plane(arr, shape[1:]), shape[0])


def uses_window(vol: Volume, window_mode: str = "auto") -> bool:
    """Whether the HU window applies: never to slice images; to HU volumes under "auto"; always under "always"."""
    if window_mode not in ("auto", "always", "never"):
        raise ValueError(f"window_mode must be auto, always or never, not {window_mode!r}")
    return vol.kind != "slices" and (window_mode == "always" or (window_mode == "auto" and vol.hu))


def to_unit_range(vol: Volume, window: tuple[float, float] = (400.0, 40.0), window_mode: str = "auto") -> np.ndarray:
    """The volume's intensities in [0,1] before min-max: slices stay uint8 (/255 cancels in min-max), CT is windowed."""
    return apply_window(vol.array, *window) if uses_window(vol, window_mode) else vol.array


def preprocess_volume(
    vol: Volume,
    shape: tuple[int, int, int],
    dtype: str = "uint8",
    window: tuple[float, float] = (400.0, 40.0),
    window_mode: str = "auto",
) -> np.ndarray:
    """Volume -> fixed-shape array in [0,1] stored as uint8 (round(x*255)) or float16."""
    arr = to_unit_range(vol, window, window_mode)
    lo, hi = arr.min(), arr.max()
    if not hi > lo:
        raise VolumeError(f"{vol.source}: constant volume (all voxels {float(lo):g}), nothing to normalise")
    cropped = arr[foreground_bbox(arr, lo)]
    if dtype not in ("uint8", "float16"):
        raise ValueError(f"dtype must be uint8 or float16, not {dtype!r}")
    out = resize_trilinear(cropped, shape)  # a fresh float32 array: scaled in place, one float32 volume in all
    if dtype == "float16":
        return _min_max(out, lo, hi, in_place=True).astype(np.float16)
    return np.rint(_min_max(out, lo, hi, 255.0, in_place=True), out=out).astype(np.uint8)


def display_volume(vol: Volume, window: tuple[float, float] = (400.0, 40.0), window_mode: str = "auto",
                   max_side: int = 256) -> np.ndarray:
    """The upload on its own voxel grid for a viewer: the model input's intensity scaling (window, then min-max over
    the whole volume, as uint8) without the crop and the resize; an axis longer than `max_side` keeps every k-th
    voxel (k = ceil(n / max_side)), so a 512x512 slice is shown at 256x256 and the viewer's copy stays small."""
    arr = to_unit_range(vol, window, window_mode)
    lo, hi = arr.min(), arr.max()
    strided = arr[tuple(slice(None, None, -(-n // max_side)) for n in arr.shape)]
    return np.rint(_min_max(strided, lo, max(hi, lo + 1e-12), 255.0)).astype(np.uint8)


def _min_max(arr: np.ndarray, lo, hi, top: float = 1.0, in_place: bool = False) -> np.ndarray:
    """`arr` scaled so that [lo, hi] is [0, top], clipped, float32; `in_place` only on a float32 array the caller
    owns (never on a volume's own array)."""
    out = arr if in_place else arr.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(top) / np.float32(hi - lo)
    return np.clip(out, 0.0, top, out=out)


def to_float(volume) -> torch.Tensor:  # noqa: F821 (torch is imported here, not by preprocessing workers)
    """Stored volume (uint8 or float16, any leading batch dims) -> float32 in [0,1]."""
    import torch

    t = torch.as_tensor(volume)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()
