"""Training samples from shard rows, as Ray Data transforms (so augmentation and tokenisation run off the trainer).

- `augment`: the reference augmentation (research/m3d.md 2.3) on uint8/float16 volumes: rot90 in H-W (p 0.5),
  flips per axis (p 0.1), intensity scale and shift +-0.1 (p 0.5 each). Output float16 in [0,1]-ish.
- Stage 1: volume + report, the report shortened by whole sentences to the text encoder's limit.
- Stages 2/3: one row per task: a report (caption), each question closed (choices A-D) and open, and in stage 3
  the yes/no questions. Prompts use our own templates; the target is what the model must produce.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np

REPORT_PROMPTS = [
    "Describe the findings of this CT scan.",
    "Write a radiology report for this image.",
    "What are the findings in this scan?",
    "Please summarise the findings of this CT volume.",
    "Generate the findings section of the report.",
    "What do you see in this medical image?",
    "Report the findings of this examination.",
    "Give a concise report of this CT.",
    "Describe this volume as a radiologist would.",
    "What abnormalities, if any, are visible?",
    "Summarise what this scan shows.",
    "Provide the findings for this study.",
    "Write the findings you observe in this image.",
    "Can you describe the findings of this scan?",
    "Please write a report for this CT examination.",
    "What does this CT volume show?",
    "List the findings of this image.",
    "Draft a findings paragraph for this scan.",
    "Interpret this CT and describe the findings.",
    "Describe the relevant anatomy and any lesion.",
    "What is your report for this image?",
    "Explain the findings in this medical volume.",
    "Write a short findings report.",
    "Please describe what is seen on this CT.",
    "Give the radiological findings for this volume.",
    "Report on this scan.",
    "What are the imaging findings?",
    "Describe any abnormality in this study.",
    "Please provide a report of the findings.",
    "How would you report this CT scan?",
]
LETTERS = "ABCD"


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


def _rng(key: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(key.encode()), seed])


def augment(batch: dict, seed: int | None = None) -> dict:
    """Reference augmentation on a numpy batch with a `volume` column (N, D, H, W).

    `seed=None` (training): fresh randomness on every pass, so each epoch sees new augmentations; an int makes it
    deterministic per volume (tests)."""
    out = []
    for vid, vol in zip(batch["volume_id"], batch["volume"]):
        rng = _rng(str(vid), seed) if seed is not None else np.random.default_rng()
        v = vol.astype(np.float32) / (255.0 if vol.dtype == np.uint8 else 1.0)
        if rng.random() < 0.5:
            v = np.rot90(v, k=int(rng.integers(1, 4)), axes=(1, 2))
        for axis in range(3):
            if rng.random() < 0.1:
                v = np.flip(v, axis=axis)
        if rng.random() < 0.5:
            v = v * (1 + rng.uniform(-0.1, 0.1))
        if rng.random() < 0.5:
            v = v + rng.uniform(-0.1, 0.1)
        out.append(np.ascontiguousarray(v, dtype=np.float16))
    return {**batch, "volume": np.stack(out)}


def as_float(batch: dict) -> dict:
    """No augmentation (evaluation): stored volume -> float16 in [0,1]."""
    vol = batch["volume"]
    v = vol.astype(np.float32) / 255.0 if vol.dtype == np.uint8 else vol.astype(np.float32)
    return {**batch, "volume": v.astype(np.float16)}


def question_prompt(question: str, choices: dict[str, str] | None = None) -> str:
    """The prompt for a question, M3D style " Q Choices: A. .. D. .." when choices (letter -> text) are given."""
    if not choices:
        return f" {question}"
    return f" {question} Choices: " + " ".join(f"{letter}. {text}" for letter, text in choices.items())


def closed_prompt(q: dict) -> tuple[str, str]:
    """"NA" is a real option text in M3D-VQA and stays; only a missing choice is left out."""
    choices = {l: q["choice_" + l.lower()] for l in LETTERS if q["choice_" + l.lower()] not in ("", None)}
    return question_prompt(q["question"], choices), f" {q['answer_choice']}. {q['answer']}"


def open_prompt(q: dict) -> tuple[str, str]:
    return question_prompt(q["question"]), f" {q['answer']}"


def task_rows(row: dict, stage: int, qa_splits: tuple[str, ...], seed: int = 0) -> list[dict]:
    """One shard row -> its stage-2/3 samples (prompt, answer, task)."""
    base = {"volume": row["volume"], "volume_id": row["volume_id"]}
    rng = _rng(str(row["volume_id"]), seed)
    rows = [{**base, "prompt": REPORT_PROMPTS[int(rng.integers(len(REPORT_PROMPTS)))], "answer": " " + row["report"], "task": "report"}]
    for q in row["qa"] if row["qa"] is not None else []:
        if q["yes_no"]:
            if stage == 3 and "yn_train" in qa_splits:
                p, a = open_prompt(q)
                rows.append({**base, "prompt": p, "answer": a, "task": "yes_no"})
            continue
        if q["split"] not in qa_splits:
            continue
        for task, fn in (("closed", closed_prompt), ("open", open_prompt)):
            p, a = fn(q)
            rows.append({**base, "prompt": p, "answer": a, "task": task})
    return rows


@lru_cache(maxsize=4)
def text_tokenizer(name: str):
    from med3dvlm.models.clip import load_tokenizer

    return load_tokenizer(name)


@lru_cache(maxsize=4)
def llm_tokenizer(name: str):
    from med3dvlm.models.vlm import vlm_tokenizer_for

    return vlm_tokenizer_for(name)


def encode_example(tok, image_token_id: int, n_image: int, max_len: int, prompt: str, answer: str | None):
    """(input_ids, labels): placeholders + prompt (masked) + answer + EOS (learned); a cut answer gets no EOS."""
    head = [image_token_id] * n_image + tok(prompt, add_special_tokens=False)["input_ids"]
    if len(head) >= max_len:
        raise ValueError(f"prompt of {len(head)} tokens (image tokens included) exceeds max_len {max_len}")
    if answer is None:
        return head, [-100] * len(head)
    ans = (tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: max_len - len(head)]
    return head + ans, [-100] * len(head) + ans


def tokenize_reports(batch: dict, text_encoder: str, max_len: int) -> dict:
    """Stage 1: reports -> fixed-length input_ids / attention_mask (whole sentences kept)."""
    tok = text_tokenizer(text_encoder)
    n_tokens = lambda t: len(tok(t, add_special_tokens=True)["input_ids"])  # noqa: E731
    texts = [shorten_report(str(r), n_tokens, max_len) for r in batch["report"]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {"volume": batch["volume"], "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def tokenize_tasks(batch: dict, llm: str, n_image: int, max_len: int) -> dict:
    """Stages 2/3: (prompt, answer) -> right-padded input_ids / attention_mask / labels of length max_len."""
    from med3dvlm.models.vlm import IMAGE_TOKEN

    tok = llm_tokenizer(llm)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n = len(batch["prompt"])
    ids = np.full((n, max_len), tok.pad_token_id, np.int64)
    labels = np.full((n, max_len), -100, np.int64)
    att = np.zeros((n, max_len), np.int64)
    for i, (p, a) in enumerate(zip(batch["prompt"], batch["answer"])):
        x, y = encode_example(tok, image_id, n_image, max_len, str(p), str(a))
        ids[i, :len(x)], labels[i, :len(y)], att[i, :len(x)] = x, y, 1
    return {"volume": batch["volume"], "input_ids": ids, "attention_mask": att, "labels": labels}
