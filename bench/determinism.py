"""Does `make demo` print the same table twice on one machine? Runs the demo command (`python -m pipelines.demo`)
`--runs` times, each in a fresh process with its own Ray and its own output folder, then compares each run's verdict
table (rendered by the demo's own `print_table` from its summary.json), its figures at full precision and the stage
exports' bytes. Writes bench/results/determinism.md; `--compare-only` compares runs already in `--out`.

    .venv/bin/python bench/determinism.py [--runs 2] [--cases 120] [--out out/determinism]

Run it on a quiet machine: it measures whether the same seed gives the same numbers, not how fast.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import ROOT, write_markdown  # noqa: E402

EXPORTS = ("stage1", "stage2", "stage3")


def table(summary: dict) -> list[str]:
    """The verdict table as the demo prints it, rendered by the demo's own function from the run's summary.json
    (the line that says how long the check took is left out: a wall time, not a figure)."""
    from med3dvlm.demo import print_table

    lines: list[str] = []
    print_table(summary["heldout"], summary["targets"], 0, lambda s: lines.extend(str(s).splitlines()))
    return [x for x in lines if x and not x.startswith("[demo] held-out check")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def one_run(out: Path, cases: int, run: bool = True) -> dict:
    """Run the demo command into `out` (or, with run=False, read a finished run there) and what it produced."""
    if run:
        r = subprocess.run([sys.executable, "-m", "pipelines.demo", "--out", str(out), "--cases", str(cases)],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the demo failed (exit {r.returncode}): {r.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    run_json = json.loads((out / "run.json").read_text())
    return {"seconds": round(run_json["wall_s"]), "commit": run_json["git_sha"][:7], "table": table(summary),
            "figures": {row["name"]: row["value"] for row in summary["targets"]},
            "exports": {s: digest(out / "ckpt" / s / "model.safetensors") for s in EXPORTS}}


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--runs", type=int, default=2)
    a.add_argument("--cases", type=int, default=120)
    a.add_argument("--out", default="out/determinism")
    a.add_argument("--results", default=None, help="default bench/results/determinism.md")
    a.add_argument("--compare-only", action="store_true", help="compare the runs already in --out (run1, run2, ...)")
    args = a.parse_args(argv)
    runs = []
    for i in range(args.runs):
        runs.append(one_run(Path(args.out) / f"run{i + 1}", args.cases, run=not args.compare_only))
        print(f"run {i + 1}: {runs[-1]['seconds']} s, {runs[-1]['figures']}", flush=True)
    same_table = all(r["table"] == runs[0]["table"] and r["figures"] == runs[0]["figures"] for r in runs)
    same_exports = {s: all(r["exports"][s] == runs[0]["exports"][s] for r in runs) for s in EXPORTS}
    lines = [f"{args.runs} runs of `python -m pipelines.demo --cases {args.cases}`, each a fresh process with its own "
             f"local Ray: the printed table and its figures (to the last bit) are "
             f"**{'the same' if same_table else 'NOT the same'}** in every run.", "",
             "| run | commit | demo wall (s) | " + " | ".join(runs[0]["figures"]) + " | " + " | ".join(f"{s} sha256" for s in EXPORTS)
             + " |", "|---" * (3 + len(runs[0]["figures"]) + len(EXPORTS)) + "|"]
    for i, r in enumerate(runs):
        lines.append(f"| {i + 1} | {r['commit']} | {r['seconds']} | " + " | ".join(f"{v:.4f}" for v in r["figures"].values()) + " | "
                     + " | ".join(f"`{r['exports'][s]}`" for s in EXPORTS) + " |")
    lines += ["", "Exports identical across runs: " + ", ".join(f"{s} {'yes' if ok else 'no'}"
                                                             for s, ok in same_exports.items()),
              "", "The table as the first run printed it (the demo's `print_table`, without the line of seconds):", "",
              *runs[0]["table"]]
    if not same_table:
        for i, r in enumerate(runs[1:], 2):
            lines += ["", f"Run {i} printed:", "", *r["table"]]
    f = write_markdown("determinism", "The demo twice: the same table?", "\n".join(lines),
                       Path(args.results) if args.results else None)
    print(f"-> {f}")
    return 0 if same_table else 1


if __name__ == "__main__":
    sys.exit(main())
