"""Evaluation outputs: per-sample CSV rows written as they arrive, their aggregation, and the markdown report."""

from __future__ import annotations

import csv
from pathlib import Path

PAPER = {  # published figures (Med3DVLM, M3D-LaMed), Tables 1-3 of arXiv 2503.20047; fractions
    "retrieval": ("R@1 at 2,000", 0.6100, 0.1910), "report": ("METEOR", 0.3642, 0.1438),
    "vqa-open": ("METEOR", 0.3676, 0.3358), "vqa-closed": ("accuracy (lenient mean)", 0.7995, 0.7578),
}
CSV_COLUMNS = {
    "retrieval": ["key", "volume_id", "report", "image_to_text_rank", "text_to_image_rank"],
    "text": ["key", "volume_id", "question_type", "question", "reference", "prediction", "bleu", "rouge1", "meteor",
             "bert_f1", "error"],
    "vqa-closed": ["key", "volume_id", "question_type", "question", "reference", "answer_choice", "prediction",
                   "lenient", "strict", "named", "error"],
}


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


def aggregate_closed(rows: list[dict]) -> dict:
    from med3dvlm.eval.vqa import accuracy_by_type

    return {"metrics": accuracy_by_type(rows), "n": len(rows)}


def aggregate_text(rows: list[dict], task: str, bert_label: str | None) -> dict:
    """Means over samples (the benchmark's average of per-sample scores); open VQA also per question type."""
    from med3dvlm.eval.vqa import by_type

    names = ["bleu", "rouge1", "meteor"] + (["bert_f1"] if bert_label else [])

    def means(sel):
        return {m: sum(float(r[m]) for r in sel) / len(sel) for m in names}

    res = {"metrics": means(rows), "n": len(rows)}
    if task == "vqa-open":
        res["per_type"] = {name: means(sel) for name, sel in by_type(rows).items()}
    if bert_label:
        res["bertscore_model"] = bert_label
    return res


def _retrieval_table(m: dict) -> list[str]:
    lines = ["| N | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for n, r in m.items():
        lines.append(f"| {n} | " + " | ".join(f"{100 * r[f'{d}_R@{k}']:.2f}" for d in ("image_to_text", "text_to_image")
                                              for k in (1, 5, 10)) + " |")
    return lines + ["", "image->text ranks reports per volume (the paper's \"IR\"); text->image ranks volumes per "
                        "report (\"TR\")."]


def _closed_table(m: dict) -> list[str]:
    types = list(m["lenient"]["per_type"])
    lines = ["| rule | " + " | ".join(types) + " | mean |", "|---|" + "--:|" * (len(types) + 1)]
    from med3dvlm.eval.vqa import RULES

    for rule in (r for r in RULES if r in m):
        lines.append(f"| {rule} | " + " | ".join(f"{100 * m[rule]['per_type'][t]:.2f}" for t in types)
                     + f" | {100 * m[rule]['mean']:.2f} |")
    return lines + ["", "lenient: \"<letter>.\" anywhere in the answer (the benchmark's rule); strict: the first choice "
                        "letter the answer names; named (a diagnostic, not the benchmark's): the answer's text appears, "
                        "whatever its letter."]


def _text_table(res: dict) -> list[str]:
    m = res["metrics"]
    names = list(m)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names),
             "| all | " + " | ".join(f"{100 * m[k]:.2f}" for k in names) + " |"]
    for t, v in res.get("per_type", {}).items():
        lines.append(f"| {t} | " + " | ".join(f"{100 * v[k]:.2f}" for k in names) + " |")
    return lines + (["", f"BERTScore model: {res['bertscore_model']}."] if "bertscore_model" in res else [])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _distinct(b: dict) -> list[str]:
    if "distinct" not in b:  # results written before it existed
        return []
    d = b["distinct"]
    return [f"Among the distinct reports (identical texts one answer; the table's M3D-Bench rule counts only the "
            f"diagonal): image->text R@1 {_pct(d['image_to_text_R@1'])} "
            f"({'-'.join(map(_pct, d['interval']))}), shuffled-image control {_pct(d['control_image_to_text_R@1'])}."]


def _baseline_lines(task: str, b: dict | None) -> list[str]:
    """What a model blind to its image would score, beside the intervals of the figures (95%)."""
    if not b:
        return []
    if task == "retrieval":
        c = b["control"]
        return ["", f"Baselines on all {b['n']} pairs: chance R@1 {_pct(b['chance_R@1'])} (a pick among the "
                f"{b['distinct_reports']} distinct reports); shuffled-image control image->text R@1 "
                f"{_pct(c.get('image_to_text_R@1', 0))}, text->image {_pct(c.get('text_to_image_R@1', 0))}; Wilson "
                f"interval of image->text R@1 {'-'.join(map(_pct, b['interval']['image_to_text_R@1']))}."] + _distinct(b)
    if task == "vqa-closed":
        m = b["majority"]
        return ["", f"Baselines: chance {_pct(b['chance'])}; per-type majority answer {_pct(m['mean'])} ("
                + ", ".join(f"{t} {v['letter']} {_pct(v['accuracy'])}" for t, v in m["per_type"].items())
                + f"); bootstrap interval of the lenient mean {'-'.join(map(_pct, b['interval']['lenient']))}."]
    lines = ["", "Bootstrap intervals: " + ", ".join(f"{k} {'-'.join(map(_pct, v))}" for k, v in b["interval"].items())
             + "."]
    if "most_common_report" in b:
        mc = b["most_common_report"]
        lines.append(f"Always answering the most common training report: METEOR {_pct(mc['meteor'])}, ROUGE-1 "
                     f"{_pct(mc['rouge1'])}, BLEU {_pct(mc['bleu'])}.")
    return lines


def markdown(task: str, res: dict, shards: str, split_field: str, split: str, model: str, sample: bool) -> str:
    lines = [f"# {task} on {shards} ({split_field}={split}), model {model}", ""]
    if task == "retrieval":
        lines += _retrieval_table(res["metrics"])
    elif task == "vqa-closed":
        lines += _closed_table(res["metrics"])
    else:
        lines += _text_table(res)
    lines += _baseline_lines(task, res.get("baselines"))
    name, ours, lamed = PAPER[task]
    lines += ["", f"Paper ({name}): Med3DVLM {100 * ours:.2f}, M3D-LaMed {100 * lamed:.2f}.",
              f"{res['n']} samples; decoding {'sampled' if sample else 'greedy'}." if task != "retrieval"
              else f"{res['n']} pairs."]
    return "\n".join(lines) + "\n"
