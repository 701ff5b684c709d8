"""Generation tasks (report, VQA) run the same way: a Ray Data actor pool of `predict.Generator`s over the split,
each batch scored as it arrives (`Task.scorer`) and appended to samples.csv (an interrupted run keeps every finished
sample; `resume` skips them), then aggregated with the task's baselines."""

from __future__ import annotations

import time

from med3dvlm.eval.feed import dataset, pool_args
from med3dvlm.eval.results import SampleWriter, done_keys, read_rows
from med3dvlm.runtime import UserError


def generator_dataset(task, ec, done: set):
    from med3dvlm.eval.predict import Generator

    return dataset(ec, list(task.columns)).map_batches(Generator, fn_constructor_kwargs={
        "model_dir": ec.model, "task": task, "device": ec.device, "max_new_tokens": ec.max_new_tokens,
        "gen_batch": ec.gen_batch, "sample": ec.sample, "temperature": ec.temperature, "top_p": ec.top_p,
        "seed": ec.seed, "done": frozenset(done), "threads": max(1, int(ec.cpus_per_replica)), "dtype": ec.dtype,
        "repetition_penalty": ec.repetition_penalty, "no_repeat_ngram_size": ec.no_repeat_ngram_size},
        **pool_args(ec))


def run_generation(task, ec, out, log) -> dict:
    csv_path = out / "samples.csv"
    done = done_keys(csv_path, ec.resume)
    if done:
        log(f"[evaluate] resuming: {len(done)} samples already scored in {csv_path}")
    score = task.scorer(ec)
    w = SampleWriter(csv_path, task.csv_columns)
    t0 = time.time()
    for b in generator_dataset(task, ec, done).iter_batches(batch_size=None, batch_format="numpy"):
        rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(b.keys(), vals)} for vals in zip(*b.values())]
        if not rows:
            continue
        score(rows)
        w.write(rows)
        log(f"[evaluate] {w.n + len(done)} samples scored ({w.n / max(time.time() - t0, 1e-9):.2f}/s)")
    w.close()
    rows = read_rows(csv_path)
    if not rows:
        raise UserError(f"no {ec.task} samples in split '{ec.split}' of {ec.shards} (no questions there?)")
    res = task.aggregate(rows, score.label)
    res["baselines"] = task.baselines(ec, rows, list(res["metrics"]))
    res["errors"] = sum(1 for r in rows if r.get("error"))
    res["empty_predictions"] = sum(1 for r in rows if not r["prediction"].strip())
    return res
