"""Shard planning: which volumes go into which shard, decided on the driver from the manifest alone.

A volume's shard is a stable function of its case: all series of a case share one shard, and a case keeps the
shard it was given by the previous run (recorded in `<out>/_state/plan.json`). Cases new to a run are packed, in
the order of a hash of their id, into new shards appended after the existing ones. So adding cases touches only new
shards, removing a case re-processes only its shard, and a re-run with no change plans the same shards (which are
then skipped). The first run packs every case that way, `rows_per_shard` volumes to a shard (a case is never split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from med3dvlm import storage
from med3dvlm.data.manifest import Item, case_split
from med3dvlm.runtime import sha256_json

PLAN_FILE = "_state/plan.json"


def load_assignment(out: str) -> dict[str, int]:
    """case id -> shard index from the previous run in `out` ({} for a new folder)."""
    f = storage.join(out, PLAN_FILE)
    return storage.read_json(f)["cases"] if storage.is_file(f) else {}


def save_assignment(out: str, assignment: dict[str, int]) -> None:
    storage.write_text(storage.join(out, PLAN_FILE), json.dumps({"cases": assignment}, sort_keys=True))


def assign_cases(sizes: dict[str, int], previous: dict[str, int], rows_per_shard: int,
                 min_shards: int = 1) -> dict[str, int]:
    """case id -> shard index: known cases keep theirs; new ones fill new shards after the highest one in use, at
    most `rows_per_shard` volumes each and small enough that they make at least `min_shards` shards (one per core
    that will work on them) when there are that many cases."""
    out = {c: previous[c] for c in sizes if c in previous}
    new = sorted((c for c in sizes if c not in previous), key=lambda c: hashlib.sha1(c.encode()).hexdigest())
    per_shard = min(rows_per_shard, max(1, -(-sum(sizes[c] for c in new) // max(min_shards, 1))))
    shard, fill = max(previous.values(), default=-1) + 1, 0
    for c in new:
        if fill and fill + sizes[c] > per_shard:
            shard, fill = shard + 1, 0
        out[c] = shard
        fill += sizes[c]
    return out


def plan_shards(items: list[Item], cfg, out: str, previous: dict[str, int] | None = None, min_shards: int = 1):
    """(shard specs for `data.shards.process_shard`, the case -> shard assignment to record).

    Each spec carries a hash of its data config and items: a finished shard with the same hash is skipped."""
    from med3dvlm.data.shards import FORMAT

    data = dataclasses.asdict(cfg.data)
    ok = [it for it in items if not it.error]
    sizes: dict[str, int] = {}
    for it in ok:
        sizes[it.case_id] = sizes.get(it.case_id, 0) + 1
    assignment = assign_cases(sizes, previous or {}, cfg.data.rows_per_shard, min_shards)
    by_shard: dict[int, list[dict]] = {}
    for it in sorted(ok, key=lambda it: it.volume_id):
        d = dataclasses.asdict(it)
        d.pop("error")
        d["case_split"] = case_split(it.case_id, cfg.data.case_split)
        by_shard.setdefault(assignment[it.case_id], []).append(d)
    specs = [{"index": i, "out": str(out), "items": rows, "data": data,
              "spec_hash": sha256_json({"data": data, "items": rows, "format": FORMAT})}
             for i, rows in sorted(by_shard.items())]
    return specs, assignment
