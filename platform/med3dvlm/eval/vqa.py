"""Closed-ended VQA scoring (M3D-Bench's `eval_vqa` rules)."""

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


def by_type(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by question type (named as M3D-VQA names them), in type order."""
    groups: dict = {}
    for r in sorted(rows, key=lambda r: int(r["question_type"])):
        t = int(r["question_type"])
        groups.setdefault(QUESTION_TYPES.get(t, str(t)), []).append(r)
    return groups


def accuracy_by_type(rows: list[dict]) -> dict:
    """Per question type accuracy and the unweighted mean over types, for both rules."""
    out = {}
    groups = by_type(rows)
    for rule in ("lenient", "strict"):
        per = {name: sum(int(r[rule]) for r in sel) / len(sel) for name, sel in groups.items()}
        out[rule] = {"per_type": per, "mean": sum(per.values()) / max(len(per), 1)}
    out["n"] = len(rows)
    return out
