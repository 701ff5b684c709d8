"""DCFormer forward+backward throughput on this CPU at the `m3d` shape (1x32x256x256), beside M3D-LaMed's 3D ViT.

Baseline: MONAI's ViT with M3D-LaMed's shape (patch 4x16x16 -> 2048 tokens, width 768, 12 layers, 12 heads).
Each row: samples/s for a batch-1 forward+backward (2 threads by default), forward FLOPs per sample, and the
ratio to the ViT. Writes bench/results/encoder.md.

    .venv/bin/python bench/encoder.py [--threads 2] [--steps 5]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from med3dvlm.models.dcformer import build_dcformer  # noqa: E402


def vit(shape=(32, 256, 256)):
    from monai.networks.nets import ViT

    return ViT(in_channels=1, img_size=tuple(shape), patch_size=(4, 16, 16), hidden_size=768, mlp_dim=3072,
               num_layers=12, num_heads=12, classification=True, qkv_bias=False)


def time_fwd_bwd(model, x, steps, warmup=1):
    def step():
        out = model(x)
        out = out[-1] if isinstance(out, list) else out[0]
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def fwd_flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vit-steps", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 256, 256))
    ap.add_argument("--results", default=None, help="default bench/results/encoder.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 1, *args.shape)
    rows = []
    for name in ("nano", "tiny", "small"):
        m = build_dcformer(name).train()
        rows.append((f"DCFormer-{name}", m.num_params(), m.estimate_flops(tuple(args.shape)), time_fwd_bwd(m, x, args.steps)))
    v = vit(args.shape).train()
    rows.append(("3D ViT (M3D-LaMed)", sum(p.numel() for p in v.parameters()), fwd_flops(v, x), time_fwd_bwd(v, x, args.vit_steps)))
    base = rows[-1][3]
    lines = [f"Input 1x{'x'.join(map(str, args.shape))}, batch 1 forward+backward, {args.threads} threads, torch "
             f"{torch.__version__}. Baseline of the ratio: M3D-LaMed's 3D ViT shape (MONAI's ViT, patch 4x16x16, "
             f"width 768, 12 layers).", "", "| model | params (M) | fwd GFLOPs/sample | samples/s | x ViT |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {n / 1e6:.3f} | {fl / 1e9:.1f} | {sps:.3f} | {sps / base:.1f}x |" for name, n, fl, sps in rows]
    print("\n".join(lines))
    sys.path.insert(0, str(Path(__file__).parent))
    from record import write_markdown

    print(f"-> {write_markdown('encoder', 'DCFormer beside the 3D ViT, forward+backward on this CPU', chr(10).join(lines), Path(args.results) if args.results else None)}")


if __name__ == "__main__":
    main()
