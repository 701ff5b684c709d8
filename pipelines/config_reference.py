"""Write the settings reference: every config key (its type, its value in each preset, its bounds, one line of
help), then the evaluation settings, the Serve app's arguments and a sweep's settings, all from the fields themselves.

    python -m pipelines.config_reference [--out platform/config.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import run_main

DEFAULT = Path(__file__).resolve().parents[1] / "platform" / "config.md"


def reference_text() -> str:
    from med3dvlm.config import config_reference
    from med3dvlm.eval.runner import EvalConfig
    from med3dvlm.settings import settings_reference
    from med3dvlm.sweep import SweepConfig
    from serve.app import AppSettings

    return "\n".join([
        config_reference(),
        settings_reference("Evaluation settings", EvalConfig, "`pipelines.evaluate`: as flags (`--max-new-tokens`), "
                           "`key=value` overrides or a YAML file of them (`--config FILE`)."),
        settings_reference("Serve app arguments", AppSettings, "`serve run med3dvlm.serve.app:build_app key=value ...` "
                           "or `args:` in a Serve config file (Serve validates them into `serve.app.AppArgs`)."),
        settings_reference("Sweep settings", SweepConfig, "`tuning.siglip_sweep`: as flags (`--eval-every`); trailing "
                           "`key=value` arguments are training config overrides for every trial."),
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT), help="the markdown file to write")
    args = p.parse_args(argv)
    Path(args.out).write_text(reference_text())
    print(f"[config] {args.out}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
