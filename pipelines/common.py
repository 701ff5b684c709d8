"""What every entry point shares: argument parsing, the one Ray init helper, run.json, clear errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from med3dvlm.config import Config, load_config

# Settings that keep Ray, DeepSpeed and HF quiet and offline (research/feasibility.md section 9).
DEFAULT_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in DEFAULT_ENV.items():
    os.environ.setdefault(_k, _v)
# METEOR's WordNet and punkt_tab, laid out by `make setup` (med3dvlm.eval.nltk_data)
os.environ.setdefault("NLTK_DATA", str(Path(__file__).resolve().parents[1] / ".venv" / "nltk_data"))


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="tiny", help="preset (tiny, m3d, paper) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.encoder=nano")
    return p


def config_from_args(args) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


def init_ray(num_cpus: int | None = None):
    """Attach to RAY_ADDRESS (a cluster, or `ray job submit`), else start a local Ray.

    Locally Ray gets twice the cores as logical CPUs (at least 4): Ray Data and Train workers then never wait on each
    other for a CPU (research/feasibility.md 10.9), and the object store is capped at 2 GiB.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    ctx_env = {"env_vars": {k: os.environ[k] for k in DEFAULT_ENV}}
    if address:  # a cluster or a submitted job: the job's runtime env applies (ours would conflict with it)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, object_store_memory=2 << 30, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=ctx_env,
                 log_to_driver=True, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def write_run_json(out: str | Path, cfg: Config | None, inputs: dict, figures: dict, started: float) -> str:
    from med3dvlm import storage

    path = storage.join(out, "run.json")
    storage.write_text(path, json.dumps({
        "config": cfg.to_dict() if cfg is not None else None, "git_sha": git_sha(), "argv": sys.argv, "inputs": inputs,
        "figures": figures, "wall_s": round(time.time() - started, 3),
    }, indent=1, default=str))
    return path


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_main(main):
    """Run `main()`; bad input exits 2 with one line, never a traceback."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
