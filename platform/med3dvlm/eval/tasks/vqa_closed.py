"""Closed VQA (M3D-Bench): each question with its choices A-D, accuracy per question type and their unweighted mean,
by the paper's lenient rule (the letter anywhere) and a strict one (the first letter named) side by side; blind
baselines: chance and each type's majority answer."""

from __future__ import annotations

from med3dvlm import storage
from med3dvlm.eval.tasks.base import Task, pct, question_samples
from med3dvlm.models.prompt import closed_prompt


class ClosedVQATask(Task):
    name = "vqa-closed"
    paper = ("accuracy (lenient mean)", 0.7995, 0.7578)
    columns = ("volume_id", "volume", "qa")
    csv_columns = ["key", "volume_id", "question_type", "question", "reference", "answer_choice", "prediction",
                   "lenient", "strict", "named", "error"]

    def samples(self, batch, i, seed):
        return question_samples(batch, i, closed_prompt)

    def scorer(self, ec):
        return ClosedScorer(ec.model)

    def aggregate(self, rows, bert_label):
        from med3dvlm.eval.vqa import accuracy_by_type

        return {"metrics": accuracy_by_type(rows), "n": len(rows)}

    def baselines(self, ec, rows, metrics):
        from med3dvlm.eval.baselines import closed_baselines

        return closed_baselines(rows)

    def table(self, res):
        from med3dvlm.eval.vqa import RULES

        m = res["metrics"]
        types = list(m["lenient"]["per_type"])
        lines = ["| rule | " + " | ".join(types) + " | mean |", "|---|" + "--:|" * (len(types) + 1)]
        for rule in (r for r in RULES if r in m):
            lines.append(f"| {rule} | " + " | ".join(f"{100 * m[rule]['per_type'][t]:.2f}" for t in types)
                         + f" | {100 * m[rule]['mean']:.2f} |")
        return lines + ["", "lenient: \"<letter>.\" anywhere in the answer (the benchmark's rule); strict: the first "
                            "choice letter the answer names; named (a diagnostic, not the benchmark's): the answer's "
                            "text appears, whatever its letter."]

    def baseline_lines(self, b):
        m = b["majority"]
        return ["", f"Baselines: chance {pct(b['chance'])}; per-type majority answer {pct(m['mean'])} ("
                + ", ".join(f"{t} {v['letter']} {pct(v['accuracy'])}" for t, v in m["per_type"].items())
                + f"); bootstrap interval of the lenient mean {'-'.join(map(pct, b['interval']['lenient']))}."]


class ClosedScorer:
    """Both closed-VQA rules and the named-answer diagnostic, letters read as the model's tokenizer cases them."""

    def __init__(self, model: str):
        self.model, self.nocase = model, None
        self.label = None

    def __call__(self, rows: list[dict]) -> None:
        from med3dvlm.eval.vqa import lenient_correct, named_correct, strict_correct

        if self.nocase is None:
            self.nocase = model_lowercases(self.model)
        for r in rows:
            r["lenient"] = int(lenient_correct(r["prediction"], r["answer_choice"], self.nocase))
            r["strict"] = int(strict_correct(r["prediction"], r["answer_choice"], self.nocase))
            r["named"] = int(named_correct(r["prediction"], r["reference"]))


def model_lowercases(model_dir: str) -> bool:
    from transformers import AutoTokenizer

    from med3dvlm.eval.vqa import lowercases

    tok = storage.local_path(storage.join(model_dir, "tokenizer"))  # only the tokenizer, not the weights, to the driver
    return lowercases(AutoTokenizer.from_pretrained(tok, local_files_only=True))
