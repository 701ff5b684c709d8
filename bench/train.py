"""Training throughput per stage on this CPU through the real path (Ray Train, DeepSpeed ZeRO-2, 2 gloo workers,
Ray Data augmentation and tokenisation): samples/s and the fraction of step time spent waiting for data.

Configs: `tiny` (nano encoder at 32x64x64) and `m3d` with the nano encoder at M3D's 32x256x256 (CPU: the packaged
MiniLM text tower and the 2-layer Qwen2 LLM instead of the paper's local models). Synthetic data, --steps per stage.
Baseline for the ratio column: the tiny config's stage.

    .venv/bin/python bench/train.py [--steps 12] [--cases 24]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from med3dvlm.config import load_config  # noqa: E402
from med3dvlm.runtime import init_ray  # noqa: E402
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_results  # noqa: E402

CONFIGS = {
    "tiny": ("tiny", []),
    "m3d (nano)": ("m3d", ["model.encoder=nano", "model.text_encoder=minilm", "model.llm=tiny-qwen2", "train.use_gpu=false",
                           "train.num_workers=2", "train.cpus_per_worker=0.5", "model.image_tokens=8", "model.max_len=96",
                           "model.embed_dim=64", "model.text_max_len=40", "train.split_field=case_split",
                           "train.stage1.batch_size=4", "train.stage2.batch_size=4", "train.stage3.batch_size=4"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=None, help="default bench/results/train.json (train.md beside it)")
    a = p.parse_args()
    from med3dvlm.data.synthetic import write_m3d_tree
    from med3dvlm.data.preprocess import preprocess
    from med3dvlm.train.driver import train

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_m3d_tree(work / "raw", cases=a.cases, seed=0)
    init_ray()
    rows = []
    for name, (preset, overrides) in ((n, CONFIGS[n]) for n in a.configs):
        ov = overrides + [f"train.stage{s}.max_steps={a.steps}" for s in (1, 2, 3)] + \
            [f"train.stage{s}.epochs=1000" for s in (1, 2, 3)] + ["train.max_failures=0"]
        cfg = load_config(preset, ov)
        shards = work / f"shards-{preset}"
        preprocess(cfg, work / "raw", shards, log=lambda *_: None)
        init = None
        for stage in (1, 2, 3):
            t = time.time()
            r = train(cfg, stage, str(shards), str(work / f"ckpt-{preset}"), init, log=lambda *_: None)
            init = r["export"]
            f = r["figures"]
            rows.append({"config": name, "shape": "x".join(map(str, cfg.data.shape)), "stage": stage,
                         "batch": cfg.stage(stage).batch_size * cfg.train.num_workers,
                         "samples_per_s": f["samples_per_s"], "data_wait_fraction": f["data_wait_fraction"],
                         "wall_s": time.time() - t})
            print(rows[-1], flush=True)
    lines = [f"Training throughput through the real path (Ray Train, DeepSpeed ZeRO-2, 2 CPU gloo workers, Ray Data "
             f"feed), {a.steps} steps per stage on {a.cases} synthetic cases; baseline of the ratio: the tiny config's "
             f"same stage. CPU figures with CPU-sized models (tiny-config ratios); a GPU's are in gpu.md.", "",
             "| config | input | stage | global batch | samples/s | data wait | vs tiny | wall s |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        base = next(x for x in rows if x["config"] == "tiny" and x["stage"] == r["stage"])
        lines.append(f"| {r['config']} | {r['shape']} | {r['stage']} | {r['batch']} | {r['samples_per_s']:.1f} | "
                     f"{100 * r['data_wait_fraction']:.0f}% | {r['samples_per_s'] / base['samples_per_s']:.2f}x | "
                     f"{r['wall_s']:.0f} |")
    print("\n".join(lines))
    print(f"written {write_results('train', 'Training throughput per stage', lines, {'args': vars(a), 'rows': rows}, a.out)}")


if __name__ == "__main__":
    main()
