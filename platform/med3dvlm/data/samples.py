"""Training samples from shard rows, as Ray Data transforms (so augmentation and tokenisation run off the trainer).

- Volumes stay as stored (uint8): the augmentation's parameters are drawn in Ray Data and applied in the train
  worker (`train.augment`), so the feed moves one byte per voxel.
- Stage 1: volume + report, the report shortened by whole sentences to the text encoder's limit.
- Stages 2/3: one row per task: a report (caption), each question closed (choices A-D) and open, and in stage 3
  the yes/no questions. Prompts use our own templates; the target is what the model must produce.
"""

from __future__ import annotations

import re

import numpy as np

from med3dvlm.models.prompt import LETTERS, closed_prompt, encode_example, open_prompt, report_prompt, vlm_tokenizer

IMAGE_KEYS = ("volume", "feat_low", "feat_high")  # a sample's image: the volume, or the tower's cached features


def shorten_report(text: str, n_tokens, max_tokens: int) -> str:
    """Keep whole sentences from the start while they fit (`n_tokens(str) -> int`); at least the first sentence."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    out = []
    for s in sentences:
        cand = " ".join(out + [s])
        if out and n_tokens(cand) > max_tokens:
            break
        out.append(s)
    return " ".join(out)


def rotate_choices(q: dict, k: int) -> dict:
    """A closed question with its choices moved k letters on (with four choices, A's text to B, ..., D's to A): the
    same question, its answer under another letter. A question whose answer letter is not among its choices stays."""
    letters = [l for l in LETTERS if q["choice_" + l.lower()] not in ("", None)]
    if q["answer_choice"] not in letters:
        return q
    n, texts = len(letters), [q["choice_" + l.lower()] for l in letters]
    out = {**q, "answer_choice": letters[(letters.index(q["answer_choice"]) + k) % n]}
    out.update({"choice_" + l.lower(): texts[(i - k) % n] for i, l in enumerate(letters)})
    return out


def task_rows(row: dict, qa_splits: tuple[str, ...], seed: int = 0, closed_orders: int = 1) -> list[dict]:
    """One shard row -> its stage-2/3 samples (prompt, answer, task): the report, the questions of `qa_splits` (the
    yes/no ones where it holds "yn_train"), each closed question in `closed_orders` orders of its choices
    (rotations), so that its answer is learnt under as many letters."""
    base = {"volume": row["volume"], "volume_id": row["volume_id"]}
    rows = [{**base, "prompt": report_prompt(row["volume_id"], seed), "answer": " " + row["report"], "task": "report"}]
    for q in row["qa"] if row["qa"] is not None else []:
        if q["yes_no"]:
            if "yn_train" in qa_splits:
                p, a = open_prompt(q)
                rows.append({**base, "prompt": p, "answer": a, "task": "yes_no"})
            continue
        if q["split"] not in qa_splits:
            continue
        # distinct orders only: a question with fewer choices (or no valid answer letter) has fewer rotations
        for p, a in dict.fromkeys(closed_prompt(rotate_choices(q, k)) for k in range(closed_orders)):
            rows.append({**base, "prompt": p, "answer": a, "task": "closed"})
        p, a = open_prompt(q)
        rows.append({**base, "prompt": p, "answer": a, "task": "open"})
    return rows


def expand_tasks(batch: dict, qa_splits: tuple[str, ...], closed_orders: int = 1) -> dict:
    """A batch of shard rows -> their stage-2/3 samples as columns (`task_rows` of each volume), each volume repeated
    once per task by one take from the batch's stacked volumes, rather than a block built row by row (`flat_map`)."""
    tasks, index = [], []
    for i, vid in enumerate(batch["volume_id"]):
        row = {"volume_id": vid, "report": batch["report"][i], "qa": batch["qa"][i], "volume": None}
        t = task_rows(row, qa_splits, closed_orders=closed_orders)
        tasks += t
        index += [i] * len(t)
    cols = {k: np.asarray([t[k] for t in tasks], dtype=object) for k in ("volume_id", "prompt", "answer", "task")}
    take = np.asarray(index, np.int64)
    return {**{k: batch[k][take] for k in IMAGE_KEYS if k in batch}, **cols}


def tokenize_reports(batch: dict, text_encoder: str, max_len: int) -> dict:
    """Stage 1: reports -> fixed-length input_ids / attention_mask (whole sentences kept)."""
    from med3dvlm.models.clip import text_tokenizer  # torch: only where reports are tokenised, not in every task

    tok = text_tokenizer(text_encoder)
    n_tokens = lambda t: len(tok(t, add_special_tokens=True)["input_ids"])  # noqa: E731
    texts = [shorten_report(str(r), n_tokens, max_len) for r in batch["report"]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {**_carried(batch), "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def tokenize_tasks(batch: dict, llm: str, n_image: int, max_len: int) -> dict:
    """Stages 2/3: (prompt, answer) -> right-padded input_ids / attention_mask / labels of length max_len."""
    tok = vlm_tokenizer(llm)
    n = len(batch["prompt"])
    ids = np.full((n, max_len), tok.pad_token_id, np.int64)
    labels = np.full((n, max_len), -100, np.int64)
    att = np.zeros((n, max_len), np.int64)
    for i, (p, a) in enumerate(zip(batch["prompt"], batch["answer"])):
        x, y = encode_example(tok, n_image, max_len, str(p), str(a))
        ids[i, :len(x)], labels[i, :len(y)], att[i, :len(x)] = x, y, 1
    return {**_carried(batch), "input_ids": ids, "attention_mask": att, "labels": labels}


def _carried(batch: dict) -> dict:
    """What a tokenised batch keeps of its input: the volume (or its cached features) and augmentation parameters."""
    return {k: batch[k] for k in IMAGE_KEYS + ("augment",) if k in batch}
