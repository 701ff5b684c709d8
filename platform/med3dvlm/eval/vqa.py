"""Closed-ended VQA scoring (research/m3d.md 4.3) and batched answering with the VLM."""

from __future__ import annotations

import re

import torch

from med3dvlm.data.manifest import QUESTION_TYPES
from med3dvlm.data.samples import closed_prompt


def lenient_correct(pred: str, letter: str, ignore_case: bool = False) -> bool:
    """The paper's rule: "<letter>." anywhere in the output counts."""
    return f"{letter}." in (pred.upper() if ignore_case else pred)


def strict_correct(pred: str, letter: str, ignore_case: bool = False) -> bool:
    """The first choice letter the output names (e.g. "B" of "B. Liver") must be the answer."""
    m = re.search(r"\b([ABCD])\b", pred.upper() if ignore_case else pred)
    return bool(m) and m.group(1) == letter


def lowercases(tokenizer) -> bool:
    """An uncased vocabulary (the tiny config's BERT WordPiece) can never write "B.": score case-insensitively."""
    return tokenizer.decode(tokenizer("B.", add_special_tokens=False)["input_ids"]).strip() != "B."


def accuracy_by_type(rows: list[dict]) -> dict:
    """Per question type accuracy and the unweighted mean over types, for both rules."""
    out = {}
    for rule in ("lenient", "strict"):
        per = {}
        for t in sorted({r["question_type"] for r in rows}):
            sel = [r[rule] for r in rows if r["question_type"] == t]
            per[QUESTION_TYPES.get(t, str(t))] = sum(sel) / len(sel)
        out[rule] = {"per_type": per, "mean": sum(per.values()) / max(len(per), 1)}
    out["n"] = len(rows)
    return out


@torch.no_grad()
def answer_closed(vlm, volumes: torch.Tensor, qa_lists: list[list[dict]], max_new_tokens: int = 8) -> list[dict]:
    """Ask every closed (non yes/no) question of each volume; returns one scored row per question."""
    vlm.eval()
    rows, nocase = [], lowercases(vlm.tokenizer)
    for vol, qas in zip(volumes, qa_lists):
        qs = [q for q in qas if not q["yes_no"]]
        if not qs:
            continue
        prompts = [closed_prompt(q)[0] for q in qs]
        preds = vlm.generate(vol.unsqueeze(0).unsqueeze(0).float().expand(len(qs), -1, -1, -1, -1), prompts, max_new_tokens)
        for q, p in zip(qs, preds):
            rows.append({"question_type": int(q["question_type"]), "question": q["question"], "answer_choice": q["answer_choice"],
                         "pred": p, "lenient": lenient_correct(p, q["answer_choice"], nocase),
                         "strict": strict_correct(p, q["answer_choice"], nocase)})
    return rows
