"""The ceiling of stage 1 on this machine: our stage-1 model stepped alone in one process (no Ray, no DeepSpeed, no
data feed), at the shapes `bench/vs_train_clip.py` compares at: DCFormer-small at 2x128x256x256, a random DistilBERT-base
text tower (ClinicalBERT's architecture) on 176 tokens, the sigmoid loss, fused AdamW; training's allocator settings.
If even this lone step is under 2x the reference recipe's rate, no trimming of the platform's machinery reaches 2x.

The baseline is the reference recipe's own measured steady step (Med3DVLM's `train_clip` path in DeepSpeed ZeRO-2, as
`scripts/train_clip.sh` runs it), read from bench/results/vs_reference.json where `bench/vs_train_clip.py` wrote it
(its date and command are quoted). Writes bench/results/lone_step.md.

    .venv/bin/python bench/lone_step.py [--steps 6] [--warmup 2] [--threads 2] [--precision fp32 bf16]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import ROOT, RESULTS, write_markdown  # noqa: E402

sys.path.insert(0, str(ROOT / "platform"))


def child(precision: str, steps: int, warmup: int, threads: int, shape, batch: int, tokens: int) -> dict:
    """Time `steps` optimizer steps after `warmup`, in this process."""
    import torch

    from med3dvlm.config import load_config
    from med3dvlm.models.clip import CLIPModel

    from vs_train_clip import text_tower

    torch.set_num_threads(threads)
    text = Path(tempfile.mkdtemp()) / "distilbert"
    text_tower(text)
    cfg = load_config("paper", [f"model.text_encoder={text}", f"data.shape={list(shape)}", "model.encoder=small"])
    torch.manual_seed(0)
    model = CLIPModel.from_config(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x = torch.rand(batch, 1, *shape)
    ids = torch.randint(1000, 20000, (batch, tokens))
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, ids, mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"step_s": times[warmup:], "warmup_s": times[:warmup]}


def reference_rate(precision: str) -> tuple[float, dict]:
    """The reference recipe's steady samples/s (median step after its first) from vs_reference.json."""
    d = json.loads((RESULTS / "vs_reference.json").read_text())[
        "stage1_end_to_end" + ("_bf16" if precision == "bf16" else "")]
    steps = [s for rnd in d["step_seconds"]["reference_deepspeed"] for s in rnd[1:]]
    return d["batch"] / statistics.median(steps), {k: d[k] for k in ("date", "command")}


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--steps", type=int, default=6)
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--tokens", type=int, default=176)
    a.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256))
    a.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    a.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a.add_argument("--results", default=None, help="default bench/results/lone_step.md")
    args = a.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.threads, args.shape, args.batch, args.tokens)))
        return
    from med3dvlm.runtime import allocator_env

    lines = [f"Our stage-1 model stepped alone (batch {args.batch}, {'x'.join(map(str, args.shape))}, {args.tokens} "
             f"text tokens, {args.threads} threads, {args.warmup} warm-up steps then {args.steps} timed), each "
             f"precision in a fresh process with training's allocator settings.", "",
             "| precision | median step (s) | samples/s | reference recipe samples/s | ratio to the reference |",
             "|---|--:|--:|--:|--:|"]
    sources = []
    for precision in args.precision:
        r = subprocess.run([sys.executable, __file__, "--child", precision, "--steps", str(args.steps), "--warmup",
                            str(args.warmup), "--threads", str(args.threads), "--batch", str(args.batch), "--tokens",
                            str(args.tokens), "--shape", *map(str, args.shape)],
                           capture_output=True, text=True, env={**os.environ, **allocator_env()}, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        step = statistics.median(got["step_s"])
        ours = args.batch / step
        ref, src = reference_rate(precision)
        sources.append(f"{precision}: {src['date']}, `{src['command']}`")
        lines.append(f"| {precision} | {step:.2f} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "The reference rate is the median steady step of Med3DVLM's recipe (DeepSpeed ZeRO-2, the first "
              "step of each round left out) as `bench/vs_train_clip.py` measured it on this machine and wrote it to "
              "`vs_reference.json`: " + "; ".join(sources) + ". Not side by side: the reference ran then, this "
              "script now; `bench/vs_train_clip.py` runs both sides together, end to end."]
    if tuple(args.shape) != (128, 256, 256):
        lines += ["", f"**A tiny-config run** ({'x'.join(map(str, args.shape))}): its ratio does not compare with "
                  f"the reference's 128x256x256 rate."]
    print(f"-> {write_markdown('lone_step', 'Stage 1 stepped alone: the ceiling', chr(10).join(lines), Path(args.results) if args.results else None)}")


if __name__ == "__main__":
    main()
