"""Evaluation throughput on this CPU: batched greedy generation vs batch size 1 (the research code's setting), and
the text metrics' throughput.

Generation: the `tiny` VLM (random init, so every answer runs to --new-tokens; EOS is suppressed so lengths are equal)
answering report prompts for one volume each, batch sizes 1, 4, 16. Baseline: batch 1.
Metrics: BLEU-1, ROUGE-1, METEOR per sample, and BERTScore (packaged MiniLM) in batches of 32, on report-length pairs.

    .venv/bin/python bench/eval.py [--threads 2] [--new-tokens 32] [--samples 32]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("NLTK_DATA", str(ROOT / ".venv" / "nltk_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from med3dvlm.config import load_config  # noqa: E402
from med3dvlm.models.prompt import REPORT_PROMPTS  # noqa: E402
from med3dvlm.models.vlm import VLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import provenance  # noqa: E402


def bench_generation(threads: int, new_tokens: int, samples: int, sizes=(1, 4, 16)) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config("tiny")
    vlm = VLM.from_config(cfg.model, cfg.data.shape).eval()
    vols = torch.rand(samples, 1, *cfg.data.shape)
    prompts = [REPORT_PROMPTS[i % len(REPORT_PROMPTS)] for i in range(samples)]
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    rows = []
    with torch.no_grad():
        vlm.generate(vols[:2], prompts[:2], **kw)  # warm-up
        for bs in sizes:
            t = time.perf_counter()
            for i in range(0, samples, bs):
                vlm.generate(vols[i:i + bs], prompts[i:i + bs], **kw)
            dt = time.perf_counter() - t
            rows.append({"batch": bs, "samples_per_s": samples / dt, "tokens_per_s": samples * new_tokens / dt})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["ratio_vs_batch1"] = r["samples_per_s"] / base
    return rows


def bench_metrics(samples: int) -> list[dict]:
    from med3dvlm.eval.text import BertScore, bleu1, meteor, rouge1

    refs = ["There is a 3 cm hypodense lesion in segment seven of the liver. The spleen and pancreas are unremarkable. "
            "No free fluid. No lymphadenopathy."] * samples
    preds = ["A hypodense lesion is seen in the right lobe of the liver. The spleen is normal. No ascites."] * samples
    rows = []
    for name, fn in (("BLEU-1", bleu1), ("ROUGE-1", rouge1), ("METEOR", meteor)):
        fn(preds[0], refs[0])  # warm-up (loads WordNet for METEOR)
        t = time.perf_counter()
        for p, r in zip(preds, refs):
            fn(p, r)
        rows.append({"metric": name, "pairs_per_s": samples / (time.perf_counter() - t)})
    bs = BertScore()
    bs(preds[:2], refs[:2])
    t = time.perf_counter()
    bs(preds, refs)
    rows.append({"metric": "BERTScore (MiniLM, batch 32)", "pairs_per_s": samples / (time.perf_counter() - t)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", default=None, help="default bench/results/eval.json")
    a = p.parse_args()
    gen = bench_generation(a.threads, a.new_tokens, a.samples)
    met = bench_metrics(max(a.samples, 64))
    print(f"\nBatched greedy generation, tiny VLM, {a.new_tokens} new tokens/sample, {a.threads} threads "
          "(baseline: batch 1, as the research code evaluates)")
    print("| batch | samples/s | tokens/s | vs batch 1 |\n|--:|--:|--:|--:|")
    for r in gen:
        print(f"| {r['batch']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['ratio_vs_batch1']:.2f}x |")
    print("\nText metrics, report-length pairs (one process)\n| metric | pairs/s |\n|---|--:|")
    for r in met:
        print(f"| {r['metric']} | {r['pairs_per_s']:.0f} |")
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / "eval.json"
    out.write_text(json.dumps({**provenance(), "args": vars(a), "generation": gen, "metrics": met}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
