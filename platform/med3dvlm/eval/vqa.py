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


def named_correct(pred: str, answer: str) -> bool:
    """A diagnostic, not the benchmark's rule: the answer's text appears in the output, whatever letter precedes it
    (letters, case, spaces and punctuation ignored: an uncased WordPiece decodes "Non-contrast" as "non - contrast").
    A model that looks at the image but has not learnt which letter its question gives that answer scores here."""
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    return bool(norm(answer)) and norm(answer) in norm(pred)


RULES = ("lenient", "strict", "named")  # the columns a scored closed-VQA sample carries


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
    """Per question type accuracy and the unweighted mean over types, for each rule the rows were scored by (a file
    scored before the `named` diagnostic existed has the two benchmark rules only)."""
    out = {}
    groups = by_type(rows)
    for rule in (r for r in RULES if rows and r in rows[0]):
        per = {name: sum(int(r[rule]) for r in sel) / len(sel) for name, sel in groups.items()}
        out[rule] = {"per_type": per, "mean": sum(per.values()) / max(len(per), 1)}
    out["n"] = len(rows)
    return out
