"""M3D-Bench evaluation, offline: retrieval, report generation, closed and open VQA over the test shards.

    python -m pipelines.evaluate --task retrieval|report|vqa-closed|vqa-open --model DIR|URI --shards DIR|URI [--out DIR|URI]
        [--split test] [--split-field split|case_split] [--limit N] [--replicas R] [--sample] [--resume] ...

Inference is a Ray Data actor pool over the shards (`map_batches`); the driver scores each batch as it arrives and
appends it to `samples.csv`, so an interrupted run keeps every finished sample and `--resume` skips them. At the end:
`results.json`, `results.md`, and for retrieval `similarity.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from med3dvlm import storage
from pipelines.common import UserError, init_ray, run_main, write_run_json

KIND_FOR_TASK = {"retrieval": "med3dvlm-clip", "report": "med3dvlm-vlm", "vqa-closed": "med3dvlm-vlm",
                 "vqa-open": "med3dvlm-vlm"}
RETRIEVAL_N = (100, 500, 1000, 2000)
PAPER = {  # published figures (Med3DVLM, M3D-LaMed), research/med3dvlm.md 4.4; fractions
    "retrieval": ("R@1 at 2,000", 0.6100, 0.1910), "report": ("METEOR", 0.3642, 0.1438),
    "vqa-open": ("METEOR", 0.3676, 0.3358), "vqa-closed": ("accuracy (lenient mean)", 0.7995, 0.7578),
}
CSV_COLUMNS = {
    "retrieval": ["key", "volume_id", "report", "image_to_text_rank", "text_to_image_rank"],
    "text": ["key", "volume_id", "question_type", "question", "reference", "prediction", "bleu", "rouge1", "meteor",
             "bert_f1", "error"],
    "vqa-closed": ["key", "volume_id", "question_type", "question", "reference", "answer_choice", "prediction",
                   "lenient", "strict", "error"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=list(KIND_FOR_TASK))
    p.add_argument("--model", required=True, help="an exported model directory, path or URI (stage 1 for retrieval, "
                                                  "2/3 otherwise)")
    p.add_argument("--shards", required=True, help="preprocessed shards: a path or a URI (s3://bucket/shards)")
    p.add_argument("--out", default=None, help="a path or URI; default: <model>/eval-<task>")
    p.add_argument("--split", default="test", help="split name, or several comma-separated (e.g. validation,test)")
    p.add_argument("--split-field", default="split", choices=["split", "case_split"],
                   help="`split`: the official M3D split (comparable with the paper); `case_split`: leak-free by case")
    p.add_argument("--limit", type=int, default=None, help="only the first N volumes (report: the paper uses 1000)")
    p.add_argument("--n", default=",".join(map(str, RETRIEVAL_N)), help="retrieval: first-N pair counts")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per inference batch")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--replicas", type=int, default=1, help="model actors in the Ray Data pool")
    p.add_argument("--cpus-per-replica", type=float, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample as the paper's scripts do (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bertscore-model", default=None,
                   help="local model dir for BERTScore (roberta-large -> layer 17, as the benchmark); default: packaged "
                        "MiniLM, labelled as not comparable")
    p.add_argument("--no-bertscore", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep samples.csv rows from an interrupted run and skip them")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.max_new_tokens > 4096:
        raise UserError(f"--max-new-tokens {a.max_new_tokens}: must be in 1..4096")
    if a.sample and not (0 < a.temperature <= 5):
        raise UserError(f"--temperature {a.temperature}: must be in (0, 5]")
    a.splits = [s.strip() for s in a.split.split(",") if s.strip()]
    try:
        a.n = sorted({int(x) for x in str(a.n).split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--n {a.n}: expected comma-separated integers such as 100,500,1000,2000") from None
    return a


def check_inputs(a) -> int:
    """Every reason to refuse, before Ray starts. Returns the number of volumes in the evaluated split."""
    from med3dvlm.data.shards import list_shards, read_table

    meta_f = storage.join(a.model, "config.json")
    if not storage.is_file(meta_f):
        raise UserError(f"--model {a.model}: not an exported model directory (no config.json)")
    kind = storage.read_json(meta_f).get("kind")
    want = KIND_FOR_TASK[a.task]
    if kind != want:
        need = "stage 1's export (CLIP)" if want == "med3dvlm-clip" else "stage 2 or 3's export (VLM)"
        raise UserError(f"--model {a.model}: holds a {kind} model; --task {a.task} needs {need}")
    if not list_shards(a.shards):
        raise UserError(f"--shards {a.shards}: no shards there (volumes/part-*.parquet); run pipelines.preprocess")
    splits = read_table(a.shards, [a.split_field])
    counts = {}
    for s in splits.column(0).to_pylist():
        counts[s] = counts.get(s, 0) + 1
    n = sum(counts.get(s, 0) for s in a.splits)
    if not n:
        raise UserError(f"--shards {a.shards}: no '{a.split}' rows in field '{a.split_field}' "
                        f"(present: {', '.join(f'{k} {v}' for k, v in sorted(counts.items(), key=str))})")
    return n if a.limit is None else min(a.limit, n)


def done_keys(csv_path: Path, resume: bool) -> set:
    if not csv_path.is_file():
        return set()
    if not resume:
        csv_path.unlink()
        return set()
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {r["key"] for r in csv.DictReader(f)}


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


def dataset(a, columns: list[str]):
    from ray.data import DataContext

    from med3dvlm.data.shards import read_shards

    DataContext.get_current().execution_options.preserve_order = True  # "the first N test pairs" means shard order
    ds = read_shards(a.shards, split=a.splits if len(a.splits) > 1 else a.splits[0], split_field=a.split_field, columns=columns)
    return ds.limit(a.limit) if a.limit else ds


def pool_args(a) -> dict:
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=a.replicas), "batch_size": a.batch_size, "batch_format": "numpy",
            "num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_replica}


def device_for(a) -> str:
    return "cuda" if a.gpus_per_replica > 0 else "cpu"


def run_retrieval(a, out: Path, log) -> dict:
    import numpy as np
    import torch

    from med3dvlm.eval.predict import Embedder
    from med3dvlm.eval.retrieval import rank_of_target, retrieval_at_n

    ds = dataset(a, ["volume_id", "volume", "report"]).map_batches(
        Embedder, fn_constructor_kwargs={"model_dir": a.model, "device": device_for(a),
                                         "threads": max(1, int(a.cpus_per_replica))}, **pool_args(a))
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
    w.write([{"key": k, "volume_id": k, "report": r, "image_to_text_rank": int(a_), "text_to_image_rank": int(b_)}
             for k, r, a_, b_ in zip(ids, reports, i2t.tolist(), t2i.tolist())])
    w.close()
    results = retrieval_at_n(img_t, txt_t, a.n)
    plot_similarity(s[:min(len(ids), 200), :min(len(ids), 200)], out / "similarity.png")
    return {"metrics": results, "n": len(ids)}


def plot_similarity(s, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(s.numpy(), cmap="viridis")
    ax.set_xlabel("report (text) index")
    ax.set_ylabel("volume (image) index")
    ax.set_title(f"cosine similarity, first {s.shape[0]} test pairs (diagonal = match)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_generation(a, out: Path, log) -> dict:
    from med3dvlm.eval.predict import Generator
    from med3dvlm.eval.text import BertScore, text_scores
    from med3dvlm.eval.vqa import lenient_correct, strict_correct

    closed = a.task == "vqa-closed"
    csv_path = out / "samples.csv"
    done = done_keys(csv_path, a.resume)
    if done:
        log(f"[evaluate] resuming: {len(done)} samples already scored in {csv_path}")
    bert = None if closed or a.no_bertscore else BertScore(a.bertscore_model)
    nocase = None
    columns = ["volume_id", "volume", "report"] if a.task == "report" else ["volume_id", "volume", "qa"]
    ds = dataset(a, columns).map_batches(
        Generator, fn_constructor_kwargs={
            "model_dir": a.model, "task": a.task, "device": device_for(a), "max_new_tokens": a.max_new_tokens,
            "gen_batch": a.gen_batch, "sample": a.sample, "temperature": a.temperature, "top_p": a.top_p,
            "seed": a.seed, "done": frozenset(done), "threads": max(1, int(a.cpus_per_replica)), "dtype": a.dtype},
        **pool_args(a))
    w = SampleWriter(csv_path, CSV_COLUMNS["vqa-closed" if closed else "text"])
    t0 = time.time()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(b.keys(), vals)} for vals in zip(*b.values())]
        if not rows:
            continue
        if closed:
            if nocase is None:
                nocase = model_lowercases(a.model)
            for r in rows:
                r["lenient"] = int(lenient_correct(r["prediction"], r["answer_choice"], nocase))
                r["strict"] = int(strict_correct(r["prediction"], r["answer_choice"], nocase))
        else:
            for r in rows:
                r.update(text_scores(r["prediction"], r["reference"]))
            if bert is not None:
                for r, f in zip(rows, bert([r["prediction"] for r in rows], [r["reference"] for r in rows])):
                    r["bert_f1"] = f
        w.write(rows)
        log(f"[evaluate] {w.n + len(done)} samples scored ({w.n / max(time.time() - t0, 1e-9):.2f}/s)")
    w.close()
    rows = read_rows(csv_path)
    if not rows:
        raise UserError(f"no {a.task} samples in split '{a.split}' of {a.shards} (no questions there?)")
    res = aggregate_closed(rows) if closed else aggregate_text(rows, a.task, bert)
    res["errors"] = sum(1 for r in rows if r.get("error"))
    res["empty_predictions"] = sum(1 for r in rows if not r["prediction"].strip())
    return res


def model_lowercases(model_dir: str) -> bool:
    from transformers import AutoTokenizer

    from med3dvlm.eval.vqa import lowercases

    tok = storage.local_path(storage.join(model_dir, "tokenizer"))  # only the tokenizer, not the weights, to the driver
    return lowercases(AutoTokenizer.from_pretrained(tok, local_files_only=True))


def aggregate_closed(rows: list[dict]) -> dict:
    from med3dvlm.eval.vqa import accuracy_by_type

    acc = accuracy_by_type([{"question_type": int(r["question_type"]), "lenient": int(r["lenient"]),
                             "strict": int(r["strict"])} for r in rows])
    return {"metrics": acc, "n": len(rows)}


def aggregate_text(rows: list[dict], task: str, bert) -> dict:
    """Means over samples (the benchmark's average of per-sample scores); open VQA also per question type."""
    from med3dvlm.data.manifest import QUESTION_TYPES

    names = ["bleu", "rouge1", "meteor"] + (["bert_f1"] if bert is not None else [])

    def means(sel):
        return {m: sum(float(r[m]) for r in sel) / len(sel) for m in names}

    res = {"metrics": means(rows), "n": len(rows)}
    if task == "vqa-open":
        per = {}
        for t in sorted({int(r["question_type"]) for r in rows}):
            per[QUESTION_TYPES.get(t, str(t))] = means([r for r in rows if int(r["question_type"]) == t])
        res["per_type"] = per
    if bert is not None:
        res["bertscore_model"] = bert.label
    return res


def markdown(task: str, res: dict, a) -> str:
    lines = [f"# {task} on {a.shards} ({a.split_field}={a.split}), model {a.model}", ""]
    m = res["metrics"]
    if task == "retrieval":
        lines += ["| N | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |", "|--:|--:|--:|--:|--:|--:|--:|"]
        for n, r in m.items():
            lines.append(f"| {n} | " + " | ".join(f"{100 * r[f'{d}_R@{k}']:.2f}" for d in ("image_to_text", "text_to_image")
                                                  for k in (1, 5, 10)) + " |")
        lines += ["", "image->text ranks reports per volume (the paper's \"IR\"); text->image ranks volumes per report "
                      "(\"TR\")."]
    elif task == "vqa-closed":
        types = list(m["lenient"]["per_type"])
        lines += ["| rule | " + " | ".join(types) + " | mean |", "|---|" + "--:|" * (len(types) + 1)]
        for rule in ("lenient", "strict"):
            lines.append(f"| {rule} | " + " | ".join(f"{100 * m[rule]['per_type'][t]:.2f}" for t in types)
                         + f" | {100 * m[rule]['mean']:.2f} |")
        lines += ["", "lenient: \"<letter>.\" anywhere in the answer (the benchmark's rule); strict: the first choice "
                      "letter the answer names."]
    else:
        names = list(m)
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names),
                  "| all | " + " | ".join(f"{100 * m[k]:.2f}" for k in names) + " |"]
        for t, v in res.get("per_type", {}).items():
            lines.append(f"| {t} | " + " | ".join(f"{100 * v[k]:.2f}" for k in names) + " |")
        if "bertscore_model" in res:
            lines += ["", f"BERTScore model: {res['bertscore_model']}."]
    name, ours, lamed = PAPER[task]
    lines += ["", f"Paper ({name}): Med3DVLM {100 * ours:.2f}, M3D-LaMed {100 * lamed:.2f}.",
              f"{res['n']} samples; decoding {'sampled' if a.sample else 'greedy'}." if task != "retrieval"
              else f"{res['n']} pairs."]
    return "\n".join(lines) + "\n"


def evaluate(a, log=print) -> dict:
    started = time.time()
    n = check_inputs(a)
    a.model, a.shards = storage.absolute(a.model), storage.absolute(a.shards)
    dest = storage.absolute(a.out or storage.join(a.model, f"eval-{a.task}"))
    with storage.staged(dest, pull=a.resume) as d:  # a URI: work in a local folder, upload it at the end
        res = _evaluate(a, Path(d), n, started, log)
    log(f"[evaluate] done in {time.time() - started:.0f} s: {dest}/results.json, results.md, samples.csv")
    res["out"] = dest
    return res


def _evaluate(a, out: Path, n: int, started: float, log) -> dict:
    if a.task == "retrieval" and (out / "samples.csv").is_file():
        (out / "samples.csv").unlink()  # retrieval is all-or-nothing: the ranks need every pair
    init_ray()
    log(f"[evaluate] {a.task}: {n} volumes of {a.split_field}={a.split}, {a.replicas} replica(s)")
    res = run_retrieval(a, out, log) if a.task == "retrieval" else run_generation(a, out, log)
    res.update(task=a.task, model=str(a.model), shards=str(a.shards), split=a.split, split_field=a.split_field,
               decoding={"sample": a.sample, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
                         "max_new_tokens": a.max_new_tokens} if a.task != "retrieval" else None,
               paper=dict(zip(("metric", "med3dvlm", "m3d_lamed"), PAPER[a.task])),
               wall_s=round(time.time() - started, 2))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(a.task, res, a))
    write_run_json(out, None, vars(a), {"n": res["n"]}, started)
    log((out / "results.md").read_text())
    return res


def main(argv=None):
    return evaluate(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_main(main)
