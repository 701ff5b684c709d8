"""The evaluation runner: batch inference over the shards as a Ray Data actor pool (`map_batches`), each batch scored
as it arrives and appended to `samples.csv` (an interrupted run keeps every finished sample; `resume` skips them),
then `results.json`, `results.md` and, for retrieval, `similarity.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from med3dvlm import storage
from med3dvlm.config import bounds_text, number_ok, yaml_error_line
from med3dvlm.eval.results import CSV_COLUMNS, PAPER, SampleWriter, aggregate_closed, aggregate_text, done_keys, \
    markdown, read_rows
from med3dvlm.models.export import CLIP, VLM, ExportError, check_tensors, read_meta
from med3dvlm.runtime import UserError, init_ray, write_run_json

KIND_FOR_TASK = {"retrieval": CLIP, "report": VLM, "vqa-closed": VLM, "vqa-open": VLM}
RETRIEVAL_N = (100, 500, 1000, 2000)


NUMBER_RULES = {  # EvalConfig field -> (type, least, most); None-valued fields (limit, top_p) mean "not set"
    "max_new_tokens": (int, 1, 4096), "limit": (int, 1, None), "batch_size": (int, 1, None),
    "gen_batch": (int, 1, None), "replicas": (int, 1, None),
    "cpus_per_replica": (float, 0.001, None), "gpus_per_replica": (float, 0, None), "seed": (int, None, None),
    "temperature": (float, 0, None), "top_p": (float, 1e-6, 1), "repetition_penalty": (float, 1e-6, None),
    "no_repeat_ngram_size": (int, 0, None)}


def check_number(name: str, value, kind: type, least, most) -> None:
    """A setting's value (`config.number_ok`); None for the settings where it means "not set"."""
    if value is None and name in ("limit", "top_p"):
        return
    if not number_ok(value, least, most, whole=kind is int):
        bounds = bounds_text(least, most)
        raise UserError(f"--{name.replace('_', '-')} {value!r}: expects {'a whole number' if kind is int else 'a number'}"
                        + (f" of {bounds}" if bounds else ""))


@dataclass
class EvalConfig:
    """One evaluation: the task, the model export and the shards (paths or URIs), and how to run it."""

    task: str
    model: str
    shards: str
    out: str | None = None  # default: <model>/eval-<task>
    split: str = "test"  # a split name, or several comma-separated
    split_field: str = "split"  # "split" (official M3D, comparable with the paper) or "case_split" (leak-free)
    limit: int | None = None
    n: tuple[int, ...] = RETRIEVAL_N
    batch_size: int = 8
    gen_batch: int = 16
    replicas: int = 1
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0
    dtype: str | None = None
    max_new_tokens: int = 256
    sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 42
    repetition_penalty: float = 1.0  # the reference decodes greedily without one (1.0); > 1 discourages repeats
    no_repeat_ngram_size: int = 0  # n-gram blocking (0: off, as the reference)
    shuffle_images: bool = False  # the shuffled-image control: each sample paired with another sample's volume
    baseline_split: str = "train"  # reports: the most common report of this split is the blind baseline
    bertscore_model: str | None = None
    bertscore: bool = True
    resume: bool = False
    splits: list[str] = field(init=False)

    def __post_init__(self):
        if self.task not in KIND_FOR_TASK:
            raise UserError(f"--task {self.task}: one of {', '.join(KIND_FOR_TASK)}")
        for name, (kind, least, most) in NUMBER_RULES.items():
            check_number(name, getattr(self, name), kind, least, most)
        if self.sample and not (0 < self.temperature <= 5):
            raise UserError(f"--temperature {self.temperature}: must be in (0, 5]")
        for k in self.n:
            check_number("n", k, int, 1, None)
        self.splits = [s.strip() for s in self.split.split(",") if s.strip()]
        self.n = tuple(sorted(set(self.n)))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"


def eval_settings(config: str | None, overrides: list[str], flags: dict, default) -> dict:
    """An evaluation's settings: a YAML file, then `key=value` overrides, then the flags given (a flag left at its
    default does not undo the file). Unknown keys are refused with the nearest known one."""
    import difflib

    import yaml

    settings: dict = {}
    if config:
        try:
            settings = yaml.safe_load(storage.read_text(config)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--config {config}: cannot read ({yaml_error_line(e)})") from None
        if not isinstance(settings, dict):
            raise UserError(f"--config {config}: expected a mapping of settings")
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise UserError(f"override {o!r}: expected key=value")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"override {o!r}: the value is not valid YAML ({yaml_error_line(e)})") from None
    for k in settings:
        if k not in flags:
            near = difflib.get_close_matches(k, list(flags), n=1)
            raise UserError(f"unknown evaluation setting {k!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    return {**flags, **settings, **{k: v for k, v in flags.items() if v != default(k)}}


def eval_config(flags: dict, default) -> EvalConfig:
    """The command line's EvalConfig: `eval_settings`, `--print-config` (print, exit 0), the required three."""
    import sys

    a = eval_settings(flags.pop("config"), flags.pop("overrides"), flags, default)
    if a.pop("print_config"):
        import yaml

        print(yaml.safe_dump(a, sort_keys=False), end="")
        sys.exit(0)
    for k in ("task", "model", "shards"):
        if not a.get(k):
            raise UserError(f"--{k} is required (or {k}: in --config, or {k}=... as an override)")
    try:
        a["n"] = tuple(int(x) for x in str(a["n"]).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--n {a['n']}: expected comma-separated integers such as 100,500,1000,2000") from None
    a["bertscore"] = not a.pop("no_bertscore")
    return EvalConfig(**a)


def check_inputs(ec: EvalConfig) -> int:
    """Every reason to refuse, before Ray starts. Returns the number of volumes in the evaluated split."""
    from med3dvlm.data.shards import read_table, shard_files

    try:
        read_meta(ec.model, KIND_FOR_TASK[ec.task])
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
    return n if ec.limit is None else min(ec.limit, n)


def dataset(ec: EvalConfig, columns: list[str]):
    from ray.data import DataContext

    from med3dvlm.data.shards import read_shards

    DataContext.get_current().execution_options.preserve_order = True  # "the first N test pairs" means shard order

    def read(cols):
        ds = read_shards(ec.shards, split=ec.splits if len(ec.splits) > 1 else ec.splits[0],
                         split_field=ec.split_field, columns=cols)
        return ds.limit(ec.limit) if ec.limit else ds

    if not ec.shuffle_images:
        return read(columns)
    return rotate_volumes(read(["volume_id", "case_id", "volume"]), read([c for c in columns if c != "volume"]))


def rotate_volumes(volumes, texts):
    """The shuffled-image control's data: each row of `texts` takes another row's volume from `volumes` (the same
    rows). Rows are ordered by (case, volume id), so a case's series lie together, and row i takes the volume of row
    (i + n//2) mod n (`baselines.rotation`): never its own case's unless one case holds half the rows. The evaluated
    volumes are put in the object store once (through the driver) to be re-paired; an optional control, sized as
    the evaluation."""
    import ray

    from med3dvlm.eval.baselines import rotation

    refs, cases = {}, {}
    for b in volumes.iter_batches(batch_size=16, batch_format="numpy"):
        for vid, case, vol in zip(b["volume_id"], b["case_id"], b["volume"]):
            refs[str(vid)], cases[str(vid)] = ray.put(vol), str(case)
    order = sorted(refs, key=lambda v: (cases[v], v))
    rot = rotation(len(order))
    partner = {order[i]: refs[order[rot[i]]] for i in range(len(order))}
    return texts.map_batches(_partner_volumes, fn_kwargs={"partner": partner}, batch_format="numpy")


def _partner_volumes(batch: dict, partner: dict) -> dict:
    import numpy as np
    import ray

    from med3dvlm.data.shards import qa_as_lists

    batch["volume"] = np.stack(ray.get([partner[str(v)] for v in batch["volume_id"]]))
    return qa_as_lists(batch)


def pool_args(ec: EvalConfig) -> dict:
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=ec.replicas), "batch_size": ec.batch_size, "batch_format": "numpy",
            "num_cpus": ec.cpus_per_replica, "num_gpus": ec.gpus_per_replica}


def run_retrieval(ec: EvalConfig, out: Path, log) -> dict:
    import numpy as np
    import torch

    from med3dvlm.eval.predict import Embedder
    from med3dvlm.eval.retrieval import rank_of_target, retrieval_at_n
    from med3dvlm.plots import plot_similarity

    ds = dataset(ec, ["volume_id", "volume", "report"]).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": ec.model, "device": ec.device,
                                         "threads": max(1, int(ec.cpus_per_replica))}, **pool_args(ec))
    ids, reports, img, txt = [], [], [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids += [str(x) for x in b["volume_id"]]
        reports += [str(x) for x in b["report"]]
        img.append(b["image_embedding"])
        txt.append(b["text_embedding"])
        log(f"[evaluate] embedded {len(ids)} pairs")
    img_t, txt_t = torch.from_numpy(np.concatenate(img)), torch.from_numpy(np.concatenate(txt))
    s = img_t @ txt_t.t()
    i2t, t2i = rank_of_target(s), rank_of_target(s.t())
    w = SampleWriter(out / "samples.csv", CSV_COLUMNS["retrieval"])
    w.write([{"key": k, "volume_id": k, "report": r, "image_to_text_rank": int(a), "text_to_image_rank": int(b)}
             for k, r, a, b in zip(ids, reports, i2t.tolist(), t2i.tolist())])
    w.close()
    plot_similarity(s[:min(len(ids), 200), :min(len(ids), 200)], out / "similarity.png", ec.split)
    return {"metrics": retrieval_at_n(img_t, txt_t, ec.n), "n": len(ids),
            "baselines": retrieval_baselines(img_t, txt_t, reports, i2t, t2i)}


def retrieval_baselines(img, txt, reports: list[str], i2t, t2i) -> dict:
    """On all pairs: chance among the distinct reports, the shuffled-image control, Wilson intervals of R@1."""
    from med3dvlm.eval.baselines import retrieval_chance, rotation, wilson
    from med3dvlm.eval.retrieval import distinct_report_ranks, retrieval_metrics

    n = len(reports)
    shuffled = img[rotation(n)] if n > 1 else None
    control = retrieval_metrics(shuffled, txt, ks=(1, 5)) if n > 1 else {}
    hits = int((distinct_report_ranks(img, txt, reports) <= 1).sum())
    hits_control = int((distinct_report_ranks(shuffled, txt, reports) <= 1).sum()) if n > 1 else 0
    return {"n": n, "distinct_reports": len(set(reports)), "chance_R@1": retrieval_chance(reports),
            "control": {k: v for k, v in control.items() if k != "n"},
            "interval": {"image_to_text_R@1": wilson(int((i2t <= 1).sum()), n),
                         "text_to_image_R@1": wilson(int((t2i <= 1).sum()), n)},
            # image->text R@1 among the distinct reports: the figure that chance_R@1 is chance of
            "distinct": {"image_to_text_R@1": hits / max(n, 1), "control_image_to_text_R@1": hits_control / max(n, 1),
                         "interval": wilson(hits, n)}}


def generator_dataset(ec: EvalConfig, done: set):
    from med3dvlm.eval.predict import Generator

    columns = ["volume_id", "volume", "report"] if ec.task == "report" else ["volume_id", "volume", "qa"]
    return dataset(ec, columns).map_batches(Generator, fn_constructor_kwargs={
        "model_dir": ec.model, "task": ec.task, "device": ec.device, "max_new_tokens": ec.max_new_tokens,
        "gen_batch": ec.gen_batch, "sample": ec.sample, "temperature": ec.temperature, "top_p": ec.top_p,
        "seed": ec.seed, "done": frozenset(done), "threads": max(1, int(ec.cpus_per_replica)), "dtype": ec.dtype,
        "repetition_penalty": ec.repetition_penalty, "no_repeat_ngram_size": ec.no_repeat_ngram_size},
        **pool_args(ec))


class Scorer:
    """Scores a batch of predictions: both closed-VQA rules, or the text metrics (and BERTScore where given)."""

    def __init__(self, ec: EvalConfig):
        from med3dvlm.eval.text import BertScore

        self.closed = ec.task == "vqa-closed"
        self.bert = None if self.closed or not ec.bertscore else BertScore(ec.bertscore_model)
        self.model, self.nocase = ec.model, None

    def __call__(self, rows: list[dict]) -> None:
        from med3dvlm.eval.text import text_scores
        from med3dvlm.eval.vqa import lenient_correct, named_correct, strict_correct

        if self.closed:
            if self.nocase is None:
                self.nocase = model_lowercases(self.model)
            for r in rows:
                r["lenient"] = int(lenient_correct(r["prediction"], r["answer_choice"], self.nocase))
                r["strict"] = int(strict_correct(r["prediction"], r["answer_choice"], self.nocase))
                r["named"] = int(named_correct(r["prediction"], r["reference"]))
            return
        for r in rows:
            r.update(text_scores(r["prediction"], r["reference"]))
        if self.bert is not None:
            for r, f in zip(rows, self.bert([r["prediction"] for r in rows], [r["reference"] for r in rows])):
                r["bert_f1"] = f


def run_generation(ec: EvalConfig, out: Path, log) -> dict:
    csv_path = out / "samples.csv"
    done = done_keys(csv_path, ec.resume)
    if done:
        log(f"[evaluate] resuming: {len(done)} samples already scored in {csv_path}")
    score = Scorer(ec)
    w = SampleWriter(csv_path, CSV_COLUMNS["vqa-closed" if score.closed else "text"])
    t0 = time.time()
    for b in generator_dataset(ec, done).iter_batches(batch_size=None, batch_format="numpy"):
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
    res = aggregate_closed(rows) if score.closed else aggregate_text(rows, ec.task, score.bert and score.bert.label)
    res["baselines"] = generation_baselines(ec, rows, list(res["metrics"]))
    res["errors"] = sum(1 for r in rows if r.get("error"))
    res["empty_predictions"] = sum(1 for r in rows if not r["prediction"].strip())
    return res


def generation_baselines(ec: EvalConfig, rows: list[dict], metrics: list[str]) -> dict:
    from med3dvlm.data.shards import read_table
    from med3dvlm.eval.baselines import closed_baselines, mean_intervals, report_baselines

    if ec.task == "vqa-closed":
        return closed_baselines(rows)
    if ec.task == "report":
        train = read_table(ec.shards, ["report"], split=ec.baseline_split, split_field=ec.split_field)
        return report_baselines(rows, train.column("report").to_pylist(), metrics)
    return {"interval": mean_intervals(rows, metrics)}


def model_lowercases(model_dir: str) -> bool:
    from transformers import AutoTokenizer

    from med3dvlm.eval.vqa import lowercases

    tok = storage.local_path(storage.join(model_dir, "tokenizer"))  # only the tokenizer, not the weights, to the driver
    return lowercases(AutoTokenizer.from_pretrained(tok, local_files_only=True))


def evaluate(ec: EvalConfig, log=print) -> dict:
    """Run one evaluation; returns results.json's content plus `out`, where the results went."""
    started = time.time()
    n = check_inputs(ec)
    ec.model, ec.shards = storage.absolute(ec.model), storage.absolute(ec.shards)
    dest = storage.absolute(ec.out or storage.join(ec.model, f"eval-{ec.task}"))
    with storage.staged(dest, pull=ec.resume) as d:  # a URI: work in a local folder, upload it at the end
        res = _evaluate(ec, Path(d), n, started, log)
    log(f"[evaluate] done in {time.time() - started:.0f} s: {dest}/results.json, results.md, samples.csv")
    res["out"] = dest
    return res


def _evaluate(ec: EvalConfig, out: Path, n: int, started: float, log) -> dict:
    if ec.task == "retrieval" and (out / "samples.csv").is_file():
        (out / "samples.csv").unlink()  # retrieval is all-or-nothing: the ranks need every pair
    init_ray()
    log(f"[evaluate] {ec.task}: {n} volumes of {ec.split_field}={ec.split}, {ec.replicas} replica(s)")
    res = run_retrieval(ec, out, log) if ec.task == "retrieval" else run_generation(ec, out, log)
    res.update(task=ec.task, model=str(ec.model), shards=str(ec.shards), split=ec.split, split_field=ec.split_field,
               decoding={"sample": ec.sample, "temperature": ec.temperature, "top_p": ec.top_p, "seed": ec.seed,
                         "max_new_tokens": ec.max_new_tokens, "repetition_penalty": ec.repetition_penalty,
                         "no_repeat_ngram_size": ec.no_repeat_ngram_size} if ec.task != "retrieval" else None,
               shuffled_images=ec.shuffle_images,
               paper=dict(zip(("metric", "med3dvlm", "m3d_lamed"), PAPER[ec.task])),
               wall_s=round(time.time() - started, 2))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(ec.task, res, ec.shards, ec.split_field, ec.split, ec.model, ec.sample))
    write_run_json(out, None, asdict(ec), {"n": res["n"]}, started)
    log((out / "results.md").read_text())
    return res
