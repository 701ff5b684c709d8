"""The data path at the paper's count: 120,000 series (M3D-Cap's size) with a 500,000-row VQA CSV, through
`pipelines.preprocess` as a user runs it, then the same tree with 1% more cases and one case removed, then a run
killed mid-way and resumed. Slices are tiny (4 PNGs of 16x16) so the figures are about the machinery, not pixels.

    .venv/bin/python bench/scale.py [--series 120000] [--qa 500000] [--work /tmp/m3d-scale] [--keep] [--first-only]

Prints, and writes to bench/results/scale.json under `at_<series>_series` (with the date, the machine from lscpu,
the commit, the command, and the VQA rows it wrote): tree writing time; manifest build + shard planning time; the whole
command's wall time, volumes/s and the driver's peak RSS; Ray tasks (= shards); manifest.json and run.json sizes;
terminal lines; shards re-processed after +1% cases and after removing one case; kill-and-resume (shards redone,
byte-identical result).
"""

import argparse
import csv
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import commit, machine, write_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "data.shape=[4,16,16]"


def slice_pngs() -> list[bytes]:
    out = []
    for k in range(4):
        yy, xx = np.mgrid[:16, :16]
        arr = ((yy * 7 + xx * 3 + 20 * k) % 200 + 20).astype(np.uint8)
        arr[:2] = 0  # a border the foreground crop removes
        b = io.BytesIO()
        Image.fromarray(arr).save(b, format="PNG")
        out.append(b.getvalue())
    return out


def case_of(i: int) -> str:
    return f"{i // 2:06d}"  # two series per case


def write_tree(root: Path, series: int, qa: int, start: int = 0) -> int:
    """M3D layout: M3D_Cap/ct_case/<case>/<Series>/<n>.png, text.txt per case, M3D_Cap.json, M3D_VQA_train.csv with
    `qa` rows in all, spread over the series; returns the VQA rows written."""
    pngs = slice_pngs()
    entries = []
    for i in range(start, series):
        case = root / "M3D_Cap" / "ct_case" / case_of(i)
        folder = case / ("Axial" if i % 2 == 0 else "Coronal")
        folder.mkdir(parents=True, exist_ok=True)
        for k, b in enumerate(pngs):
            (folder / f"{k}.png").write_bytes(b)
        if i % 2 == 0:
            (case / "text.txt").write_text(f"study_findings: synthetic case {case_of(i)} with a small lesion.\n")
        entries.append({"image": f"M3D_Cap_npy/ct_case/{case_of(i)}/{folder.name}.npy",
                        "text": f"M3D_Cap_npy/ct_case/{case_of(i)}/text.txt"})
    cap_f = root / "M3D_Cap.json"
    cap = json.loads(cap_f.read_text()) if cap_f.is_file() else {"train": [], "validation": [], "test": []}
    cap["train"] += entries
    cap_f.write_text(json.dumps(cap))
    with open(root / "M3D_VQA_train.csv", "a" if start else "w", newline="") as f:
        w = csv.writer(f)
        if not start:
            w.writerow(["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
                        "Choice D", "Answer", "Answer Choice"])
        n, written = series - start, 0
        for j, e in enumerate(entries):
            for q in range(qa // n + (1 if j < qa % n else 0)):  # exactly `qa` rows
                w.writerow([e["image"], "t", q % 5 + 1, f"Question {q}?", "Liver", "Spleen", "Kidney", "Lung",
                            "Liver", "A"])
                written += 1
    return written


def run_preprocess(raw: Path, out: Path, kill_after_shards: int = 0) -> dict:
    """`python -m pipelines.preprocess` as a user runs it; the child's peak RSS is the driver's."""
    cmd = [sys.executable, "-m", "pipelines.preprocess", "--config", "tiny", "--raw", str(raw), "--out", str(out),
           SHAPE, "data.rows_per_shard=64"]
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp")}
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(x.rstrip() for x in p.stdout), daemon=True)
    reader.start()
    while kill_after_shards and p.poll() is None:
        if len(list((out / "_state").glob("part-*.json"))) >= kill_after_shards:
            os.killpg(p.pid, signal.SIGKILL)  # the driver and its Ray: as a node loss or Ctrl-\ would
            break
        time.sleep(0.05)
    p.wait()
    reader.join(timeout=30)
    wall = time.time() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": round(wall, 1), "rc": p.returncode, "lines": lines, "children_peak_rss_mb": round(rss)}


def figures(res: dict, out: Path) -> dict:
    text = "\n".join(res["lines"])
    plan = re.search(r"manifest and plan in ([\d.]+) s", text)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    return {"wall_s": res["wall_s"], "manifest_and_plan_s": float(plan[1]) if plan else None,
            "driver_peak_rss_mb": run.get("figures", {}).get("driver_peak_rss_mb"),
            "volumes": man.get("counts", {}).get("inputs"), "rows": man.get("counts", {}).get("rows"),
            "shards_tasks": man.get("counts", {}).get("shards"),
            "processed_shards": run.get("figures", {}).get("processed_shards"),
            "volumes_per_s": run.get("figures", {}).get("volumes_per_s"),
            "manifest_json_bytes": (out / "manifest.json").stat().st_size if man else None,
            "run_json_bytes": (out / "run.json").stat().st_size if run else None,
            "terminal_lines": len(res["lines"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=120_000)
    ap.add_argument("--qa", type=int, default=500_000)
    ap.add_argument("--work", default="/tmp/m3d-scale")
    ap.add_argument("--keep", action="store_true", help="keep the tree and shards")
    ap.add_argument("--first-only", action="store_true", help="only the first run (the machinery at this count)")
    ap.add_argument("--results", default=None, help="default bench/results/scale.json (scale.md beside it)")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    raw, out = work / "raw", work / "shards"
    t = time.time()
    written = write_tree(raw, a.series, a.qa)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "commit": commit(),
              "command": " ".join([".venv/bin/python", "bench/scale.py", *sys.argv[1:]]), "series": a.series,
              "qa_rows_asked": a.qa, "qa_rows_written": written, "write_tree_s": round(time.time() - t, 1)}
    print(f"[scale] tree of {a.series} series, {written} VQA rows written in {result['write_tree_s']} s", flush=True)
    first = run_preprocess(raw, out)
    result["first_run"] = figures(first, out)
    print("[scale] first run:", json.dumps(result["first_run"]), flush=True)
    print("\n".join(first["lines"][-12:]))
    if a.first_only:
        return save(result, work, a.keep, a.results)
    again = run_preprocess(raw, out)
    result["rerun_no_change"] = figures(again, out)
    kill_dir = work / "killed"  # the same tree, a run killed after a third of its shards, then resumed
    killed = run_preprocess(raw, kill_dir, kill_after_shards=max(2, result["first_run"]["shards_tasks"] // 3))
    resumed = run_preprocess(raw, kill_dir)
    result["kill_and_resume"] = {"killed_rc": killed["rc"], "resumed": figures(resumed, kill_dir),
                                 "identical_to_uninterrupted": _same_tree(out, kill_dir)}
    shutil.rmtree(kill_dir, ignore_errors=True)
    extra = a.series // 100
    write_tree(raw, a.series + extra, a.qa // 100, start=a.series)  # +1% series (new cases), +1% of the VQA rows
    result["plus_1pct_cases"] = figures(run_preprocess(raw, out), out)
    shutil.rmtree(raw / "M3D_Cap" / "ct_case" / case_of(10))  # one case removed
    result["minus_one_case"] = figures(run_preprocess(raw, out), out)
    for k in ("rerun_no_change", "plus_1pct_cases", "minus_one_case"):
        print(f"[scale] {k}: processed {result[k]['processed_shards']} of {result[k]['shards_tasks']} shards, "
              f"{result[k]['wall_s']} s", flush=True)
    print("[scale] kill and resume:", json.dumps(result["kill_and_resume"]))
    save(result, work, a.keep, a.results)


def save(result: dict, work: Path, keep: bool, results: str | None = None) -> None:
    """bench/results/scale.json: this run's row under its series count; the other counts' rows are kept when this
    script wrote them (they carry its provenance). bench/results/scale.md: every row, rendered."""
    f = Path(results) if results else ROOT / "bench" / "results" / "scale.json"
    rows = json.loads(f.read_text()) if f.is_file() else {}
    rows = {k: v for k, v in rows.items() if k.startswith("at_") and {"date", "machine", "commit"} <= set(v)}
    rows[f"at_{result['series']}_series"] = result
    f.write_text(json.dumps(rows, indent=1))
    write_markdown("scale", "The data path at M3D's count", "\n".join(markdown(rows)), f.with_suffix(".md"))
    print(f"-> {f} and scale.md")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


RUNS = (("first_run", "first run"), ("rerun_no_change", "re-run, nothing changed"),
        ("plus_1pct_cases", "re-run, 1% more cases"), ("minus_one_case", "re-run, one case removed"))


def markdown(rows: dict) -> list[str]:
    """Each series count's run: its provenance, then one line per command it ran."""
    out = ["`pipelines.preprocess` as a user runs it, on M3D-layout trees of tiny slices (4 PNGs of 16x16: the "
           "machinery, not pixels). Each row below was written by this script; its own date, machine, commit and "
           "command are above its table."]
    for key, r in sorted(rows.items(), key=lambda kv: kv[1]["series"]):
        out += ["", f"### {r['series']:,} series, {r.get('qa_rows_written', 0):,} VQA rows", "",
                f"{r['date']}, {r['machine']}, commit {r['commit']}: `{r['command']}`; tree written in "
                f"{r['write_tree_s']} s.", "",
                "| run | manifest + plan (s) | whole command (s) | volumes/s | driver peak RSS (MiB) | shards "
                "processed / planned | terminal lines |", "|---|--:|--:|--:|--:|--:|--:|"]
        for k, name in RUNS:
            if k in r:
                x = r[k]
                out.append(f"| {name} | {x['manifest_and_plan_s']} | {x['wall_s']} | {x['volumes_per_s']} | "
                           f"{x['driver_peak_rss_mb']} | {x['processed_shards']} / {x['shards_tasks']} | "
                           f"{x['terminal_lines']} |")
        if "kill_and_resume" in r:
            k = r["kill_and_resume"]
            out += ["", f"Killed mid-run (exit {k['killed_rc']}) and run again: {k['resumed']['processed_shards']} "
                    f"shards redone; the result byte-identical to an uninterrupted run: "
                    f"{'yes' if k['identical_to_uninterrupted'] else 'NO'}."]
    return out


def _same_tree(a: Path, b: Path) -> bool:
    """Every shard byte-identical, and the same manifest."""
    fa, fb = sorted((a / "volumes").glob("*.parquet")), sorted((b / "volumes").glob("*.parquet"))
    if [f.name for f in fa] != [f.name for f in fb]:
        return False
    same = all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    return same and (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


if __name__ == "__main__":
    main()
