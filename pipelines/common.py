"""What every entry point shares: `--config NAME|PATH` with `key=value` overrides, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse

from med3dvlm.config import Config
from med3dvlm.runtime import run_cli as run_main  # noqa: F401  (the entry points' `__main__` wrapper)
from med3dvlm.runtime import user_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="tiny", help="preset (tiny, m3d, paper) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.encoder=nano")
    return p


def config_from_args(args) -> Config:
    return user_config(args.config, args.overrides)
