"""The one preprocessing function shared by preprocessing, evaluation and serving.

Reference semantics (M3D's `m3d_cap_data_prepare.py`, Med3DVLM's `m3d_cap_data_prepare_128.py`): intensities in [0,1] (slices /255; raw CT windowed
first), min-max over the volume, crop the foreground (> 0, margin 0), trilinear resize (align_corners=False, no
anti-aliasing) to the configured shape.

Speed: min-max is affine and trilinear resizing is linear, so they commute. The foreground test `x_norm > 0` is
`raw > raw.min()`, done on the raw (uint8) volume. Only the cropped volume is converted to float and resized; the
affine min-max runs on the small, resized volume. Equal to the reference order within float rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from med3dvlm.io import Volume, VolumeError


def apply_window(arr: np.ndarray, width: float, level: float) -> np.ndarray:
    """Clip HU to [level - width/2, level + width/2] and map to [0, 1]."""
    lo = level - width / 2.0
    return np.clip((arr.astype(np.float32) - lo) / float(width), 0.0, 1.0)


def foreground_bbox(arr: np.ndarray, threshold) -> tuple[slice, ...]:
    """Bounding box of `arr > threshold` (MONAI CropForeground with margin 0), one projection per axis."""
    fg = arr > threshold
    box = []
    for axis in range(arr.ndim):
        other = tuple(a for a in range(arr.ndim) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def resize_trilinear(arr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    if tuple(t.shape[2:]) == tuple(shape):
        return t[0, 0].numpy()
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


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
    out = resize_trilinear(cropped, shape)
    out = (out - np.float32(lo)) / np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    if dtype == "uint8":
        return np.rint(out * 255.0).astype(np.uint8)
    if dtype == "float16":
        return out.astype(np.float16)
    raise ValueError(f"dtype must be uint8 or float16, not {dtype!r}")


def to_float(volume) -> torch.Tensor:
    """Stored volume (uint8 or float16, any leading batch dims) -> float32 in [0,1]."""
    t = torch.as_tensor(volume)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()
