"""Open VQA (M3D-Bench): each question answered in free text, scored like reports, overall and per question type."""

from __future__ import annotations

from med3dvlm.eval.tasks.base import Task, questions, text_means, text_table
from med3dvlm.models.prompt import open_prompt


class OpenVQATask(Task):
    name = "vqa-open"
    paper = ("METEOR", 0.3676, 0.3358)
    columns = ("volume_id", "volume", "qa")

    def samples(self, batch, i, seed):
        vid = str(batch["volume_id"][i])
        return [{"key": f"{vid}#{j}", "question_type": int(q["question_type"]), "question": open_prompt(q)[0],
                 "reference": str(q["answer"]), "answer_choice": str(q["answer_choice"])} for j, q in questions(batch, i)]

    def aggregate(self, rows, bert_label):
        from med3dvlm.eval.vqa import by_type

        res = super().aggregate(rows, bert_label)
        return {**res, "per_type": {name: text_means(sel, bert_label) for name, sel in by_type(rows).items()}}

    def table(self, res):
        return text_table(res)
