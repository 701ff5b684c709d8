"""What the feature cache buys per stage-2 sample, measured at the paper's shapes on this machine, then projected onto
the paper's run (120K volumes, Qwen2.5-7B) on paper. One CPU core throughout (torch threads = 1).

    .venv/bin/python bench/feature_cache.py [--volumes 2] [--shape 128 256 256] [--encoder small] [--out FILE]
    .venv/bin/python bench/feature_cache.py --tiny     # the tiny config (nano at 32x64x64): a tiny-config ratio

Measured: the tower's forward (s/volume, eval mode, fp32) and its FLOPs (torch's FlopCounterMode); bytes per sample
(raw and as zstd Parquet) of a volume and of its two feature maps; the feed per core (Parquet read + decode to the
float32 the model takes) from volumes and from the cache; the cache build's volumes/s per core and size per 1,000
volumes; the projector's parameters. Writes bench/results/feature_cache.md (date, machine, commit, command).
"""

import argparse
import io
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_markdown  # noqa: E402

# Qwen2.5-7B-Instruct's config.json (hidden_size, num_hidden_layers, intermediate_size, num_attention_heads,
# num_key_value_heads, vocab_size): the LLM of the paper's stage 2
QWEN7B = {"hidden": 3584, "layers": 28, "intermediate": 18944, "heads": 28, "kv_heads": 4, "vocab": 152064}
M3D_VOLUMES, M3D_VQA_ROWS = 120_000, 500_000  # M3D-Cap's volumes, M3D-VQA's rows (each: a closed and an open sample)
H100_DENSE_BF16 = 989e12
H100_ENCODER_FLOPS = 32.2e12  # bench/results/gpu.md: stage 1, channels_last_3d, batch 64 (the measured rate)


def llm_flops_per_sample(c: dict, tokens: int) -> float:
    """A frozen LLM's forward and its backward to the inputs (no weight gradients): 2 x the forward's FLOPs."""
    d, kv = c["hidden"], c["hidden"] * c["kv_heads"] // c["heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * c["intermediate"]  # q, o, k, v, gate/up/down
    forward = 2 * tokens * (c["layers"] * per_layer + d * c["vocab"]) + 4 * c["layers"] * tokens * tokens * d
    return 2 * forward


def volume(shape, seed: int) -> np.ndarray:
    """A synthetic CT-like volume (the demo's renderer) as stored: uint8."""
    from med3dvlm.data.synthetic import sample_case, render_volume

    case = sample_case(seed, 0)
    v = render_volume(case, case.series[0][1], tuple(shape), 0).astype(np.float32)
    return np.round(255 * (v - v.min()) / max(float(v.max() - v.min()), 1e-6)).astype(np.uint8)


def parquet_bytes(cols: dict) -> tuple[bytes, float]:
    """The columns as one zstd Parquet file (as the shards and the cache write them); (bytes, seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = time.perf_counter()
    buf = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(v, pa.binary()) for k, v in cols.items()}), buf, compression="zstd")
    return buf.getvalue(), time.perf_counter() - t


def feed_rate(blob: bytes, decode, reps: int) -> float:
    """Samples/s on one core: read the Parquet bytes and decode every row to what the model takes."""
    import pyarrow.parquet as pq

    t, n = time.perf_counter(), 0
    for _ in range(reps):
        table = pq.read_table(io.BytesIO(blob))
        n += len(decode(table))
    return n / (time.perf_counter() - t)


def measure(encoder: str, shape, n: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from med3dvlm.models.dcformer import build_dcformer
    from med3dvlm.models.projector import DualStreamProjector, projector_config_for
    from med3dvlm.train.augment import apply_augment

    torch.set_num_threads(1)
    tower = build_dcformer(encoder).eval()
    vols = [volume(shape, i) for i in range(n)]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tower(apply_augment(torch.as_tensor(vols[0][None]), None))
    feats, t = [], time.perf_counter()
    with torch.no_grad():
        for v in vols:
            out = tower(apply_augment(torch.as_tensor(v[None]), None))
            feats.append([np.ascontiguousarray(out[-2][0].numpy()), np.ascontiguousarray(out[-1][0].numpy())])
    tower_s = (time.perf_counter() - t) / n
    vol_file, _ = parquet_bytes({"volume": [v.tobytes() for v in vols]})
    feat_file, write_s = parquet_bytes({"feat_low": [f[0].tobytes() for f in feats],
                                        "feat_high": [f[1].tobytes() for f in feats]})
    shapes = [f.shape for f in feats[0]]
    dec_vol = lambda t: apply_augment(torch.as_tensor(np.stack([np.frombuffer(b, np.uint8).reshape(shape)  # noqa: E731
                                                                 for b in t.column(0).to_pylist()])), None)
    dec_feat = lambda t: [np.frombuffer(b, np.float32).reshape(s) for c, s in zip(t.columns, shapes)  # noqa: E731
                          for b in c.to_pylist()][: t.num_rows]
    reps = max(3, int(2e9 // max(len(vol_file), 1) // 50))
    proj = DualStreamProjector(projector_config_for(tower, tuple(shape), QWEN7B["hidden"], 256, 2))
    return {"encoder": encoder, "shape": list(shape), "volumes": n, "tower_s": tower_s,
            "tower_gflop": fc.get_total_flops() / 1e9, "feature_shapes": [list(s) for s in shapes],
            "volume_raw": int(np.prod(shape)), "volume_parquet": len(vol_file) / n,
            "features_raw": sum(int(np.prod(s)) * 4 for s in shapes), "features_parquet": len(feat_file) / n,
            "feed_volumes_per_s": feed_rate(vol_file, dec_vol, reps), "feed_cache_per_s": feed_rate(feat_file, dec_feat, reps),
            "build_volumes_per_s": 1 / (tower_s + write_s / n), "projector_params": sum(p.numel() for p in proj.parameters())}


def paper_run(m: dict) -> dict:
    """The paper's stage 2 at M3D's size, per epoch, from the measured sizes and the rates named."""
    samples = M3D_VOLUMES + 2 * M3D_VQA_ROWS  # a report per volume, a closed and an open sample per question
    llm = llm_flops_per_sample(QWEN7B, 512)
    enc = m["tower_gflop"] * 1e9
    enc_s = enc / H100_ENCODER_FLOPS
    return {"samples_per_epoch": samples, "llm_tflop_per_sample": llm / 1e12, "encoder_share_of_flops": enc / (enc + llm),
            "encoder_ms_per_volume_h100": 1e3 * enc_s, "encoder_gpu_h_per_epoch": samples * enc_s / 3600,
            "cache_build_gpu_h_once": M3D_VOLUMES * enc_s / 3600,
            "llm_gpu_h_per_epoch_at_40pct": samples * llm / (0.4 * H100_DENSE_BF16) / 3600,
            "storage_gib_per_epoch_volumes": M3D_VOLUMES * m["volume_parquet"] / 2**30,
            "storage_gib_per_epoch_cache": M3D_VOLUMES * m["features_parquet"] / 2**30}


def report(m: dict, p: dict | None) -> str:
    kib = lambda b: f"{b / 1024:,.0f} KiB"  # noqa: E731
    rows = [("tower forward, s/volume (1 core, fp32, eval)", f"{m['tower_s']:.2f}"),
            ("tower forward, GFLOP/volume", f"{m['tower_gflop']:.1f}"),
            ("feature maps (low, high)", " + ".join(str(tuple(s)) for s in m["feature_shapes"])),
            ("bytes read per sample: volume, raw / zstd Parquet", f"{kib(m['volume_raw'])} / {kib(m['volume_parquet'])}"),
            ("bytes read per sample: features, raw / zstd Parquet", f"{kib(m['features_raw'])} / {kib(m['features_parquet'])}"),
            ("feed per core from volumes, samples/s (decode + to float)", f"{m['feed_volumes_per_s']:.1f}"),
            ("feed per core from the cache, samples/s", f"{m['feed_cache_per_s']:.1f}"),
            ("per sample from volumes incl. the tower, samples/s per core", f"{1 / (1 / m['feed_volumes_per_s'] + m['tower_s']):.2f}"),
            ("cache build, volumes/s per core", f"{m['build_volumes_per_s']:.2f}"),
            ("cache size per 1,000 volumes", f"{1000 * m['features_parquet'] / 2**30:.2f} GiB"),
            ("projector parameters (LLM width 3584, 256 tokens)", f"{m['projector_params']:,}")]
    out = "| figure | value |\n|---|---:|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    if p:
        out += ("\n\n## The paper's stage 2 on paper (projected, not measured)\n\n"
                f"M3D: {M3D_VOLUMES:,} volumes, {M3D_VQA_ROWS:,} VQA rows -> {p['samples_per_epoch']:,} stage-2 samples "
                f"per epoch. Qwen2.5-7B (from its config), 512 tokens, frozen, backward to the inputs: "
                f"{p['llm_tflop_per_sample']:.1f} TFLOP per sample; the tower is "
                f"{100 * p['encoder_share_of_flops']:.2f}% of a sample's FLOPs.\n\n"
                f"- the tower on an H100 at the rate stage 1 reached there (32.2 TFLOP/s, bench/results/gpu.md): "
                f"{p['encoder_ms_per_volume_h100']:.2f} ms/volume -> {p['encoder_gpu_h_per_epoch']:.2f} GPU-h per epoch "
                f"saved by the cache, which costs {p['cache_build_gpu_h_once']:.2f} GPU-h once\n"
                f"- the LLM's part at 40% of the H100's dense bf16 peak: {p['llm_gpu_h_per_epoch_at_40pct']:.1f} GPU-h "
                f"per epoch, so the cache saves about {100 * p['encoder_gpu_h_per_epoch'] / (p['encoder_gpu_h_per_epoch'] + p['llm_gpu_h_per_epoch_at_40pct']):.0f}% "
                f"of stage 2's GPU time\n"
                f"- storage read per epoch (one read per volume per epoch): {p['storage_gib_per_epoch_volumes']:,.0f} GiB "
                f"of volumes against {p['storage_gib_per_epoch_cache']:,.0f} GiB of features\n")
    return out


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--volumes", type=int, default=2)
    a.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256])
    a.add_argument("--encoder", default="small")
    a.add_argument("--tiny", action="store_true", help="the tiny config's encoder and shape (nano, 32x64x64)")
    a.add_argument("--out", default=None, help="default bench/results/feature_cache[_tiny].md")
    args = a.parse_args(argv)
    if args.tiny:
        args.encoder, args.shape = "nano", [32, 64, 64]
    m = measure(args.encoder, args.shape, args.volumes)
    body = report(m, None if args.tiny else paper_run(m))
    if args.tiny:
        body = "A tiny-config ratio: says nothing of the paper's job.\n\n" + body
    title = f"Feature cache per stage-2 sample: DCFormer-{args.encoder} at {'x'.join(map(str, args.shape))}"
    f = write_markdown("feature_cache_tiny" if args.tiny else "feature_cache", title, body, args.out)
    print(f.read_text())
    print(f"-> {f}")


if __name__ == "__main__":
    main()
