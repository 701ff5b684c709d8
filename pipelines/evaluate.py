"""M3D-Bench evaluation, offline: retrieval, report generation, closed and open VQA over the test shards.

    python -m pipelines.evaluate --task retrieval|report|vqa-closed|vqa-open --model DIR|URI --shards DIR|URI [--out DIR|URI]
        [--split test] [--split-field split|case_split] [--limit N] [--replicas R] [--sample] [--resume] ...

Inference is a Ray Data actor pool over the shards; each batch is scored as it arrives and appended to `samples.csv`,
so an interrupted run keeps every finished sample and `--resume` skips them. At the end: `results.json`,
`results.md`, and for retrieval `similarity.png`.
"""

from __future__ import annotations

import argparse
import sys

from .common import run_main


def arg_parser() -> argparse.ArgumentParser:
    from med3dvlm.eval.runner import RETRIEVAL_N
    from med3dvlm.eval.tasks import TASKS
    from med3dvlm.runtime import package_version

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("--config", default=None, help="a YAML file of these settings (keys as the flags, with _ for -)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings (YAML) and exit")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. max_new_tokens=96 (flags win)")
    p.add_argument("--task", default=None, choices=list(TASKS), help="what to evaluate (required)")
    p.add_argument("--model", default=None, help="an exported model: path or URI (stage 1 for retrieval, 2/3 otherwise)")
    p.add_argument("--shards", default=None, help="preprocessed shards: a path or a URI (s3://bucket/shards)")
    p.add_argument("--out", default=None, help="a path or URI; default: <model>/eval-<task>")
    p.add_argument("--split", default="test", help="split name, or several comma-separated (e.g. validation,test)")
    p.add_argument("--split-field", default="split", choices=["split", "case_split"],
                   help="`split`: the official M3D split (comparable with the paper); `case_split`: leak-free by case")
    p.add_argument("--limit", type=int, default=None, help="only the first N volumes (report: the paper uses 1000)")
    p.add_argument("--n", default=",".join(map(str, RETRIEVAL_N)), help="retrieval: first-N pair counts")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per inference batch")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--replicas", type=int, default=1, help="model actors in the Ray Data pool")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs (and torch threads) of each actor")
    p.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs of each actor (> 0 runs on cuda)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="weights' dtype for generation (default: as exported)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit")
    p.add_argument("--sample", action="store_true", help="sample as the paper's scripts do (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--top-p", type=float, default=None, help="with --sample")
    p.add_argument("--seed", type=int, default=42, help="sampling and report-prompt seed")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: the reference)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="block repeated n-grams (0: off, the reference)")
    p.add_argument("--shuffle-images", action="store_true",
                   help="the shuffled-image control: pair each sample with another sample's volume")
    p.add_argument("--baseline-split", default="train", help="report: the most common report of this split is the "
                   "blind baseline")
    p.add_argument("--bertscore-model", default=None, help="local model dir for BERTScore (roberta-large -> layer 17, "
                   "as the benchmark); default: packaged MiniLM, labelled as not comparable")
    p.add_argument("--no-bertscore", action="store_true")
    p.add_argument("--allow-overlap", action="store_true", help="score cases the model (or a parent export) trained "
                   "on; the results then carry a warning (default: refused naming a case)")
    p.add_argument("--resume", action="store_true", help="keep samples.csv rows from an interrupted run and skip them")
    return p


def parse_args(argv):
    from med3dvlm.eval.runner import eval_config

    p = arg_parser()
    return eval_config(vars(p.parse_args(argv)), p.get_default)


def main(argv=None):
    from med3dvlm.eval.runner import evaluate

    return evaluate(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_main(main)
