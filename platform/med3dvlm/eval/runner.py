"""The evaluation runner: the settings (`EvalConfig`), every check before Ray starts, and one run of a task
(`eval.tasks`, by name): its results in `results.json`, `results.md`, `samples.csv` (and for retrieval
`similarity.png`) beside `run.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from med3dvlm import lineage, storage
from med3dvlm.eval.results import markdown
from med3dvlm.eval.tasks import TASKS, get_task
from med3dvlm.models.export import ExportError, check_tensors, read_meta
from med3dvlm.runtime import UserError, init_ray, write_run_json
from med3dvlm.settings import (FLAGS, check_settings, load_settings, merge, parse_overrides, read_settings_file,
                               required, setting)

RETRIEVAL_N = (100, 500, 1000, 2000)


@dataclass
class EvalConfig:
    """One evaluation: the task, the model export and the shards (paths or URIs), and how to run it. Each field has
    its line of help and its bounds or choices beside it (`settings.setting`), as the training config's do."""

    task: str = required("what it scores (eval/tasks/)", choices=TASKS)
    model: str = required("the export it scores: stage 1 for retrieval, 2/3 otherwise (path or URI)")
    shards: str = required("preprocessed shards (path or URI)")
    out: str | None = setting(None, "where results go; default <model>/eval-<task>")
    split: str = setting("test", "a split name, or several comma-separated")
    split_field: str = setting("split", "split (official M3D, comparable with the paper) or case_split (leak-free)",
                               choices=("split", "case_split"))
    limit: int | None = setting(None, "only the first N volumes (None: all; reports: the paper uses 1000)", 1)
    n: tuple[int, ...] = setting(RETRIEVAL_N, "retrieval: recall on the first N pairs for each N", 1)
    batch_size: int = setting(8, "volumes per batch to a replica", 1)
    gen_batch: int = setting(16, "prompts generated together", 1)
    replicas: int = setting(1, "predictor replicas (a Ray Data actor pool)", 1)
    cpus_per_replica: float = setting(1, "CPUs (and torch threads) per replica", 0.001)
    gpus_per_replica: float = setting(0, "GPUs per replica (> 0: on CUDA)", 0)
    dtype: str | None = setting(None, "weights' dtype on the replicas (None: as exported)",
                                choices=("float32", "bfloat16", "float16"))
    max_new_tokens: int = setting(256, "tokens generated at most", 1, 4096)
    sample: bool = setting(False, "sample instead of greedy decoding (the paper sampled)")
    temperature: float = setting(1.0, "sampling temperature (with sample)", 0)
    top_p: float | None = setting(None, "nucleus sampling's p (with sample; None: off)", 1e-6, 1)
    seed: int = setting(42, "seed of the prompts and of sampling")
    repetition_penalty: float = setting(1.0, "> 1 discourages repeats (the reference decodes without one, 1.0)", 1e-6)
    no_repeat_ngram_size: int = setting(0, "n-gram blocking (0: off, as the reference)", 0)
    shuffle_images: bool = setting(False, "the shuffled-image control: each sample paired with another's volume")
    baseline_split: str = setting("train", "reports: the most common report of this split is the blind baseline")
    bertscore_model: str | None = setting(None, "a local BERTScore model directory (roberta-large: the benchmark's; "
                                                "None: the packaged MiniLM, labelled as not comparable)")
    bertscore: bool = setting(True, "BERTScore for reports and open VQA")
    resume: bool = setting(False, "keep the samples already scored in samples.csv and skip them")
    allow_overlap: bool = setting(False, "score cases the model (or a parent export) trained on, with a warning")
    splits: list[str] = field(init=False)

    def __post_init__(self):
        try:
            check_settings(self, FLAGS)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.sample and not (0 < self.temperature <= 5):
            raise UserError(f"--temperature {self.temperature}: must be in (0, 5] with --sample")
        self.splits = [s.strip() for s in self.split.split(",") if s.strip()]
        self.n = tuple(sorted(set(self.n)))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"


def eval_config(given: dict) -> EvalConfig:
    """The command line's EvalConfig: the `--config` YAML file, then `key=value` overrides, then the flags given, by
    the one settings loader; `--print-config` prints the result and exits 0. UserError naming the setting."""
    import sys

    config, print_config = given.pop("config", None), given.pop("print_config", False)
    try:
        from_file = read_settings_file(config, storage.read_text) if config else {}
    except ValueError as e:
        raise UserError(f"--config {e}") from None
    try:
        data = merge(from_file, parse_overrides(given.pop("overrides", []), empty=None), given)
        if print_config:
            import yaml

            defaults = {f.name: getattr(EvalConfig, f.name, None) for f in dataclasses.fields(EvalConfig) if f.init}
            print(yaml.safe_dump(json.loads(json.dumps({**defaults, **data})), sort_keys=False), end="")
            sys.exit(0)
        return load_settings(EvalConfig, data, FLAGS)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_inputs(ec: EvalConfig) -> tuple[int, dict]:
    """Every reason to refuse, before Ray starts (a case the model trained on among those evaluated, `lineage`).
    Returns the number of volumes in the evaluated split and the model's lineage with the overlap found."""
    from med3dvlm.data.shards import read_table, shard_files

    if ec.bertscore and ec.bertscore_model and not storage.is_file(storage.join(ec.bertscore_model, "config.json")):
        raise UserError(f"--bertscore-model {ec.bertscore_model}: no config.json there (give a local model directory; "
                        f"models are never downloaded)")
    try:
        read_meta(ec.model, get_task(ec.task).kind)
        check_tensors(ec.model)
    except ExportError as e:
        raise UserError(f"--model {e}; --task {ec.task} needs it") from None
    shard_files(ec.shards)
    counts: dict = {}
    for s in read_table(ec.shards, [ec.split_field]).column(0).to_pylist():
        counts[s] = counts.get(s, 0) + 1
    n = sum(counts.get(s, 0) for s in ec.splits)
    if not n:
        raise UserError(f"--shards {ec.shards}: no '{ec.split}' rows in field '{ec.split_field}' "
                        f"(present: {', '.join(f'{k} {v}' for k, v in sorted(counts.items(), key=str))})")
    held_out = lineage.check_overlap(ec.model, ec.shards, ec.split_field, ec.splits, ec.allow_overlap)
    return (n if ec.limit is None else min(ec.limit, n)), held_out


def evaluate(ec: EvalConfig, log=print) -> dict:
    """Run one evaluation; returns results.json's content plus `out`, where the results went."""
    started = time.time()
    n, held_out = check_inputs(ec)
    ec.model, ec.shards = storage.absolute(ec.model), storage.absolute(ec.shards)
    dest = storage.absolute(ec.out or storage.join(ec.model, f"eval-{ec.task}"))
    with storage.staged(dest, pull=ec.resume) as d:  # a URI: work in a local folder, upload it at the end
        res = _evaluate(ec, Path(d), n, held_out, started, log)
    log(f"[evaluate] done in {time.time() - started:.0f} s: {dest}/results.json, results.md, samples.csv")
    res["out"] = dest
    return res


def _evaluate(ec: EvalConfig, out: Path, n: int, held_out: dict, started: float, log) -> dict:
    task = get_task(ec.task)
    init_ray()
    log(f"[evaluate] {ec.task}: {n} volumes of {ec.split_field}={ec.split}, {ec.replicas} replica(s)")
    res = task.run(ec, out, log)
    res.update(task=ec.task, model=str(ec.model), shards=str(ec.shards), split=ec.split, split_field=ec.split_field,
               decoding={"sample": ec.sample, "temperature": ec.temperature, "top_p": ec.top_p, "seed": ec.seed,
                         "max_new_tokens": ec.max_new_tokens, "repetition_penalty": ec.repetition_penalty,
                         "no_repeat_ngram_size": ec.no_repeat_ngram_size} if task.decodes else None,
               shuffled_images=ec.shuffle_images, **held_out,
               paper=dict(zip(("metric", "med3dvlm", "m3d_lamed"), task.paper)),
               wall_s=round(time.time() - started, 2))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    warning = f"**Warning: {held_out['warning']}.**\n\n" if held_out["warning"] else ""
    (out / "results.md").write_text(warning + markdown(task, res, ec.shards, ec.split_field, ec.split, ec.model,
                                                       ec.sample))
    write_run_json(out, None, asdict(ec), {"n": res["n"]}, started)
    log((out / "results.md").read_text())
    return res
