"""Image-text retrieval recall@k, M3D-Bench style (research/m3d.md 4.1): only the diagonal counts as correct."""

from __future__ import annotations

import torch


def recall_at_k(scores: torch.Tensor, k: int) -> float:
    """Rows are queries; the correct item of row i is column i. Ties rank by index (torch.topk order)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    target = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1)
    return float((top == target).any(dim=1).float().mean())


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """`image_to_text` ranks texts per image (the paper's "IR"), `text_to_image` the reverse ("TR")."""
    s = img @ txt.t()
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = recall_at_k(s, k)
        out[f"text_to_image_R@{k}"] = recall_at_k(s.t(), k)
    out["n"] = s.shape[0]
    return out


@torch.no_grad()
def embed_pairs(model, volumes: torch.Tensor, reports: list[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 model features for volumes (N, D, H, W, float in [0,1]) and their reports."""
    model.eval()
    imgs, txts = [], []
    for i in range(0, len(reports), batch_size):
        imgs.append(model.encode_image(volumes[i:i + batch_size].unsqueeze(1).float()))
        txts.append(model.encode_text(**model.tokenize(reports[i:i + batch_size])))
    return torch.cat(imgs), torch.cat(txts)
