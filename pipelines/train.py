"""Train one stage on Ray Train + DeepSpeed ZeRO.

    python -m pipelines.train --stage 1 --config tiny --shards /data/shards --out /ckpt
    python -m pipelines.train --stage 2 --config tiny --shards /data/shards --out /ckpt --init /ckpt/stage1
    python -m pipelines.train --stage 3 --config tiny --shards /data/shards --out /ckpt --init /ckpt/stage2

Writes `<out>/stage<N>/` (a from_pretrained directory, run.json, history.json, curves.png, TensorBoard events) and
keeps Ray Train's run (DeepSpeed checkpoints) under `<out>/ray/`. Bad input fails before any worker starts.
"""

from __future__ import annotations

import sys

from .common import config_from_args, parser, run_main


def arg_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
    p.add_argument("--shards", required=True, help="preprocessed shards: a path or a URI (s3://bucket/shards)")
    p.add_argument("--out", required=True, help="where stage<N>/ (the export) and ray/ (checkpoints) go: a path or a URI; "
                                                "on a multi-node cluster a shared path or a URI")
    p.add_argument("--init", default=None, help="the previous stage's export (required for stages 2 and 3)")
    return p


def main(argv=None):
    from med3dvlm.train.driver import train

    args = arg_parser().parse_args(argv)
    return train(config_from_args(args), args.stage, args.shards, args.out, args.init)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
