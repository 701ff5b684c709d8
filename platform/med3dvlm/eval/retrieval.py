"""Image-text retrieval recall@k, M3D-Bench style (M3D-Bench's `eval_retrieval`): only the diagonal counts as correct."""

from __future__ import annotations

import torch


def rank_of_target(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of row i's correct item (column i). Ties rank by index, as torch.topk orders them: an equal score
    in an earlier column ranks ahead of the target."""
    diag = scores.diagonal().unsqueeze(1)
    idx = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > diag) | ((scores == diag) & (idx.unsqueeze(0) < idx[: scores.shape[0]].unsqueeze(1)))
    return ahead.sum(dim=1) + 1


def recall_at_k(scores: torch.Tensor, k: int) -> float:
    """Rows are queries; the correct item of row i is column i (M3D-Bench: only the diagonal counts)."""
    return float((rank_of_target(scores) <= k).float().mean())


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """`image_to_text` ranks texts per image (the paper's "IR"), `text_to_image` the reverse ("TR")."""
    s = img @ txt.t()
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = recall_at_k(s, k)
        out[f"text_to_image_R@{k}"] = recall_at_k(s.t(), k)
    out["n"] = s.shape[0]
    return out


def retrieval_at_n(img: torch.Tensor, txt: torch.Tensor, ns=(100, 500, 1000, 2000), ks=(1, 5, 10)) -> dict:
    """`retrieval_metrics` on the first N pairs for each N the data allows (all pairs when fewer than the smallest N)."""
    total = img.shape[0]
    use = [n for n in ns if n <= total] or [total]
    return {str(n): retrieval_metrics(img[:n], txt[:n], ks) for n in use}
