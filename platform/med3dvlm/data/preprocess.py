"""The preprocessing run: raw data -> Parquet shards + manifest.json, on Ray Data, one shard a task, one per core at a
time.

The driver builds the manifest (folder listing, JSON/CSV parsing) and the shard plan; the plan becomes a Ray Dataset
whose `map` reads, transforms and writes each shard's volumes. Finished shards are skipped on a re-run.
count(inputs) == count(rows) + count(quarantined), always.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import time
from collections import Counter

from med3dvlm import storage
from med3dvlm.data.manifest import ManifestError, build_manifest, case_split
from med3dvlm.data.plan import load_assignment, plan_shards, save_assignment
from med3dvlm.runtime import UserError, allocator_env, init_ray, sha256_json, task_cpus, write_run_json


def preprocess(cfg, raw, out, log=print) -> dict:
    """Preprocess `raw` (a path or URI, M3D or generic layout) into shards under `out`; returns the manifest."""
    raw, out = storage.absolute(raw), storage.absolute(out)
    if not storage.is_dir(raw):
        raise UserError(f"--raw {raw}: folder does not exist")
    started = time.time()
    try:
        items, qa_quarantine = build_manifest(raw, cfg.data.case_split)
    except ManifestError as e:
        raise UserError(str(e)) from None
    listed = time.time() - started
    per_task, slots = _task_slots() if any(not it.error for it in items) else (1.0, 1)
    t = time.time()
    specs, assignment = plan_shards(items, cfg, out, load_assignment(out), min_shards=slots)
    planned = listed + time.time() - t  # Ray's start-up is not part of it
    log(f"[preprocess] {len(items)} inputs, {sum(1 for i in items if i.error)} unusable before reading, "
        f"{len(specs)} shards of up to {cfg.data.rows_per_shard} volumes -> {out} (manifest and plan in {planned:.1f} s)")
    _delete_stale_shards(out, {s["index"] for s in specs})
    results, peak = _run_shards(specs, per_task, slots, started, log)
    _delete_partial_files(out)  # a worker killed while writing left its temporary file (never a final name)
    manifest = _manifest(cfg, raw, items, qa_quarantine, results)
    text = json.dumps(manifest, indent=1)
    save_assignment(out, assignment)
    storage.write_text(storage.join(out, "manifest.json"), text)
    manifest = json.loads(text)
    wall = time.time() - started
    rows = manifest["counts"]["rows"]
    skipped = sum(r["skipped"] for r in results)
    figures = {"wall_s": round(wall, 2), "manifest_and_plan_s": round(planned, 2),
               "volumes_per_s": round(len(items) / wall, 2),
               "bytes_per_volume": round(sum(r["bytes"] for r in results) / max(rows, 1)),
               "skipped_shards": skipped, "processed_shards": len(results) - skipped, "ray_tasks": len(specs),
               "worker_peak_rss_mb": round(peak),
               "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    write_run_json(out, cfg, {"raw": str(raw), **manifest["inputs"]["manifest_files"]}, figures, started)
    manifest["figures"] = figures  # for callers; not in manifest.json, which stays byte-stable
    return manifest


def _delete_stale_shards(out: str, planned: set[int]) -> None:
    """Shards of an earlier run that this plan no longer has (every case of theirs gone) must not be read back."""
    from med3dvlm.data.shards import list_shards

    for p in list_shards(out):
        name = p.rsplit("/", 1)[-1][:-len(".parquet")]
        if int(name[len("part-"):]) not in planned:
            storage.delete(p)
            storage.delete(storage.join(out, "_state", f"{name}.json"))


def _delete_partial_files(out: str) -> None:
    """The temporary files of shard tasks whose worker died mid-write (`shards.process_shard` writes a local shard
    as `.part-NNNNN-*.parquet.tmp` beside its final name and renames it whole)."""
    for p in storage.list_files(storage.join(out, "volumes"), ".part-", ".parquet.tmp"):
        storage.delete(p)


def _task_slots() -> tuple[float, int]:
    """(logical CPUs per shard task, tasks that run at once): one task per core, whatever Ray's logical count (a
    local Ray has twice the cores; four workers importing torch at once on two cores were slower than two)."""
    ray = init_ray()
    per_task = task_cpus()
    return per_task, max(1, int(ray.cluster_resources().get("CPU", 1.0) // per_task))


def _run_shards(specs: list[dict], per_task: float, slots: int, started: float, log) -> tuple[list[dict], float]:
    """The shard plan as a Ray Dataset, one row a shard, read + transform + write by a Ray Data `map` task each
    (`shards.process_shard_row`): Ray Data's streaming executor bounds what is in flight, places the tasks across the
    nodes, shows its progress, and retries a task whose worker died, so a killed worker's shard is done again (a
    shard is written under its final name only whole, and a redone shard is byte-identical). Results arrive as the
    shards end; our own line every 10 s at most (every shard for a small plan)."""
    import ray.data

    from med3dvlm.data.shards import process_shard_row

    plan = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs))
    done = plan.map(process_shard_row, num_cpus=per_task, compute=ray.data.TaskPoolStrategy(size=slots),
                    runtime_env={"env_vars": allocator_env()})  # Ray Data's tasks retry a dead worker's work
    results, peak, last = [], 0.0, 0.0
    for row in done.iter_rows():
        r = json.loads(row["result"])
        peak = max(peak, r.pop("worker_peak_rss_mb", 0.0))
        results.append(r)
        if len(specs) <= 20 or time.time() - last > 10 or len(results) == len(specs):  # a bounded number of lines
            last = time.time()
            rate = sum(x["inputs"] for x in results) / max(last - started, 1e-9)
            log(f"[preprocess] {len(results)}/{len(specs)} shards ({sum(x['skipped'] for x in results)} unchanged, "
                f"skipped), {sum(x['rows'] for x in results)} rows, "
                f"{sum(len(x['quarantine']) for x in results)} quarantined, {rate:.1f} vol/s")
    return sorted(results, key=lambda r: r["shard"]), peak


def _manifest(cfg, raw: str, items, qa_quarantine: list[dict], results: list[dict]) -> dict:
    quarantine = [{"input": it.key, "volume_id": it.volume_id, "reason": it.error} for it in items if it.error]
    # one key order for every entry, whether the shard ran now or was skipped (its state file sorts keys)
    quarantine += [{"input": q["input"], "volume_id": q["volume_id"], "reason": q["reason"]}
                   for r in results for q in r["quarantine"]]
    bad_ids = {q["volume_id"] for q in quarantine}
    written = [it for it in items if it.volume_id not in bad_ids]
    rows = sum(r["rows"] for r in results)
    if rows + len(quarantine) != len(items):
        raise RuntimeError(f"count mismatch: {len(items)} inputs != {rows} rows + {len(quarantine)} quarantined")
    m3d = storage.is_dir(storage.join(raw, "M3D_Cap")) or storage.is_file(storage.join(raw, "M3D_Cap.json"))
    manifest_files = {f.rsplit("/", 1)[-1]: storage.sha256(f) for f in
                      storage.list_files(raw, suffix=".json") + storage.list_files(raw, suffix=".csv")}
    return {
        "config": dataclasses.asdict(cfg.data), "layout": "m3d" if m3d else "generic",
        "counts": {
            "inputs": len(items), "rows": rows, "quarantined": len(quarantine), "shards": len(results),
            "split": dict(sorted(Counter(it.split for it in written).items())),
            "case_split": dict(sorted(Counter(case_split(it.case_id, cfg.data.case_split) for it in written).items())),
            "cases": len({it.case_id for it in written}),
            "qa_inputs": sum(len(it.qa) for it in items) + len(qa_quarantine),
            "qa_rows": sum(len(it.qa) for it in written), "qa_quarantined": len(qa_quarantine),
            "qa_on_quarantined_volumes": sum(len(it.qa) for it in items if it.volume_id in bad_ids),
        },
        "inputs": {"manifest_files": manifest_files, "shards_input_fp": sha256_json([r["input_fp"] for r in results])},
        "outputs": {r["shard"]: {"sha256": r["sha256"], "rows": r["rows"], "bytes": r["bytes"]} for r in results},
        "quarantine": sorted(quarantine, key=lambda q: q["input"]) + qa_quarantine,
    }


def reason_kind(reason: str) -> str:
    """A quarantine reason without its file names and details: what to count by ("cannot decode image")."""
    text = reason.rsplit(": ", 1)[-1] if ": " in reason else reason
    return re.sub(r"\s*\(.*", "", re.sub(r"line \d+", "line N", text)).strip() or reason


def summary(manifest: dict, examples: int = 3) -> str:
    """The counts of a run, then the quarantine by kind with the first few examples (the full list stays in
    manifest.json): bounded output at any scale."""
    c = manifest["counts"]
    lines = [f"inputs {c['inputs']} = rows {c['rows']} + quarantined {c['quarantined']}  ({c['shards']} shards, "
             f"{c['cases']} cases)", f"official split: {c['split']}", f"case split:     {c['case_split']}",
             f"questions: {c['qa_rows']} attached, {c['qa_quarantined']} quarantined"]
    kinds: dict[str, list[str]] = {}
    for q in manifest["quarantine"]:
        kinds.setdefault(reason_kind(q["reason"]), []).append(q["reason"])
    for kind, reasons in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  quarantined {len(reasons)} x {kind}, e.g.")
        lines += [f"    {r}" for r in reasons[:examples]]
    if kinds:
        lines.append("  (every quarantined input with its reason: manifest.json)")
    return "\n".join(lines)
