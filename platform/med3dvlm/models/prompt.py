"""The prompt and sequence contract shared by training, evaluation, serving and the model.

Sequence layout (no chat template, as the reference): `<im_patch>` x N, the prompt, the answer, EOS.
- Report requests: one of `REPORT_PROMPTS`, drawn per volume by a keyed generator (the same draw in training and
  evaluation); serving takes the user's text.
- Questions: " <question>", and with choices M3D's " <question> Choices: A. .. B. .. C. .. D. ..".
- Targets: " <answer>" (open), " <letter>. <answer>" (closed), then EOS.
Every prompt starts with one space: the prompt follows the image tokens directly.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

IMAGE_TOKEN = "<im_patch>"
LETTERS = "ABCD"
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


def keyed_rng(key: str, seed: int) -> np.random.Generator:
    """A generator fixed by a key (e.g. a volume id) and a seed: the same draw in every process."""
    return np.random.default_rng([zlib.crc32(key.encode()), seed])


def report_prompt(volume_id: str, seed: int = 0) -> str:
    """The report request for a volume: one of our templates, fixed by the volume id and the seed."""
    return question_prompt(REPORT_PROMPTS[int(keyed_rng(str(volume_id), seed).integers(len(REPORT_PROMPTS)))])


def question_prompt(question: str, choices: dict[str, str] | None = None) -> str:
    """The prompt for a request or question; with choices (letter -> text) M3D's " Q Choices: A. .. D. ..".

    Idempotent on the leading space, so a report request and a question go through the same rule."""
    question = question.strip()
    if not choices:
        return f" {question}"
    return f" {question} Choices: " + " ".join(f"{letter}. {text}" for letter, text in choices.items())


def closed_prompt(q: dict) -> tuple[str, str]:
    """(prompt, target) of a closed question. "NA" is a real option text in M3D-VQA and stays; only a missing
    choice is left out."""
    choices = {l: q["choice_" + l.lower()] for l in LETTERS if q["choice_" + l.lower()] not in ("", None)}
    return question_prompt(q["question"], choices), f" {q['answer_choice']}. {q['answer']}"


def open_prompt(q: dict) -> tuple[str, str]:
    return question_prompt(q["question"]), f" {q['answer']}"


@lru_cache(maxsize=4)
def vlm_tokenizer(llm: str):
    """The LLM's tokenizer plus `<im_patch>`; BERT-style vocabularies (tiny) get [SEP] as EOS. Cached per name."""
    from med3dvlm.models.clip import load_tokenizer

    return add_vlm_tokens(load_tokenizer(llm))


def add_vlm_tokens(tok):
    """`<im_patch>` added, and for a BERT-style vocabulary [SEP] as EOS and a pad token: in place; returns `tok`."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_batch(examples: list[tuple[list[int], list[int]]], pad: int, left_pad: bool = False) -> dict:
    """`encode_example` outputs as tensors: input_ids padded with `pad`, labels with -100, and the attention mask."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids_t = torch.full((len(examples), width), pad, dtype=torch.long)
    lab_t = torch.full((len(examples), width), -100, dtype=torch.long)
    att_t = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        sl = slice(width - len(ids), width) if left_pad else slice(0, len(ids))
        ids_t[i, sl], lab_t[i, sl], att_t[i, sl] = torch.tensor(ids), torch.tensor(labels), 1
    return {"input_ids": ids_t, "attention_mask": att_t, "labels": lab_t}


SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


def trim_padding(batch: dict, multiple: int = 8) -> dict:
    """A right-padded batch cut after its longest sequence (rounded up to `multiple`, as HF's `pad_to_multiple_of`):
    the rows are padded to the fixed `max_len` in the data feed, and every position past the last real token only
    costs compute (it is masked out of attention and has label -100). Other keys pass through unchanged."""
    att = batch["attention_mask"]
    width = att.shape[1]
    used = att.any(0).nonzero()
    last = int(used[-1]) + 1 if len(used) else 1
    keep = min(width, -(-last // multiple) * multiple)
    if keep == width:
        return batch
    return {k: v[:, :keep] if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def encode_example(tok, n_image: int, max_len: int, prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): placeholders + prompt (masked) + answer + EOS (learned); a cut answer gets no EOS."""
    head = [tok.convert_tokens_to_ids(IMAGE_TOKEN)] * n_image + tok(prompt, add_special_tokens=False)["input_ids"]
    if len(head) >= max_len:
        raise ValueError(f"prompt of {len(head)} tokens (image tokens included) exceeds max_len {max_len}")
    if answer is None:
        return head, [-100] * len(head)
    ans = (tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: max_len - len(head)]
    return head + ans, [-100] * len(head) + ans
