"""Closed-ended VQA scoring (research/m3d.md 4.3)."""

from __future__ import annotations

import re

from med3dvlm.data.manifest import QUESTION_TYPES


def lenient_correct(pred: str, letter: str, ignore_case: bool = False) -> bool:
    """The paper's rule: "<letter>." anywhere in the output counts."""
    return f"{letter}." in (pred.upper() if ignore_case else pred)


def first_choice(pred: str, ignore_case: bool = False) -> str | None:
    """The first choice letter the output names (e.g. "B" of "B. Liver"), or None."""
    m = re.search(r"\b([ABCD])\b", pred.upper() if ignore_case else pred)
    return m.group(1) if m else None


def strict_correct(pred: str, letter: str, ignore_case: bool = False) -> bool:
    """The first choice letter the output names must be the answer."""
    return first_choice(pred, ignore_case) == letter


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
