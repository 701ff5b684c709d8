"""What every evaluation task is (one file per M3D-Bench task under `eval/tasks/`, in the manner of big_vision's
evaluators): its name, the export it scores, the paper's figure, how it runs, and how its results read.

A generation task (report, VQA) adds the samples it asks of each shard row, how a prediction is scored, how the
scores aggregate, and what a model blind to its image would reach; the runner does the rest the same way for all.
"""

from __future__ import annotations

from med3dvlm.models.export import VLM

TEXT_COLUMNS = ["key", "volume_id", "question_type", "question", "reference", "prediction", "bleu", "rouge1", "meteor",
                "bert_f1", "error"]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


class Task:
    name: str = ""
    kind: str = VLM  # the export kind it scores
    paper: tuple[str, float, float] = ("", 0.0, 0.0)  # (metric, Med3DVLM, M3D-LaMed) in the paper's tables
    columns: tuple[str, ...] = ()  # the shard columns it reads
    csv_columns: list[str] = TEXT_COLUMNS
    decodes: bool = True  # its figures depend on the decoding settings

    def run(self, ec, out, log) -> dict:
        """The task's results (metrics, n, baselines ...) with samples.csv written in `out`."""
        from med3dvlm.eval.generation import run_generation

        return run_generation(self, ec, out, log)

    def table(self, res: dict) -> list[str]:
        raise NotImplementedError

    def baseline_lines(self, b: dict) -> list[str]:
        """What a model blind to its image would score, beside the intervals of the figures (95%)."""
        return ["", "Bootstrap intervals: " + ", ".join(f"{k} {'-'.join(map(pct, v))}" for k, v in b["interval"].items())
                + "."]

    def footer(self, res: dict, sample: bool) -> str:
        return f"{res['n']} samples; decoding {'sampled' if sample else 'greedy'}."

    # ------------------------------------------------------------ generation tasks
    def expand(self, batch: dict, seed: int) -> list[dict]:
        """A batch of shard rows -> its evaluation samples (`samples` of each row, with the row's index `i`)."""
        return [{"i": i, **s} for i in range(len(batch["volume_id"])) for s in self.samples(batch, i, seed)]

    def samples(self, batch: dict, i: int, seed: int) -> list[dict]:
        """Row `i` of a batch of shard rows -> its samples: key, prompt ("question"), reference, question fields."""
        raise NotImplementedError

    def scorer(self, ec):
        """A callable that adds the scores to a batch of rows (prediction and reference filled in)."""
        return TextScorer(ec)

    def aggregate(self, rows: list[dict], bert_label: str | None) -> dict:
        return {"metrics": text_means(rows, bert_label), "n": len(rows),
                **({"bertscore_model": bert_label} if bert_label else {})}

    def baselines(self, ec, rows: list[dict], metrics: list[str]) -> dict:
        from med3dvlm.eval.baselines import mean_intervals

        return {"interval": mean_intervals(rows, metrics)}


def text_means(rows: list[dict], bert_label: str | None) -> dict:
    """Means over samples (the benchmark's average of per-sample scores)."""
    names = ["bleu", "rouge1", "meteor"] + (["bert_f1"] if bert_label else [])
    return {m: sum(float(r[m]) for r in rows) / len(rows) for m in names}


def text_table(res: dict) -> list[str]:
    m = res["metrics"]
    names = list(m)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names),
             "| all | " + " | ".join(f"{100 * m[k]:.2f}" for k in names) + " |"]
    for t, v in res.get("per_type", {}).items():
        lines.append(f"| {t} | " + " | ".join(f"{100 * v[k]:.2f}" for k in names) + " |")
    return lines + (["", f"BERTScore model: {res['bertscore_model']}."] if "bertscore_model" in res else [])


class TextScorer:
    """BLEU-1, ROUGE-1, METEOR per sample, and BERTScore where a model is given."""

    def __init__(self, ec):
        from med3dvlm.eval.text import BertScore

        self.bert = BertScore(ec.bertscore_model) if ec.bertscore else None
        self.label = self.bert and self.bert.label

    def __call__(self, rows: list[dict]) -> None:
        from med3dvlm.eval.text import text_scores

        for r in rows:
            r.update(text_scores(r["prediction"], r["reference"]))
        if self.bert is not None:
            for r, f in zip(rows, self.bert([r["prediction"] for r in rows], [r["reference"] for r in rows])):
                r["bert_f1"] = f


def question_samples(batch: dict, i: int, prompt) -> list[dict]:
    """Row `i`'s questions (`questions`) as evaluation samples, each asked as `prompt(q)` gives it."""
    vid = str(batch["volume_id"][i])
    return [{"key": f"{vid}#{j}", "question_type": int(q["question_type"]), "question": prompt(q)[0],
             "reference": str(q["answer"]), "answer_choice": str(q["answer_choice"])} for j, q in questions(batch, i)]


def questions(batch: dict, i: int):
    """(index, question) of row `i`'s questions as M3D-Bench's VQA test asks them: no yes/no questions (the test
    has none), and a question repeated in the row (M3D_VQA_test5k.csv repeats rows of M3D_VQA_test.csv) once."""
    qa, seen = batch["qa"][i], set()
    for j, q in enumerate([] if qa is None else list(qa)):
        same = (q["question"], q["answer"], tuple(q.get(f"choice_{c}") for c in "abcd"))
        if q["yes_no"] or same in seen:
            continue
        seen.add(same)
        yield j, q
