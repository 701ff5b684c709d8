"""Raw M3D-style data (or a folder of volumes + reports) -> Parquet shards + manifest.json, on Ray Data.

    python -m pipelines.preprocess --config m3d --raw /data/M3D --out /data/shards
    python -m pipelines.preprocess --config m3d --raw s3://bucket/M3D --out s3://bucket/shards

The driver builds the manifest (cheap: folder listing, JSON/CSV parsing); each shard is one Ray Data task that reads,
transforms and writes its volumes. Finished shards are skipped on a re-run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from med3dvlm import storage
from med3dvlm.data.manifest import ManifestError, build_manifest, case_split
from pipelines.common import UserError, config_from_args, init_ray, parser, run_main, sha256_json, write_run_json


def plan_shards(items, cfg, out: str) -> list[dict]:
    data = dataclasses.asdict(cfg.data)
    ok = sorted((it for it in items if not it.error), key=lambda it: it.volume_id)
    rows = []
    for it in ok:
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


def preprocess(cfg, raw: str | Path, out: str | Path, log=print) -> dict:
    import ray.data

    from med3dvlm.data.shards import list_shards, process_shard

    raw, out = storage.absolute(raw), storage.absolute(out)
    started = time.time()
    try:
        items, qa_quarantine = build_manifest(raw, cfg.data.case_split)
    except ManifestError as e:
        raise UserError(str(e)) from None
    specs = plan_shards(items, cfg, out)
    log(f"[preprocess] {len(items)} inputs, {sum(1 for i in items if i.error)} unusable before reading, "
        f"{len(specs)} shards of up to {cfg.data.rows_per_shard} volumes -> {out}")
    # stale shards from a run with more shards must not be read back
    for p in list_shards(out):
        if int(p.rsplit("/", 1)[-1][len("part-"):-len(".parquet")]) >= len(specs):
            storage.delete(p)
    init_ray()
    results = []
    peak = 0.0
    if specs:
        ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map(process_shard, num_cpus=1)
        for r in ds.iter_rows():
            peak = max(peak, r.pop("worker_peak_rss_mb", 0.0))
            results.append(r)
            done = sum(x["inputs"] for x in results)
            rate = done / max(time.time() - started, 1e-9)
            log(f"[preprocess] {r['shard']}: {r['rows']} rows, {len(r['quarantine'])} quarantined"
                f"{' (unchanged, skipped)' if r['skipped'] else ''}  [{len(results)}/{len(specs)} shards, {rate:.1f} vol/s]")
    results.sort(key=lambda r: r["shard"])
    quarantine = [{"input": it.key, "volume_id": it.volume_id, "reason": it.error} for it in items if it.error]
    quarantine += [q for r in results for q in r["quarantine"]]
    bad_ids = {q["volume_id"] for q in quarantine}
    written = [it for it in items if it.volume_id not in bad_ids]
    rows = sum(r["rows"] for r in results)
    if rows + len(quarantine) != len(items):
        raise RuntimeError(f"count mismatch: {len(items)} inputs != {rows} rows + {len(quarantine)} quarantined")
    qa_in = sum(len(it.qa) for it in items) + len(qa_quarantine)
    manifest_inputs = {f.rsplit("/", 1)[-1]: storage.sha256(f) for f in
                       storage.list_files(raw, suffix=".json") + storage.list_files(raw, suffix=".csv")}
    manifest = {
        "config": dataclasses.asdict(cfg.data),
        "layout": "m3d" if storage.is_dir(storage.join(raw, "M3D_Cap")) or storage.is_file(storage.join(raw, "M3D_Cap.json")) else "generic",
        "counts": {
            "inputs": len(items), "rows": rows, "quarantined": len(quarantine), "shards": len(results),
            "split": dict(sorted(Counter(it.split for it in written).items())),
            "case_split": dict(sorted(Counter(case_split(it.case_id, cfg.data.case_split) for it in written).items())),
            "cases": len({it.case_id for it in written}),
            "qa_inputs": qa_in, "qa_rows": sum(len(it.qa) for it in written),
            "qa_quarantined": len(qa_quarantine),
            "qa_on_quarantined_volumes": sum(len(it.qa) for it in items if it.volume_id in bad_ids),
        },
        "inputs": {"manifest_files": manifest_inputs, "shards_input_fp": sha256_json([r["input_fp"] for r in results])},
        "outputs": {r["shard"]: {"sha256": r["sha256"], "rows": r["rows"], "bytes": r["bytes"]} for r in results},
        "quarantine": sorted(quarantine, key=lambda q: q["input"]) + qa_quarantine,
    }
    text = json.dumps(manifest, indent=1)
    storage.write_text(storage.join(out, "manifest.json"), text)
    manifest = json.loads(text)
    wall = time.time() - started
    nbytes = sum(r["bytes"] for r in results)
    figures = {"wall_s": round(wall, 2), "volumes_per_s": round(len(items) / wall, 2),
               "bytes_per_volume": round(nbytes / max(rows, 1)), "skipped_shards": sum(r["skipped"] for r in results), "worker_peak_rss_mb": round(peak)}
    write_run_json(out, cfg, {"raw": str(raw), **manifest_inputs}, figures, started)
    manifest["figures"] = figures  # for callers; not in manifest.json, which stays byte-stable
    return manifest


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [f"inputs {c['inputs']} = rows {c['rows']} + quarantined {c['quarantined']}  ({c['shards']} shards, {c['cases']} cases)",
             f"official split: {c['split']}", f"case split:     {c['case_split']}",
             f"questions: {c['qa_rows']} attached, {c['qa_quarantined']} quarantined"]
    for q in manifest["quarantine"]:
        lines.append(f"  quarantined: {q['reason']}")
    return "\n".join(lines)


def arg_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--raw", required=True, help="raw data root (M3D layout, or volumes + reports.csv/json): a path or a "
                                                "URI (s3://bucket/M3D)")
    p.add_argument("--out", required=True, help="where volumes/part-*.parquet and manifest.json go: a path or a URI "
                                               "(s3://bucket/shards)")
    return p


def main(argv=None):
    args = arg_parser().parse_args(argv)
    cfg = config_from_args(args)
    if not storage.is_dir(args.raw):
        raise UserError(f"--raw {args.raw}: folder does not exist")
    manifest = preprocess(cfg, args.raw, args.out)
    print(summary(manifest))
    return manifest


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
