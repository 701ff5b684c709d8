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

from pipelines.common import run_main


def arg_parser() -> argparse.ArgumentParser:
    from med3dvlm.eval.runner import KIND_FOR_TASK, RETRIEVAL_N

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=list(KIND_FOR_TASK))
    p.add_argument("--model", required=True, help="an exported model: path or URI (stage 1 for retrieval, 2/3 otherwise)")
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
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample as the paper's scripts do (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bertscore-model", default=None, help="local model dir for BERTScore (roberta-large -> layer 17, "
                   "as the benchmark); default: packaged MiniLM, labelled as not comparable")
    p.add_argument("--no-bertscore", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep samples.csv rows from an interrupted run and skip them")
    return p


def parse_args(argv):
    from med3dvlm.eval.runner import EvalConfig
    from med3dvlm.runtime import UserError

    a = vars(arg_parser().parse_args(argv))
    try:
        a["n"] = tuple(int(x) for x in str(a["n"]).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--n {a['n']}: expected comma-separated integers such as 100,500,1000,2000") from None
    a["bertscore"] = not a.pop("no_bertscore")
    return EvalConfig(**a)


def main(argv=None):
    from med3dvlm.eval.runner import evaluate

    return evaluate(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_main(main)
