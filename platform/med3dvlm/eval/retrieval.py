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


def distinct_report_ranks(img: torch.Tensor, txt: torch.Tensor, reports: list[str]) -> torch.Tensor:
    """1-based rank of each volume's own report among the distinct report texts (identical texts are one answer, and
    a text tower embeds them identically). M3D-Bench's diagonal rule ranks an identical report at an earlier index
    ahead of the target: where reports repeat (a small or synthetic set), a perfect model scores distinct/n there,
    while chance, a pick among the distinct reports, is 1/distinct. Here a perfect model scores 1."""
    first: dict[str, int] = {}
    for i, r in enumerate(reports):
        first.setdefault(r, i)
    column = {r: j for j, r in enumerate(first)}
    s = img @ txt[list(first.values())].t()
    own = s.gather(1, torch.tensor([[column[r]] for r in reports], device=s.device))
    return (s > own).sum(dim=1) + 1


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
