"""Key mapping between released Med3DVLM checkpoints and our modules (a state-dict adapter, torchtitan style).

Released layout (mirthAI/Med3DVLM), one merged HF checkpoint:
- vision tower  `model.vision_tower.vision_tower.encoder.s0..s4.*` (or bare `encoder.s*` in pretrained_ViT.bin); the
  stem is a Sequential inside stage s0's, so its keys are `encoder.s0.0.{0..3}.c{1,2,3}.*`;
  it runs in (H, W, D) layout: branch c1 convolves along H, c2 along W, c3 along D, and conv kernels are (kH, kW, kD).
  Blocks: `proj` (1x1x1 downsample), `dwconv.c{1,2,3}.{0: conv, 1: BN}`, `mlp.mlp.{0,3}`, `gamma` (later `scale`).
- projector     `model.mm_projector.{low,high}_mixer.{i}.{ln1,ln2,mlp1,mlp2}` with `mm_projector.0` / `.1.1` Linears.
- LLM           every other key (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`).

Ours: `vision.stem.{i}` / `vision.stages.{s-1}.{b}` in (D, H, W) layout (branches 0: D, 1: H, 2: W),
`projector.{low,high}.{i}.{ln1,token_mlp,ln2,channel_mlp}`, `llm.*`.
"""

from __future__ import annotations

import re

import torch

# released branch -> our branch: c1 (H) -> 1, c2 (W) -> 2, c3 (D) -> 0
_BRANCH = {"c1": "1", "c2": "2", "c3": "0"}
_BRANCH_INV = {v: k for k, v in _BRANCH.items()}
_MLP = {"mlp1.mm_projector.0": "token_mlp.0", "mlp1.mm_projector.1.1": "token_mlp.2",
        "mlp2.mm_projector.0": "channel_mlp.0", "mlp2.mm_projector.1.1": "channel_mlp.2"}
_MLP_INV = {v: k for k, v in _MLP.items()}


def _hwd_to_dhw(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 1, 4, 2, 3).contiguous() if w.ndim == 5 else w


def _dhw_to_hwd(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 1, 3, 4, 2).contiguous() if w.ndim == 5 else w


def _vision_key(rest: str) -> str | None:
    """`s0.1.c2.0.weight` etc. (after `encoder.`) -> our key below `vision.`."""
    m = re.fullmatch(r"s0\.0\.(\d+)\.(c[123])\.(.+)", rest)  # the stem: a Sequential inside stage s0's
    if m:
        return f"stem.{m[1]}.branches.{_BRANCH[m[2]]}.{m[3]}"
    m = re.fullmatch(r"s([1-4])\.(\d+)\.(.+)", rest)
    if not m:
        return None
    stage, block, tail = int(m[1]) - 1, m[2], m[3]
    if tail == "proj.weight":
        tail = "downsample.1.weight"
    elif tail in ("gamma", "scale"):
        tail = "scale"
    elif (d := re.fullmatch(r"dwconv\.(c[123])\.(.+)", tail)):
        tail = f"mixer.branches.{_BRANCH[d[1]]}.{d[2]}"
    elif (d := re.fullmatch(r"mlp\.mlp\.([03])\.(.+)", tail)):
        tail = f"mlp.{ {'0': '0', '3': '2'}[d[1]] }.{d[2]}"
    else:
        return None
    return f"stages.{stage}.{block}.{tail}"


def from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released Med3DVLM state dict -> our VLM state dict (no LoRA: released LLM weights are merged)."""
    out, unknown = {}, []
    for key, w in state.items():
        if ".encoder.s" in key or key.startswith("encoder.s"):
            ours = _vision_key(key.split("encoder.", 1)[1])
            if ours is None:
                unknown.append(key)
                continue
            out[f"vision.{ours}"] = _hwd_to_dhw(w)
        elif "mm_projector." in key and "_mixer." in key:
            m = re.fullmatch(r"(?:.*\.)?mm_projector\.(low|high)_mixer\.(\d+)\.(.+)\.(weight|bias)", key)
            part = m and (_MLP.get(m[3]) or (m[3] if m[3] in ("ln1", "ln2") else None))
            if not part:
                unknown.append(key)
                continue
            out[f"projector.{m[1]}.{m[2]}.{part}.{m[4]}"] = w
        elif "vision_tower" in key or "mm_projector" in key:
            unknown.append(key)
        else:
            out[f"llm.{key}"] = w
    if unknown:
        raise KeyError(f"{len(unknown)} released keys have no counterpart, e.g. {unknown[:5]}")
    return out


def to_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VLM state dict -> the released layout (for tests and for exporting to the reference code)."""
    out = {}
    for key, w in state.items():
        if key.startswith("vision."):
            k = key[len("vision."):]
            if (m := re.fullmatch(r"stem\.(\d+)\.branches\.(\d)\.(.+)", k)):
                rel = f"s0.0.{m[1]}.{_BRANCH_INV[m[2]]}.{m[3]}"
            else:
                m = re.fullmatch(r"stages\.(\d)\.(\d+)\.(.+)", k)
                stage, block, tail = int(m[1]) + 1, m[2], m[3]
                if tail == "downsample.1.weight":
                    tail = "proj.weight"
                elif (d := re.fullmatch(r"mixer\.branches\.(\d)\.(.+)", tail)):
                    tail = f"dwconv.{_BRANCH_INV[d[1]]}.{d[2]}"
                elif (d := re.fullmatch(r"mlp\.([02])\.(.+)", tail)):
                    tail = f"mlp.mlp.{ {'0': '0', '2': '3'}[d[1]] }.{d[2]}"
                rel = f"s{stage}.{block}.{tail}"
            out[f"model.vision_tower.vision_tower.encoder.{rel}"] = _dhw_to_hwd(w)
        elif key.startswith("projector."):
            m = re.fullmatch(r"projector\.(low|high)\.(\d+)\.(.+)\.(weight|bias)", key)
            part = _MLP_INV.get(m[3], m[3])
            out[f"model.mm_projector.{m[1]}_mixer.{m[2]}.{part}.{m[4]}"] = w
        elif key.startswith("llm."):
            out[key[len("llm."):]] = w
        else:
            raise KeyError(f"unexpected key {key}")
    return out


def load_released(vlm, state: dict[str, torch.Tensor]) -> None:
    """Load a released checkpoint into `vlm` (built with splice='m3d_legacy'); any missing or extra key fails."""
    if vlm.lora:
        raise ValueError("load released (merged) weights before adding LoRA")
    converted = from_released(state)
    expected = set(vlm.state_dict())
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise KeyError(f"released checkpoint does not match the model: missing {missing[:5]} ({len(missing)}), "
                       f"unexpected {extra[:5]} ({len(extra)})")
    vlm.load_state_dict(converted, strict=True)
