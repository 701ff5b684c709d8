"""The reference training augmentation (M3D's and Med3DVLM's train transforms), split where it is cheapest:

- `augment_params` (Ray Data, numpy): per sample, draw rot90 in H-W (p 0.5, k in 1..3), a flip per axis (p 0.1 each),
  an intensity scale x(1 +- 0.1) (p 0.5) and shift +- 0.1 (p 0.5): six numbers. The volume stays uint8, so the feed
  moves 1 byte per voxel and converts nothing.
- `apply_augment` (the train worker, torch, on its device): uint8 -> float in [0, 1], then the drawn rotation, flips,
  scale and shift, as the reference applies them (rotation and flips commute with the per-voxel affine).
"""

from __future__ import annotations

import numpy as np
import torch

from med3dvlm.data.transform import to_float
from med3dvlm.models.prompt import keyed_rng

N_PARAMS = 6  # rot90 k, flip D, flip H, flip W, scale, shift
IDENTITY = np.array([0, 0, 0, 0, 1, 0], np.float32)


def draw(rng: np.random.Generator) -> np.ndarray:
    p = IDENTITY.copy()
    if rng.random() < 0.5:
        p[0] = rng.integers(1, 4)
    for axis in range(3):
        if rng.random() < 0.1:
            p[1 + axis] = 1
    if rng.random() < 0.5:
        p[4] = 1 + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.5:
        p[5] = rng.uniform(-0.1, 0.1)
    return p


def augment_params(batch: dict, seed: int | None = None) -> dict:
    """Adds an `augment` column (N, 6) to a batch. `seed=None` (training): fresh randomness on every pass, so each
    epoch sees new augmentations; an int makes it a function of the volume id (tests)."""
    ids = batch["volume_id"]
    params = [draw(keyed_rng(str(v), seed) if seed is not None else np.random.default_rng()) for v in ids]
    return {**batch, "augment": np.stack(params) if params else np.zeros((0, N_PARAMS), np.float32)}


def apply_augment(volume: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
    """(N, D, H, W) stored volumes (uint8 or float) -> (N, 1, D, H, W) float32 in [0, 1], augmented by `params`.

    Rotation and flips move the stored bytes (uint8: a quarter of float32's traffic); the conversion to float, the
    /255 and the intensity scale and shift are then one multiply and one add per voxel."""
    x = torch.as_tensor(volume)
    if params is None:
        return to_float(x).unsqueeze(1)
    unit = 1 / 255.0 if x.dtype == torch.uint8 else 1.0
    out = []
    for v, p in zip(x, params.tolist()):
        if p[0]:
            v = torch.rot90(v, int(p[0]), dims=(1, 2))
        dims = [a for a in range(3) if p[1 + a]]
        if dims:
            v = torch.flip(v, dims)
        out.append(torch.mul(v, p[4] * unit).add_(p[5]))
    return torch.stack(out).unsqueeze(1)
