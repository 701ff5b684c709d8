"""A tiny pretrained LLM built from the training texts: the demo's stand-in for the paper's pretrained Qwen2.5.

The `tiny` config's LLM is random. In the demo's minutes it learns which answer an image shows, but not the skill a
pretrained LLM brings: answering a closed question with the letter of the choice it means (measured for issue 14
with `bench/closed_vqa_steps.py`: the letter stays at chance for the demo's 600 stage-3 steps and needs ~3,000).
`pretrain_tiny_llm` builds that skill beforehand, from text alone, and saves an ordinary local HF model directory
(config, weights, tokenizer), which stages 2-3 load as they load any LLM: `model.llm=<dir>`.

- Vocabulary: the MiniLM WordPiece pieces that the training texts use, plus the specials. WordPiece's greedy
  longest match does not change when unused pieces are dropped, so every training text is tokenised exactly as with
  the full vocabulary (checked), and the embedding and output matrices shrink from 30,522 rows to a few hundred.
  A piece outside it becomes [UNK].
- Pretraining: each closed question of the training volumes, in every choice order stage 3 uses, with the answer's
  text in the image tokens' place (the cue) and the M3D target " B. Liver": the LLM learns to find the letter of the
  choice its leading tokens name. In stages 2-3 the projector's tokens take the cue's place.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from med3dvlm.models.prompt import (IMAGE_TOKEN, REPORT_PROMPTS, add_vlm_tokens, encode_example, pad_batch,
                                   question_prompt)

PRETRAINING = "pretraining.json"  # written beside the weights: what the LLM was built from


def training_tasks(cfg, shards: str) -> list[dict]:
    """The stage-3 samples (prompt, answer, task) of the training volumes, without their volumes."""
    from med3dvlm.data.samples import task_rows
    from med3dvlm.data.shards import read_table
    from med3dvlm.train.stages import get_stage

    table = read_table(shards, ["volume_id", "report", "qa"], split="train", split_field=cfg.train.split_field)
    splits = get_stage(3).qa_splits(cfg)
    return [t for r in table.to_pylist() for t in task_rows({**r, "volume": None}, splits,
                                                            closed_orders=max(1, cfg.train.closed_orders))]


def trimmed_tokenizer(texts: list[str], out: Path):
    """The packaged MiniLM tokenizer cut to the pieces `texts` use (+ specials, `<im_patch>`), saved in `out`."""
    from transformers import BertTokenizer

    from med3dvlm.models.clip import load_tokenizer

    base = load_tokenizer("minilm")
    used = set(base.all_special_ids)
    for t in texts:
        used.update(base(t, add_special_tokens=False)["input_ids"])
    vocab = {piece: i for i, piece in enumerate(base.convert_ids_to_tokens(sorted(used)))}
    tok = add_vlm_tokens(BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=base.model_max_length))
    for t in texts:
        if tok.tokenize(t) != base.tokenize(t):
            raise AssertionError(f"the trimmed vocabulary tokenises {t!r} differently")
    tok.save_pretrained(out)
    return tok


def lookup_examples(tasks: list[dict], tok, n_image: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the closed questions, the answer's text (cycled) where the image tokens go."""
    examples = []
    for t in tasks:
        if t["task"] != "closed":
            continue
        cue = tok(t["answer"].split(". ", 1)[-1], add_special_tokens=False)["input_ids"]
        if not cue:  # an empty answer text names no choice
            continue
        ids, labels = encode_example(tok, n_image, max_len, t["prompt"], t["answer"])
        examples.append(([cue[i % len(cue)] for i in range(n_image)] + ids[n_image:], labels))
    if not examples:
        raise ValueError("no closed questions among the training volumes: nothing to pretrain the LLM on")
    return examples


def pretrain(llm, examples, pad: int, steps: int, lr: float, batch_size: int, seed: int, log=print) -> float | None:
    """AdamW with a cosine schedule after 3% warm-up, batches drawn at random; returns the last loss (None: 0 steps)."""
    from med3dvlm.train.engine import cosine_with_warmup

    rng = random.Random(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, 0.03))
    llm.train()
    loss = None
    for step in range(steps):
        loss = llm(**pad_batch(rng.sample(examples, min(batch_size, len(examples))), pad)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"[tiny-llm] step {step + 1}/{steps}: loss {loss.item():.4f}")
    return None if loss is None else float(loss.item())


def pretrain_tiny_llm(cfg, shards: str, out: str | Path, steps: int = 3000, lr: float = 3e-3, batch_size: int = 16,
                      log=print) -> str:
    """`build_tiny_llm` from the stage-3 tasks of the shards' training volumes."""
    return build_tiny_llm(cfg, training_tasks(cfg, shards), out, steps, lr, batch_size, log, source=str(shards))


def build_tiny_llm(cfg, tasks: list[dict], out: str | Path, steps: int = 3000, lr: float = 3e-3,
                   batch_size: int = 16, log=print, source: str = "") -> str:
    """`cfg.model`'s tiny-qwen2 shape with the vocabulary of the tasks' texts, pretrained on the choice lookup of
    their closed questions, saved (HF layout + `pretraining.json`) in `out`; returns `out` as an absolute path."""
    from med3dvlm.models.vlm import build_llm

    out = Path(out)
    texts = [t[k] for t in tasks for k in ("prompt", "answer")] + [question_prompt(p) for p in REPORT_PROMPTS]
    tok = trimmed_tokenizer(texts, out)
    torch.manual_seed(cfg.train.seed)
    llm = build_llm(dataclasses.replace(cfg.model, llm="tiny-qwen2"), tok)
    examples = lookup_examples(tasks, tok, cfg.model.image_tokens, cfg.model.max_len)
    log(f"[tiny-llm] vocabulary {len(tok)} pieces; {len(examples)} closed questions; {steps} steps")
    last = pretrain(llm, examples, tok.pad_token_id, steps, lr, batch_size, cfg.train.seed, log)
    llm.save_pretrained(out)
    (out / PRETRAINING).write_text(json.dumps({
        "source": source, "vocabulary": len(tok), "examples": len(examples), "steps": steps, "lr": lr,
        "batch_size": batch_size, "seed": cfg.train.seed, "loss_last": last, "image_token": IMAGE_TOKEN}, indent=1))
    return str(out.resolve())
