"""Stage-1 and stage-3 training steps on one GPU at the paper's input shape (1x128x256x256), bf16 autocast.

Stage 1: DCFormer-small + a ClinicalBERT-shaped DistilBERT text tower (random init; 6 layers, dim 768, vocab 119,547)
with the sigmoid loss and AdamW, as `pipelines.train --stage 1 --config paper` builds it.
Stage 3: DCFormer-small (frozen, eval) + projector + a Qwen2.5-0.5B-shaped LLM (random init) with LoRA r16 on all
attention and MLP linears (`paper` preset), 256 image tokens + 256 text tokens.
FLOPs are counted by torch's FlopCounterMode on one real forward+backward step; MFU against the H100 SXM's dense bf16
peak (989 TFLOP/s). Prints a table and writes JSON to $OUT (or ./bench/results).

    python bench/gpu_stages.py            # on a GPU machine
    python bench/gpu_stages.py --smoke    # tiny shapes on CPU, to check the script
    python bench/gpu_stages.py --report   # bench/results/gpu.md from every gpu_stages_*.json there
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from med3dvlm.config import load_config  # noqa: E402
from med3dvlm.models.clip import CLIPModel  # noqa: E402
from med3dvlm.models.vlm import VLM  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12}


class _Tok:  # the bench feeds token ids directly; VLM only asks the tokenizer for these
    pad_token_id = 151643

    def convert_tokens_to_ids(self, t):
        return 151665


def stage1_model(shape, dev, smoke):
    from transformers import DistilBertConfig, DistilBertModel

    cfg = load_config("paper", ["model.encoder=" + ("nano" if smoke else "small")]).model
    text = DistilBertModel(DistilBertConfig(vocab_size=119547, dim=768 if not smoke else 64, n_layers=6 if not smoke else 1,
                                            n_heads=12 if not smoke else 2, hidden_dim=3072 if not smoke else 128))
    return CLIPModel(cfg, text, tokenizer=None).to(dev)


def stage3_model(shape, dev, smoke):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    over = ["model.encoder=" + ("nano" if smoke else "small"), "model.image_tokens=" + ("8" if smoke else "256"),
            "model.max_len=1024", "model.trainable=paper"]
    cfg = load_config("paper", over).model
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151666, hidden_size=896 if not smoke else 64, intermediate_size=4864 if not smoke else 128,
        num_hidden_layers=24 if not smoke else 2, num_attention_heads=14 if not smoke else 4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True))
    m = VLM(cfg, llm, _Tok(), shape)
    m.set_stage(3)
    return m.to(dev)


def stage1_batch(b, shape, dev, text_len=256):
    return {"volume": torch.rand(b, 1, *shape, device=dev),
            "input_ids": torch.randint(1000, 30000, (b, text_len), device=dev),
            "attention_mask": torch.ones(b, text_len, dtype=torch.long, device=dev)}


def stage3_batch(m, b, shape, dev, text_len=256):
    n = m.cfg.image_tokens
    ids = torch.randint(1000, 30000, (b, n + text_len), device=dev)
    ids[:, :n] = m.image_token_id
    labels = ids.clone()
    labels[:, : n + text_len // 2] = -100
    return {"volume": torch.rand(b, 1, *shape, device=dev), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


def step_fn(model, opt, batch, stage):
    with torch.autocast(model_device(model).type, dtype=torch.bfloat16):
        out = model(**batch)
        loss = out.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def model_device(m):
    return next(m.parameters()).device


def flops_per_sample(model, batch_fn, stage):
    from torch.utils.flop_counter import FlopCounterMode

    batch = batch_fn(2)  # 2: BatchNorm needs more than one value per channel in training
    llm = getattr(model, "llm", None)
    if llm is not None:  # the flop counter cannot read grouped-query SDPA shapes; eager attention does the same math
        llm.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(model_device(model).type, dtype=torch.bfloat16):
            out = model(**batch)
            loss = out.loss
        loss.backward()
    if llm is not None:
        llm.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def run(stage, model, batch_fn, batch_sizes, steps, warmup, dev, peak):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1 if stage == 1 else 0)
    fps = flops_per_sample(model, batch_fn, stage)
    rows = []
    for b in batch_sizes:
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            batch = batch_fn(b)
            for _ in range(warmup):
                step_fn(model, opt, batch, stage)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                loss = step_fn(model, opt, batch, stage)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / steps
            sps = b / dt
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            rows.append({"stage": stage, "batch": b, "step_s": round(dt, 4), "samples_per_s": round(sps, 2),
                         "tflops_per_s": round(sps * fps / 1e12, 1), "mfu": round(sps * fps / peak, 4),
                         "peak_mem_gib": round(mem, 2), "gflops_per_sample": round(fps / 1e9, 1), "loss": round(float(loss), 4)})
            print(json.dumps(rows[-1]), flush=True)
            del batch
        except torch.OutOfMemoryError:
            rows.append({"stage": stage, "batch": b, "oom": True})
            print(json.dumps(rows[-1]), flush=True)
            opt.zero_grad(set_to_none=True)
            break
    return rows


def profile(model, batch):
    from torch.profiler import ProfilerActivity, profile as prof

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        step_fn(model, opt, batch, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        for _ in range(2):
            step_fn(model, opt, batch, 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stage1-batches", type=int, nargs="*", default=[8, 16, 32, 64])
    ap.add_argument("--stage3-batches", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--compile", action="store_true", help="torch.compile the DCFormer (stage 1)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format for stage 1")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a stage-1 step")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (32, 64, 64) if args.smoke else (128, 256, 256)
    if args.smoke:
        args.stage1_batches, args.stage3_batches, args.steps = [2], [2], 1
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK.items() if k in name), 989e12)
    print(f"device {name}, torch {torch.__version__}, input 1x{'x'.join(map(str, shape))}", flush=True)
    results = {"device": name, "torch": torch.__version__, "shape": shape, "peak_flops": peak, "rows": [],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(["python", *sys.argv])}
    t0 = time.time()
    m1 = stage1_model(shape, dev, args.smoke)
    if args.compile:
        m1.vision = torch.compile(m1.vision)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    m1 = m1.to(memory_format=fmt) if args.channels_last else m1
    results["compile"], results["channels_last"] = args.compile, args.channels_last
    batch1 = lambda b: {**stage1_batch(b, shape, dev), "volume": torch.rand(b, 1, *shape, device=dev).contiguous(memory_format=fmt)}  # noqa: E731
    if args.profile:
        profile(m1, batch1(args.stage1_batches[0]))
    results["stage1_params_m"] = round(sum(p.numel() for p in m1.parameters()) / 1e6, 2)
    results["rows"] += run(1, m1, batch1, args.stage1_batches, args.steps, 2, dev, peak)
    del m1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if args.stage3_batches:
        m3 = stage3_model(shape, dev, args.smoke)
        results["stage3_params_m"] = round(m3.num_params() / 1e6, 2)
        results["stage3_trainable_m"] = round(m3.num_params(trainable=True) / 1e6, 2)
        results["rows"] += run(3, m3, lambda b: stage3_batch(m3, b, shape, dev), args.stage3_batches, args.steps, 2, dev, peak)
    results["wall_s"] = round(time.time() - t0, 1)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    tag = "_smoke" if args.smoke else ("_compile" if args.compile else "") + ("_cl" if args.channels_last else "")
    (out / f"gpu_stages{tag}.json").write_text(json.dumps(results, indent=1))
    print("\n| stage | batch | samples/s | TFLOP/s | MFU | peak GiB |\n|---|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        if r.get("oom"):
            print(f"| {r['stage']} | {r['batch']} | OOM | | | |")
        else:
            print(f"| {r['stage']} | {r['batch']} | {r['samples_per_s']} | {r['tflops_per_s']} | {100 * r['mfu']:.1f}% | {r['peak_mem_gib']} |")


FIRST_RUNS = "2026-11-27"  # the files written before the script recorded its date and command


def report(results: Path) -> Path:
    """gpu.md: one table per gpu_stages_*.json (what ran, on which device and torch, when and how)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from record import write_markdown

    lines = ["Stage-1 and stage-3 training steps on one GPU at 1x128x256x256, bf16 autocast, synthetic tensors (no Ray "
             "or DeepSpeed on the lent machine); FLOPs by torch's FlopCounterMode, MFU against the card's dense bf16 "
             "peak. Each table is one run of `bench/gpu_stages.py` on the lent machine, from the JSON file it wrote."]
    for f in sorted(results.glob("gpu_stages*.json*")):
        if f.suffix == ".jsonl":  # the per-row lines the script printed, kept from its output
            d = {"device": "the same machine", "torch": "the same torch", "stage1_params_m": "the same", "wall_s": "?",
                 "command": "python bench/gpu_stages.py (its printed rows, saved)",
                 "rows": [json.loads(x) for x in f.read_text().splitlines() if x.strip()]}
        else:
            d = json.loads(f.read_text())
        layout = ("channels_last_3d" if d.get("channels_last") else "NCDHW") + (" + torch.compile" if d.get("compile") else "")
        lines += ["", f"### {f.name}: {d['device']}, torch {d['torch']}, {layout}", "",
                  f"{d.get('date', FIRST_RUNS)}: `{d.get('command', 'python bench/gpu_stages.py (flags: see the layout)')}`; "
                  f"stage-1 model {d['stage1_params_m']} M parameters"
                  + (f", stage 3 {d['stage3_params_m']} M ({d['stage3_trainable_m']} M trainable)" if "stage3_params_m" in d else "")
                  + f"; {d['wall_s']} s.", "", "| stage | batch | samples/s | TFLOP/s | MFU | peak GiB |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['stage']} | {r['batch']} | OOM | | | |" if r.get("oom") else
                  f"| {r['stage']} | {r['batch']} | {r['samples_per_s']} | {r['tflops_per_s']} | {100 * r['mfu']:.1f}% | "
                  f"{r['peak_mem_gib']} |" for r in d["rows"]]
    return write_markdown("gpu", "Training steps on one GPU", "\n".join(lines), results / "gpu.md")


if __name__ == "__main__":
    if "--report" in sys.argv:  # from the folder the runs wrote to ($OUT, or bench/results)
        print(f"-> {report(Path(os.environ.get('OUT', Path(__file__).parent / 'results')))}")
    else:
        main()
