"""What every entry point shares: `--config NAME|PATH` with `key=value` overrides, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse

from med3dvlm.config import Config
from med3dvlm.runtime import run_cli as run_main  # noqa: F401  (the entry points' `__main__` wrapper)
from med3dvlm.runtime import package_version, user_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset (tiny, m3d, paper) or a YAML file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="Ray Data/Train/Tune's own lines on the terminal (ours always print; all stay in Ray's logs)")
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.encoder=nano")
    return p


def config_from_args(args) -> Config:
    """The config the arguments name; with --print-config, print it and exit."""
    import os

    os.environ["MED3DVLM_LOG_LEVEL"] = getattr(args, "log_level", "warning")
    cfg = user_config(args.config, args.overrides)
    if getattr(args, "print_config", False):
        import json
        import sys

        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False), end="")
        sys.exit(0)
    return cfg
