"""DCFormer: a 3D CNN whose convolutions are decomposed into three 1-D convolutions (Med3DVLM, arXiv 2503.20047; mirthAI/Med3DVLM `dcformer.py`).

Input (B, 1, D, H, W); output: the tokens of every stage s0..s4, each (B, D_s*H_s*W_s, C_s) in (D, H, W) order.
Resolution-agnostic. The layout here is (D, H, W) throughout; the reference permutes to (H, W, D) internally, which
only relabels the three branches (see `models/convert.py` for the weight mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DCFormerConfig:
    num_blocks: tuple[int, ...] = (1, 2, 3, 6, 2)  # s0 (stem) .. s4; the stem is fixed, s0's count is unused
    channels: tuple[int, ...] = (64, 96, 192, 384, 768)
    kernel_sizes: tuple[int, ...] = (13, 11, 9, 7)  # s1..s4 token-mixer kernels
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-6
    stem_act: bool = False  # the reference stem has no nonlinearity (GELU lands in the `norm` slot)


VARIANTS = {
    "nano": DCFormerConfig((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "naive": DCFormerConfig((1, 2, 2, 2, 2), (32, 64, 128, 256, 512)),
    "tiny": DCFormerConfig((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": DCFormerConfig((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": DCFormerConfig((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
    "large": DCFormerConfig((1, 2, 6, 12, 2), (64, 256, 512, 1024, 2048)),
}


class AxisConv3d(nn.Conv3d):
    """A Conv3d whose kernel is 1-D (length k along `axis`; "same" padding). Same parameters as a Conv3d; two CPU
    paths compute the same sums faster:

    - at stride 1, depthwise in either layout, dense along H or W from channels-last: a 2-D convolution on a view
      of the input. oneDNN's 2-D depthwise kernels are several times quicker than its 3-D ones; its dense ones a
      little (the stem's 64->64 convolutions; along D the 2-D backward is slower);
    - one input channel (the stem's first layer): a matmul of each output position's taps, channels-last out, so
      the stem needs no layout copy either way and no oneDNN reorder under bf16 autocast, its weight gradient taken
      the quick way round (each a few percent of a step; the figures are in the git log)."""

    def __init__(self, cin: int, cout: int, k: int, axis: int, stride: int = 1, groups: int = 1):
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = k, k // 2
        super().__init__(cin, cout, tuple(kernel), stride=stride, padding=tuple(pad), groups=groups)
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if self.in_channels == 1 == self.groups:
                return self._as_matmul(x)
            if self.stride == (1, 1, 1):
                depthwise = self.groups == self.in_channels == self.out_channels
                if depthwise and x.is_contiguous():
                    return self._as_2d_plain(x)
                if (depthwise or self.axis != 0) and x.is_contiguous(memory_format=torch.channels_last_3d):
                    return self._as_2d_channels_last(x)
        return super().forward(x)

    def _as_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """One input channel (the stem's first layer): the k taps of every output position, read from the input
        subsampled by the stride, times the (k, C) weight: one matmul whose output is already channels-last."""
        a, k, s = self.axis, self.kernel_size[self.axis], self.stride
        v = x[:, 0, ::s[0] if a != 0 else 1, ::s[1] if a != 1 else 1, ::s[2] if a != 2 else 1]
        pad = [0] * 6
        pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = self.padding[a]
        taps = F.pad(v, pad).unfold(1 + a, k, s[a])  # (N, D', H', W', k)
        rows = taps.reshape(-1, k)
        # the weight as a contiguous (k, C): autograd then takes its gradient as rows^T @ grad, (k, P) x (P, C); for
        # the (C, k) weight of F.linear it takes (C, P) x (P, k), 6x slower on CPU (4.2 against 0.7 ms at 64 x 32768)
        w = self.weight.reshape(self.out_channels, k).t().contiguous()
        y = rows @ w if self.bias is None else torch.addmm(self.bias, rows, w)
        return y.view(*taps.shape[:-1], self.out_channels).permute(0, 4, 1, 2, 3)  # (N, C, D', H', W'), CL

    def _conv2d(self, view: torch.Tensor, weight: torch.Tensor, bias, kernel: tuple[int, int],
                groups: int | None = None) -> torch.Tensor:
        groups = groups or view.shape[1]  # depthwise unless told
        return F.conv2d(view, weight.reshape(weight.shape[0], -1, *kernel), bias,
                        padding=(kernel[0] // 2, kernel[1] // 2), groups=groups)

    def _as_2d_plain(self, x: torch.Tensor) -> torch.Tensor:
        """NCDHW: along D, (D, H*W) planes; along W, (D*H, W) planes (rows never mix); along H, each (channel, depth)
        pair is a plane, the weight repeated per depth."""
        n, c, d, h, w = x.shape
        k = self.kernel_size[self.axis]
        if self.axis == 1:
            bias = self.bias.repeat_interleave(d) if self.bias is not None else None
            y = self._conv2d(x.view(n, c * d, h, w), self.weight.repeat_interleave(d, 0), bias, (k, 1))
        elif self.axis == 0:
            y = self._conv2d(x.view(n, c, d, h * w), self.weight, self.bias, (k, 1))
        else:
            y = self._conv2d(x.view(n, c, d * h, w), self.weight, self.bias, (1, k))
        return y.view(n, c, d, h, w)

    def _as_2d_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """NDHWC in memory: along D, a channels-last (D, H*W) image per sample; along H or W, one (H, W) image per
        sample and depth. Views both ways; the output is channels-last like the input."""
        n, c, d, h, w = x.shape
        k = self.kernel_size[self.axis]
        rows = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), contiguous
        view = rows.reshape(n, d, h * w, c) if self.axis == 0 else rows.reshape(n * d, h, w, c)
        y = self._conv2d(view.permute(0, 3, 1, 2), self.weight, self.bias, (1, k) if self.axis == 2 else (k, 1),
                         self.groups)
        return y.permute(0, 2, 3, 1).reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3)


class DecompConv3d(nn.Module):
    """Three parallel 1-D convolutions along D, H and W, each with its own BatchNorm, summed."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = False):
        super().__init__()
        self.branches = nn.ModuleList()
        for axis in range(3):
            self.branches.append(nn.Sequential(
                AxisConv3d(cin, cout, k, axis, stride=stride, groups=groups),
                nn.BatchNorm3d(cout),
            ))
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y += branch(x)  # in place: BatchNorm's backward keeps its input, not its output (and sum() adds a 0 +)
        return self.act(y)


class _ToChannelsLast(torch.autograd.Function):
    """x -> channels-last 3-D (the stem's first output off the CPU), with its gradient returned plain, in the layout
    of the plain layer before it: given a plain input and a channels-last gradient, torch's CPU BatchNorm takes a
    generic path, several times slower than with both in one layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _GradChannelsLast(torch.autograd.Function):
    """The identity, with its gradient made channels-last (cheap from plain: the fast direction of the copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last_3d)


class MaxPool(nn.MaxPool3d):
    """MaxPool3d whose output gradient is handed back channels-last when its input is: given a channels-last input
    and the plain gradient that the 1x1x1 convolution after it returns, torch's CPU max-pool backward first copies the
    whole input to plain (about three times the pools' time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if x.device.type == "cpu" and y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous():
            return _GradChannelsLast.apply(y)
        return y


class Stem(nn.Sequential):
    def __init__(self, cout: int, act: bool):
        super().__init__(
            DecompConv3d(1, cout, 7, stride=4, act=act),
            *[DecompConv3d(cout, cout, 3, act=act) for _ in range(3)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)  # channels-last on CPU (AxisConv3d), plain elsewhere: see DCFormer.forward
        if not x.is_contiguous(memory_format=torch.channels_last_3d):
            x = _ToChannelsLast.apply(x)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


class ConvBlock(nn.Module):
    """(optional downsample) -> depthwise decomposed token mixer -> channel MLP -> layer scale, with a residual."""

    def __init__(self, cin: int, cout: int, k: int, mlp_ratio: int, ls_init: float, downsample: bool):
        super().__init__()
        self.downsample = nn.Sequential(MaxPool(3, 2, 1), nn.Conv3d(cin, cout, 1, bias=False)) if downsample else None
        self.mixer = DecompConv3d(cout, cout, k, groups=cout)
        self.mlp = nn.Sequential(nn.Linear(cout, mlp_ratio * cout), nn.GELU(), nn.Linear(mlp_ratio * cout, cout))
        self.scale = nn.Parameter(ls_init * torch.ones(cout))  # not `gamma`: HF loading renames that

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        y = self.mixer(x).permute(0, 2, 3, 4, 1)  # channels last for the MLP
        y = self.scale * self.mlp(y)
        return x + y.permute(0, 4, 1, 2, 3)


class DCFormer(nn.Module):
    def __init__(self, config: DCFormerConfig):
        super().__init__()
        c = config
        if not (len(c.num_blocks) == len(c.channels) == 5 and len(c.kernel_sizes) == 4):
            raise ValueError("DCFormer needs 5 block counts, 5 channel widths and 4 kernel sizes")
        self.config = config
        self.stem = Stem(c.channels[0], c.stem_act)
        self.stages = nn.ModuleList()
        for s in range(1, 5):
            self.stages.append(nn.Sequential(*[
                ConvBlock(c.channels[s - 1] if b == 0 else c.channels[s], c.channels[s], c.kernel_sizes[s - 1],
                          c.mlp_ratio, c.layer_scale_init, downsample=b == 0)
                for b in range(c.num_blocks[s])
            ]))
        self.apply(self._init_weights)
        self.to(memory_format=torch.channels_last_3d)  # see `forward`
        self.stem[0].to(memory_format=torch.contiguous_format)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.config.channels)

    @staticmethod
    def grid(input_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """(D, H, W) token grid of each stage s0..s4 for an input of `input_shape` (no forward pass needed)."""
        g = [(n + 2 * 3 - 7) // 4 + 1 for n in input_shape]
        grids = [tuple(g)]
        for _ in range(4):
            g = [(n - 1) // 2 + 1 for n in g]
            grids.append(tuple(g))
        return grids

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Channels-last after the first layer: oneDNN's and cuDNN's fast 3-D convolutions want NDHWC (weights
        # channels-last too, set in __init__; DeepSpeed needs them plain, train/loop.py). The stem's activations are
        # channels-last; a 1x1x1 or depthwise weight is both layouts at once, so from the first downsampling on torch
        # picks a layout by shape (plain at 1x32x256x256, channels-last at the paper's 2x128x256x256; forcing
        # channels-last measured no faster). On CPU, AxisConv3d runs the 1-D convolutions as 2-D ones on a view and
        # the first layer (one input channel) as a matmul with a channels-last output, and the pool hands its
        # gradient back in its input's layout (MaxPool); the speed beside the reference's is in
        # bench/results/vs_reference.json. Off the CPU the first layer is a plain Conv3d whose output is copied to channels-last (torch
        # 2.13's oneDNN corrupts the heap for a channels-last 1->C strided Conv3d at batch > 1, so its weight stays
        # plain).
        x = self.stem(x)
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return [f.permute(0, 2, 3, 4, 1).flatten(1, 3) for f in feats]  # (B, D*H*W, C), (D, H, W) order; a view
        # in either layout (flatten(2) first copied the channels-last stem's tokens)

    def fold_batchnorm(self) -> DCFormer:
        """For inference only: each branch's BatchNorm folded into its convolution (`fuse_conv_bn_eval`), same outputs
        in eval mode within float rounding and one pass less over every activation. Irreversible; the module's
        state dict no longer matches an export's, so fold after loading."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise ValueError("fold_batchnorm is for eval mode (BatchNorm's running statistics are folded in)")
        for m in self.modules():
            if isinstance(m, DecompConv3d):
                for branch in m.branches:
                    if isinstance(branch[1], nn.BatchNorm3d):
                        branch[0] = fuse_conv_bn_eval(branch[0], branch[1])
                        branch[1] = nn.Identity()
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, input_shape: tuple[int, int, int]) -> int:
        """Forward FLOPs (2 x MACs) for one sample, counted analytically per layer."""
        c = self.config
        grids = [int(torch.tensor(g).prod()) for g in self.grid(input_shape)]
        s0 = grids[0]
        flops = 2 * s0 * 3 * (1 * c.channels[0] * 7 + 3 * c.channels[0] * c.channels[0] * 3)
        for s in range(1, 5):
            n, cin, cout, k = grids[s], c.channels[s - 1], c.channels[s], c.kernel_sizes[s - 1]
            flops += 2 * n * cin * cout  # 1x1x1 downsample conv
            flops += c.num_blocks[s] * 2 * n * (3 * cout * k + 2 * c.mlp_ratio * cout * cout)
        return flops


def build_dcformer(variant: str = "small", stem_act: bool = False, layer_scale_init: float = 1e-6) -> DCFormer:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DCFormer variant {variant!r}; choose from {', '.join(VARIANTS)}")
    base = VARIANTS[variant]
    return DCFormer(DCFormerConfig(base.num_blocks, base.channels, base.kernel_sizes,
                                   layer_scale_init=layer_scale_init, stem_act=stem_act))

