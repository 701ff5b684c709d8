"""Start from the released Med3DVLM weights: a released checkpoint folder <-> this project's stage-3 export.

    python -m pipelines.import_released --checkpoint PATH_OR_URI --out DIR [--config paper] [key=value ...]
    python -m pipelines.import_released --to-released --checkpoint EXPORT --out DIR

The import reads the HF folder (config.json, model.safetensors or model-0000N-of-0000M.safetensors with
model.safetensors.index.json, tokenizer files; LoRA merged) one shard at a time and writes an export that
`pipelines.evaluate`, the Serve app and `pipelines.train --stage 3 --init` accept (splice `m3d_legacy`, as the
weights were trained). `--to-released` writes the released layout from one of our exports (LoRA merged) and our
settings the layout cannot hold in `med3dvlm.json` beside it; importing that folder back restores them, so the round
trip is lossless. With such a folder `--config` may be left out; a config that would change the model's answers
is refused naming the key. Without it (the authors' folders) `--config` (default paper) supplies them.
"""

from __future__ import annotations

import sys
import time

from .common import config_from_args, parser, run_main


def main(argv=None):
    from med3dvlm.models.released import export_released, import_released
    from med3dvlm.runtime import write_run_json

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a released checkpoint folder (or, with --to-released, "
                                                       "one of our stage-2/3 exports): a path or a URI")
    p.add_argument("--out", required=True, help="the folder to write: a path or a URI")
    p.add_argument("--to-released", action="store_true", help="write the released layout from one of our exports")
    p.set_defaults(config=None)  # a folder's own med3dvlm.json, else paper
    args = p.parse_args(argv)
    explicit = args.config is not None or bool(args.overrides)
    args.config = args.config or "paper"
    cfg, started = config_from_args(args), time.time()
    if args.to_released:
        res = export_released(args.checkpoint, args.out)
    else:
        res = import_released(args.checkpoint, args.out, cfg, explicit=explicit)
    write_run_json(args.out, cfg, {"checkpoint": args.checkpoint, **res}, {}, started)
    return res


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
