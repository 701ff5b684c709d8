"""The whole pipeline on a local Ray at the `tiny` config: synthetic M3D data -> preprocessing -> stages 1, 2, 3
(2 workers, DeepSpeed ZeRO-2, CPU) -> a held-out check -> a summary table. `make demo` runs it.

    python -m pipelines.demo [--out out/demo] [--cases 120] [key=value ...]   (the demo's split first, yours after)
"""

from __future__ import annotations

import sys

from .common import config_from_args, parser, run_main


def main(argv=None):
    from med3dvlm.demo import DEMO_OVERRIDES, run_demo

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo", help="where the data, checkpoints and evaluations go")
    p.add_argument("--cases", type=int, default=120, help="synthetic patients")
    p.add_argument("--llm-steps", type=int, default=3000, help="text pretraining steps of the tiny LLM before stage 2 "
                   "(it stands in for a pretrained LLM's choice lookup); 0: a random LLM")
    args = p.parse_args(argv)
    args.overrides = DEMO_OVERRIDES + args.overrides
    return run_demo(config_from_args(args), args.out, args.cases, llm_steps=args.llm_steps)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
