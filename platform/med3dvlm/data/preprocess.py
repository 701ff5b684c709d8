"""The preprocessing run: raw data -> Parquet shards + manifest.json, one Ray Data task per shard.

The driver builds the manifest (folder listing, JSON/CSV parsing) and the shard plan; each shard is one task that
reads, transforms and writes its volumes. Finished shards are skipped on a re-run. count(inputs) == count(rows) +
count(quarantined), always.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

from med3dvlm import storage
from med3dvlm.data.manifest import ManifestError, build_manifest, case_split
from med3dvlm.data.plan import plan_shards
from med3dvlm.runtime import UserError, init_ray, sha256_json, write_run_json


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
    specs = plan_shards(items, cfg, out)
    log(f"[preprocess] {len(items)} inputs, {sum(1 for i in items if i.error)} unusable before reading, "
        f"{len(specs)} shards of up to {cfg.data.rows_per_shard} volumes -> {out}")
    _delete_stale_shards(out, len(specs))
    results, peak = _run_shards(specs, started, log)
    manifest = _manifest(cfg, raw, items, qa_quarantine, results)
    text = json.dumps(manifest, indent=1)
    storage.write_text(storage.join(out, "manifest.json"), text)
    manifest = json.loads(text)
    wall = time.time() - started
    rows = manifest["counts"]["rows"]
    figures = {"wall_s": round(wall, 2), "volumes_per_s": round(len(items) / wall, 2),
               "bytes_per_volume": round(sum(r["bytes"] for r in results) / max(rows, 1)),
               "skipped_shards": sum(r["skipped"] for r in results), "worker_peak_rss_mb": round(peak)}
    write_run_json(out, cfg, {"raw": str(raw), **manifest["inputs"]["manifest_files"]}, figures, started)
    manifest["figures"] = figures  # for callers; not in manifest.json, which stays byte-stable
    return manifest


def _delete_stale_shards(out: str, n_specs: int) -> None:
    """Shards from an earlier run with more shards must not be read back."""
    from med3dvlm.data.shards import list_shards

    for p in list_shards(out):
        if int(p.rsplit("/", 1)[-1][len("part-"):-len(".parquet")]) >= n_specs:
            storage.delete(p)


def _run_shards(specs: list[dict], started: float, log) -> tuple[list[dict], float]:
    import ray.data

    from med3dvlm.data.shards import process_shard

    if not specs:
        return [], 0.0
    init_ray()
    results, peak = [], 0.0
    ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map(process_shard, num_cpus=1)
    for r in ds.iter_rows():
        peak = max(peak, r.pop("worker_peak_rss_mb", 0.0))
        results.append(r)
        rate = sum(x["inputs"] for x in results) / max(time.time() - started, 1e-9)
        log(f"[preprocess] {r['shard']}: {r['rows']} rows, {len(r['quarantine'])} quarantined"
            f"{' (unchanged, skipped)' if r['skipped'] else ''}  [{len(results)}/{len(specs)} shards, {rate:.1f} vol/s]")
    return sorted(results, key=lambda r: r["shard"]), peak


def _manifest(cfg, raw: str, items, qa_quarantine: list[dict], results: list[dict]) -> dict:
    quarantine = [{"input": it.key, "volume_id": it.volume_id, "reason": it.error} for it in items if it.error]
    quarantine += [q for r in results for q in r["quarantine"]]
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


def summary(manifest: dict) -> str:
    """The counts of a run, then each quarantined input with its reason."""
    c = manifest["counts"]
    lines = [f"inputs {c['inputs']} = rows {c['rows']} + quarantined {c['quarantined']}  ({c['shards']} shards, "
             f"{c['cases']} cases)", f"official split: {c['split']}", f"case split:     {c['case_split']}",
             f"questions: {c['qa_rows']} attached, {c['qa_quarantined']} quarantined"]
    lines += [f"  quarantined: {q['reason']}" for q in manifest["quarantine"]]
    return "\n".join(lines)
