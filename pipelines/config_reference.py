"""Write the configuration reference (every key, its type, its value in each preset, its bounds, one line of help).

    python -m pipelines.config_reference [--out platform/config.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import run_main

DEFAULT = Path(__file__).resolve().parents[1] / "platform" / "config.md"


def main(argv=None):
    from med3dvlm.config import config_reference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT), help="the markdown file to write")
    args = p.parse_args(argv)
    Path(args.out).write_text(config_reference())
    print(f"[config] {args.out}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
