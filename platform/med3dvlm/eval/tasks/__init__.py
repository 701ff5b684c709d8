"""The evaluation tasks by name: one file each (`base.Task`); adding a task is one file and one line here."""

from __future__ import annotations

from med3dvlm.eval.tasks.base import Task
from med3dvlm.eval.tasks.report import ReportTask
from med3dvlm.eval.tasks.retrieval import RetrievalTask
from med3dvlm.eval.tasks.vqa_closed import ClosedVQATask
from med3dvlm.eval.tasks.vqa_open import OpenVQATask

TASKS: dict[str, Task] = {t.name: t for t in (RetrievalTask(), ReportTask(), ClosedVQATask(), OpenVQATask())}


def get_task(name: str) -> Task:
    from med3dvlm.runtime import UserError

    if name not in TASKS:
        raise UserError(f"--task {name}: one of {', '.join(TASKS)}")
    return TASKS[name]
