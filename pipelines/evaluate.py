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
    from med3dvlm.eval.runner import EvalConfig
    from med3dvlm.runtime import package_version
    from med3dvlm.settings import add_flags

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("--config", default=None, help="a YAML file of these settings (keys as the flags, with _ for -)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings (YAML) and exit")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. max_new_tokens=96 (flags win)")
    add_flags(p, EvalConfig)  # one flag per setting, with its help and default (eval/runner.py)
    return p


def parse_args(argv):
    from med3dvlm.eval.runner import eval_config

    return eval_config(vars(arg_parser().parse_args(argv)))


def main(argv=None):
    from med3dvlm.eval.runner import evaluate

    return evaluate(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_main(main)
