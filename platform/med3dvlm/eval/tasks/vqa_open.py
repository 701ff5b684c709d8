"""Open VQA (M3D-Bench): each question answered in free text, scored like reports, overall and per question type."""

from __future__ import annotations

from med3dvlm.eval.tasks.base import Task, question_samples, text_means, text_table
from med3dvlm.models.prompt import open_prompt


class OpenVQATask(Task):
    name = "vqa-open"
    paper = ("METEOR", 0.3676, 0.3358)
    columns = ("volume_id", "volume", "qa")

    def samples(self, batch, i, seed):
        return question_samples(batch, i, open_prompt)

    def aggregate(self, rows, bert_label):
        from med3dvlm.eval.vqa import by_type

        res = super().aggregate(rows, bert_label)
        return {**res, "per_type": {name: text_means(sel, bert_label) for name, sel in by_type(rows).items()}}

    def table(self, res):
        return text_table(res)
