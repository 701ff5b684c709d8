"""Dual-stream MLP-Mixer projector (Med3DVLM, arXiv 2503.20047, section 2.3).

Low stream: the second-to-last encoder stage; high stream: the last stage. Each is a stack of Mixer layers
(LN, token MLP, LN, channel MLP; no residual, as the reference) ending at `image_tokens / 2` tokens of the LLM width;
the streams are concatenated along tokens, low first. All shapes derive from the encoder, the input size and the LLM.

Schedules (they reproduce the reference's hard-coded sizes at the paper config):
- channels of layer i: llm_width / 2**(depth - 1 - i)       (1792, 3584)
- tokens: growing streams double towards the target        (32 -> 64 -> 128)
          shrinking streams step linearly towards it        (256 -> 192 -> 128)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ProjectorConfig:
    low_tokens: int  # encoder tokens of the second-to-last stage
    low_channels: int
    high_tokens: int  # encoder tokens of the last stage
    high_channels: int
    llm_width: int
    image_tokens: int = 256
    depth: int = 2

    def __post_init__(self):
        if self.image_tokens % 2:
            raise ValueError(f"image_tokens must be even (half per stream), got {self.image_tokens}")
        if self.llm_width % (2 ** (self.depth - 1)):
            raise ValueError(f"llm_width {self.llm_width} must be divisible by 2**(depth-1) = {2 ** (self.depth - 1)}")


def token_schedule(n_in: int, n_out: int, depth: int) -> list[int]:
    if n_out > n_in:
        return [max(n_out // 2 ** (depth - 1 - i), 1) for i in range(depth)]
    return [n_in + (n_out - n_in) * (i + 1) // depth for i in range(depth)]


class MixerLayer(nn.Module):
    def __init__(self, n_in: int, c_in: int, n_out: int, c_out: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(c_in)
        self.token_mlp = nn.Sequential(nn.Linear(n_in, n_out), nn.GELU(), nn.Linear(n_out, n_out))
        self.ln2 = nn.LayerNorm(c_in)
        self.channel_mlp = nn.Sequential(nn.Linear(c_in, c_out), nn.GELU(), nn.Linear(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_in, c_in) -> (B, n_out, c_out)
        x = self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.channel_mlp(self.ln2(x))


class Mixer(nn.Sequential):
    def __init__(self, n_in: int, c_in: int, n_out: int, llm_width: int, depth: int):
        tokens = token_schedule(n_in, n_out, depth)
        chans = [llm_width // 2 ** (depth - 1 - i) for i in range(depth)]
        layers, n, c = [], n_in, c_in
        for t, ch in zip(tokens, chans):
            layers.append(MixerLayer(n, c, t, ch))
            n, c = t, ch
        super().__init__(*layers)


class DualStreamProjector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        c = config
        self.config = config
        half = c.image_tokens // 2
        self.low = Mixer(c.low_tokens, c.low_channels, half, c.llm_width, c.depth)
        self.high = Mixer(c.high_tokens, c.high_channels, half, c.llm_width, c.depth)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.low(low), self.high(high)], dim=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def projector_config_for(encoder, input_shape: tuple[int, int, int], llm_width: int, image_tokens: int, depth: int = 2) -> ProjectorConfig:
    """Derive the projector's input sizes from a DCFormer and the volume shape."""
    grids = encoder.grid(input_shape)
    n = [g[0] * g[1] * g[2] for g in grids]
    ch = encoder.out_channels
    return ProjectorConfig(n[-2], ch[-2], n[-1], ch[-1], llm_width, image_tokens, depth)
