"""Lineage: which shards and which cases every export trained on, through its parent exports, and the evaluation's
refusal to score a model on a case it trained on (M3D's own issue #38 was such a leak).

    <export>/lineage.json  {"stage", "export", "shards", "shards_manifest", "split_field", "split", "cases",
                            "case_ids_sha256", "case_ids": [...], "parent_export", "parent": <the parent's record>}

The parent's record is copied in whole, so an export keeps its history when its parent is moved or deleted.
"""

from __future__ import annotations

import hashlib
import json

from med3dvlm import storage
from med3dvlm.runtime import UserError, sha256_json

FILE = "lineage.json"


def training_cases(cfg, shards: str) -> list[str]:
    """The case ids of the volumes a stage trains on (its split, less what `train.max_train_volumes` leaves out)."""
    from med3dvlm.data.shards import read_table

    t = read_table(shards, ["case_id"], split="train", split_field=cfg.train.split_field)
    if cfg.train.max_train_volumes > 0:
        t = t.slice(0, cfg.train.max_train_volumes)
    return sorted(set(t.column(0).to_pylist()))


def case_hash(cases: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(cases)).encode()).hexdigest()


def record(cfg, stage: int, shards: str, manifest: dict, export: str, init: str | None) -> dict:
    """A stage's lineage: its shards (path and manifest hash), its training cases and its parent's record."""
    cases = training_cases(cfg, shards)
    return {"stage": stage, "export": export, "shards": storage.absolute(shards),
            "shards_manifest": sha256_json(manifest), "split_field": cfg.train.split_field, "split": "train",
            "cases": len(cases), "case_ids_sha256": case_hash(cases), "case_ids": cases,
            "parent_export": storage.absolute(init) if init else None, "parent": read(init) if init else None}


def write(export: str, lineage: dict) -> None:
    storage.write_text(storage.join(export, FILE), json.dumps(lineage))


def read(export: str | None) -> dict | None:
    """An export's lineage record; None for one made without (the released weights, an import)."""
    f = storage.join(export, FILE) if export else None
    if not f or not storage.is_file(f):
        return None
    try:
        return json.loads(storage.read_text(f))
    except ValueError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None


def chain(lineage: dict | None) -> list[dict]:
    """The record and its ancestors', the model's own first."""
    out = []
    while lineage:
        out.append(lineage)
        lineage = lineage.get("parent")
    return out


def summary(lineage: dict | None) -> list[dict]:
    """The chain without its case lists: what run.json, summary.json and the evaluation's results carry."""
    return [{k: v for k, v in r.items() if k not in ("case_ids", "parent")} for r in chain(lineage)]


def check_overlap(model: str, shards: str, split_field: str, splits: list[str], allow: bool) -> dict:
    """The evaluated cases against every case the model (or an ancestor) trained on. An overlap is refused naming a
    case, or with `allow` recorded as a warning; returns {"lineage", "overlap", "warning"} for the results."""
    from med3dvlm.data.shards import read_table

    lineage = read(model)
    if lineage is None:
        return {"lineage": [], "overlap": None, "warning": f"{model} records no lineage: overlap with its training "
                                                             f"cases not checked"}
    t = read_table(shards, ["case_id", split_field])
    evaluated = {c for c, s in zip(t.column(0).to_pylist(), t.column(1).to_pylist()) if s in splits}
    shared, first = set(), None
    for r in chain(lineage):
        both = evaluated.intersection(r["case_ids"])
        if both and first is None:
            first = (min(both), r)
        shared |= both
    result = {"lineage": summary(lineage), "overlap": len(shared), "warning": None}
    if not shared:
        return result
    case, r = first
    what = (f"{len(shared)} of the {len(evaluated)} evaluated cases (e.g. case {case}) were trained on by stage "
            f"{r['stage']} ({r['export']}, {r['split_field']}=train)")
    if not allow:
        raise UserError(f"--model {model}: {what}; evaluate on cases it never saw (--split-field case_split) or pass "
                        f"--allow-overlap to score anyway")
    result["warning"] = f"NOT held out: {what}"
    return result
