"""Evaluation outputs: per-sample CSV rows written as they arrive, and the markdown report."""

from __future__ import annotations

import csv
from pathlib import Path

def done_keys(csv_path: Path, resume: bool) -> set:
    """Keys already scored in `csv_path` (resume), or none (and the old file removed)."""
    if not csv_path.is_file():
        return set()
    if not resume:
        csv_path.unlink()
        return set()
    return {r["key"] for r in read_rows(csv_path)}


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class SampleWriter:
    """Appends scored rows to samples.csv and flushes after every batch."""

    def __init__(self, path: Path, columns: list[str]):
        new = not path.is_file()
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=columns, extrasaction="ignore")
        if new:
            self.w.writeheader()
        self.n = 0

    def write(self, rows: list[dict]) -> None:
        self.w.writerows(rows)
        self.f.flush()
        self.n += len(rows)

    def close(self):
        self.f.close()


def markdown(task, res: dict, shards: str, split_field: str, split: str, model: str, sample: bool) -> str:
    """results.md: the task's table, its baselines, the paper's figure and the sample count."""
    lines = [f"# {task.name} on {shards} ({split_field}={split}), model {model}", ""]
    lines += task.table(res)
    lines += task.baseline_lines(res["baselines"]) if res.get("baselines") else []
    name, ours, lamed = task.paper
    lines += ["", f"Paper ({name}): Med3DVLM {100 * ours:.2f}, M3D-LaMed {100 * lamed:.2f}.", task.footer(res, sample)]
    return "\n".join(lines) + "\n"
