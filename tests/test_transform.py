"""The preprocessing transform against a plain NumPy/PIL/MONAI implementation of the reference steps."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.transforms import CropForeground, Resize

from med3dvlm.data.synthetic import sample_case, render_volume
from med3dvlm.data.transform import preprocess_volume, resize_trilinear
from med3dvlm.io import Volume, VolumeError, read_slice_folder


def reference(stack_u8: np.ndarray, shape) -> np.ndarray:
    """M3D's steps in M3D's order: /255, min-max, CropForeground (>0, margin 0), Resize trilinear."""
    x = stack_u8.astype(np.float32) / 255.0
    x = (x - x.min()) / (x.max() - x.min())
    x = CropForeground(allow_smaller=True)(x[None])
    x = Resize(shape, mode="trilinear")(x)
    return np.asarray(x[0], dtype=np.float32)


@pytest.mark.parametrize("shape", [(32, 64, 64), (8, 40, 24)])
def test_matches_reference_within_one_grey_level(tmp_path, shape):
    from PIL import Image

    case = sample_case(3, seed=5)
    vol = render_volume(case, "arterial", (36, 50, 70), seed=5)
    u8 = np.rint(vol * 255).astype(np.uint8)
    u8[u8 > 0] = np.maximum(u8[u8 > 0], 20)  # a non-zero minimum inside the body exercises min-max
    for i, sl in enumerate(u8):
        Image.fromarray(sl).save(tmp_path / f"{i}.png")
    ours = preprocess_volume(read_slice_folder(tmp_path), shape)
    ref = reference(u8, shape)
    assert ours.shape == shape
    assert np.abs(ours.astype(np.float32) / 255 - ref).max() <= 1 / 255
    half = preprocess_volume(read_slice_folder(tmp_path), shape, dtype="float16")
    assert np.abs(half.astype(np.float32) - ref).max() <= 1e-3


def test_crop_removes_the_black_border():
    arr = np.zeros((10, 20, 20), np.uint8)
    arr[2:8, 5:15, 4:10] = 100
    arr[4, 8, 6] = 200
    out = preprocess_volume(Volume(arr, False, "x", "slices"), (6, 10, 6))
    # after cropping, no all-zero border remains: every face has a non-zero voxel
    assert out[0].max() > 0 and out[-1].max() > 0 and out[:, 0].max() > 0 and out[:, :, -1].max() > 0


def test_hu_window_then_normalised():
    hu = np.full((4, 8, 8), -1000.0, np.float32)
    hu[1:3, 2:6, 2:6] = 40.0
    hu[2, 3, 3] = 1000.0
    out = preprocess_volume(Volume(hu, True, "ct", "nifti"), (2, 4, 4), window=(400, 40))
    # W400/L40: -1000 -> 0 (cropped away), 40 -> 0.5, 1000 -> 1
    assert out.shape == (2, 4, 4) and out.max() == 255
    assert set(np.unique(out[out < 255]).tolist()) == {128}


def test_constant_volume_is_an_error_naming_the_source():
    with pytest.raises(VolumeError, match="flat.npy: constant volume"):
        preprocess_volume(Volume(np.ones((3, 4, 4), np.float32), False, "flat.npy", "npy"), (2, 2, 2))


@settings(max_examples=40, deadline=None)
@given(src=st.tuples(*[st.integers(1, 40)] * 3), dst=st.tuples(*[st.integers(1, 40)] * 3),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32]))
def test_separable_resize_is_pytorch_trilinear(src, dst, dtype):
    """The numpy resize against PyTorch's own trilinear interpolation (the reference's MONAI Resize calls it)."""
    import torch
    import torch.nn.functional as F

    a = np.random.default_rng(sum(src + dst)).integers(0, 256, src).astype(dtype)
    theirs = F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=dst, mode="trilinear",
                           align_corners=False)[0, 0].numpy()
    ours = resize_trilinear(a, dst)
    assert ours.dtype == np.float32 and ours.shape == dst
    # float32 rounding: a source coordinate up to 40 is exact to ~4e-6, times a step of up to 255 between
    # neighbours, on each of three axes (1e-3 was exceeded by 1.07e-3 at a size hypothesis found, 2026-11-29)
    assert np.abs(ours - theirs).max() <= 4e-3


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_the_input_volume_is_never_altered(dtype):
    """The min-max runs in place on the resized array; at the target shape with nothing to crop that must still be
    a copy, never the caller's array (a float32 .npy upload is used as it is)."""
    arr = np.random.default_rng(0).random((4, 8, 8), dtype=np.float32) + 1.0
    before = arr.copy()
    out = preprocess_volume(Volume(arr, False, "x.npy", "npy"), (4, 8, 8), dtype=dtype, window_mode="never")
    assert np.array_equal(arr, before)
    assert out.min() == 0 and float(out.max()) == {"uint8": 255.0, "float16": 1.0}[dtype]
