"""`med3dvlm <command> [args]`: the console script; each command is the module `python -m` runs.

    med3dvlm preprocess --raw DIR --out DIR        med3dvlm train --stage 1 --shards DIR --out DIR
    med3dvlm evaluate --task report ...             med3dvlm sweep --shards DIR ...     med3dvlm demo
"""

import importlib
import sys

COMMANDS = {"make-synthetic": "pipelines.make_synthetic", "preprocess": "pipelines.preprocess",
            "train": "pipelines.train", "evaluate": "pipelines.evaluate", "demo": "pipelines.demo",
            "sweep": "tuning.siglip_sweep", "import-released": "pipelines.import_released"}
# in a checkout these are top-level (`python -m pipelines.train`); the wheel installs them inside med3dvlm
ROOT = __package__.rpartition(".")[0] if __package__ else ""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from med3dvlm.runtime import package_version

        print(package_version())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from .common import run_main

    mod = importlib.import_module(".".join(x for x in (ROOT, COMMANDS[argv[0]]) if x))
    sys.argv = [f"med3dvlm {argv[0]}", *argv[1:]]
    return run_main(lambda: mod.main(argv[1:]))


if __name__ == "__main__":
    main()
