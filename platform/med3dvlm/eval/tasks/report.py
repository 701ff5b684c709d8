"""Report generation (M3D-Bench): the findings written for each volume, scored with BLEU-1, ROUGE-1, METEOR and
BERTScore against its report; blind baseline: always the most common training report."""

from __future__ import annotations

from med3dvlm.eval.tasks.base import Task, pct, text_table
from med3dvlm.models.prompt import report_prompt


class ReportTask(Task):
    name = "report"
    paper = ("METEOR", 0.3642, 0.1438)
    columns = ("volume_id", "volume", "report")

    def samples(self, batch, i, seed):
        vid = str(batch["volume_id"][i])
        return [{"key": vid, "question_type": -1, "question": report_prompt(vid, seed),
                 "reference": str(batch["report"][i]), "answer_choice": ""}]

    def baselines(self, ec, rows, metrics):
        from med3dvlm.data.shards import read_table
        from med3dvlm.eval.baselines import report_baselines

        train = read_table(ec.shards, ["report"], split=ec.baseline_split, split_field=ec.split_field)
        return report_baselines(rows, train.column("report").to_pylist(), metrics)

    def table(self, res):
        return text_table(res)

    def baseline_lines(self, b):
        mc = b["most_common_report"]
        return super().baseline_lines(b) + [
            f"Always answering the most common training report: METEOR {pct(mc['meteor'])}, ROUGE-1 "
            f"{pct(mc['rouge1'])}, BLEU {pct(mc['bleu'])}."]
