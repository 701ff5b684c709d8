"""Shard planning: which volumes go into which shard, decided on the driver from the manifest alone."""

from __future__ import annotations

import dataclasses

from med3dvlm.data.manifest import Item, case_split
from med3dvlm.runtime import sha256_json


def plan_shards(items: list[Item], cfg, out: str) -> list[dict]:
    """Shard specs for `data.shards.process_shard`: the usable items sorted by volume id, `rows_per_shard` per shard.

    Each spec carries a hash of its data config and items: a finished shard with the same hash is skipped."""
    data = dataclasses.asdict(cfg.data)
    rows = []
    for it in sorted((it for it in items if not it.error), key=lambda it: it.volume_id):
        d = dataclasses.asdict(it)
        d.pop("error")
        d["case_split"] = case_split(it.case_id, cfg.data.case_split)
        rows.append(d)
    n = cfg.data.rows_per_shard
    specs = []
    for i in range(0, len(rows), n):
        chunk = rows[i:i + n]
        specs.append({"index": i // n, "out": str(out), "items": chunk, "data": data,
                      "spec_hash": sha256_json({"data": data, "items": chunk})})
    return specs
