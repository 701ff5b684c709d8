"""What every run of the platform shares: the environment defaults, the one Ray init, run records, user errors.

Nothing here runs on import: an entry point calls `apply_env_defaults()` once (or `init_ray()`, which does it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Settings that keep Ray, DeepSpeed and HF quiet and offline.
DEFAULT_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else a worker's print reaches the terminal twice (tee + root logger)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar, once per worker and stage
    # Ray Data's V2 Parquet reader starts a pool of footer-reading actors for every read (about 12 s on 2 cores,
    # each epoch of a streamed stage; killing them mid-start is likely Ray's "Failed to kill actor" lines); V1 reads the
    # same rows in well under a second. Set to 1 to get V2 back.
    "RAY_DATA_USE_DATASOURCE_V2": "0",
}
CHECKOUT = Path(__file__).resolve().parents[2]


class UserError(Exception):
    """Bad input from the user: entry points print it as one line and exit with code 2."""


def apply_env_defaults() -> None:
    """Offline HF, quiet Ray, and METEOR's NLTK data (in the environment's prefix, where `make setup` and
    `python -m med3dvlm.eval.nltk_data` put it); variables already set win."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("NLTK_DATA", str(Path(sys.prefix) / "nltk_data"))


def init_ray(num_cpus: int | None = None):
    """Attach to RAY_ADDRESS (a cluster, or `ray job submit`), else start a local Ray.

    Locally Ray gets twice the cores as logical CPUs (at least 4): Ray Data and Train workers then never wait on each
    other for a CPU, and the object store is capped at 2 GiB. The dashboard (127.0.0.1) stays although it takes about
    a tenth of a core idle: it serves Ray's State API, which Ray Train's placement-group cleaner polls (without it,
    that actor logs a failed query every second).
    """
    import ray

    if ray.is_initialized():
        return ray
    apply_env_defaults()
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster or a submitted job: the job's runtime env applies (ours would conflict with it)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, object_store_memory=2 << 30, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": worker_env()}, log_to_driver=True, configure_logging=False)
    configure_data_context()
    quiet_ray_libraries()
    return ray


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def worker_env() -> dict:
    """The environment of a local Ray's workers: the defaults, and at the default log level Ray Data's logging with
    its terminal handler at warning (`ray_data_logging.yaml`: the "execution finished" line of every epoch and the
    "Progress bars disabled" notice of every stage go to the session's ray-data.log only); a
    RAY_DATA_LOGGING_CONFIG of the user's wins."""
    env = {k: os.environ[k] for k in DEFAULT_ENV}
    # Ray Train's preemption watcher (an actor per run that polls for nodes being drained, on autoscaled or spot
    # clusters) has nothing to watch on a local Ray, and Ray logs an error-level line for each one it starts
    # (ray-project/ray#53727); a cluster (RAY_ADDRESS) keeps it
    env[PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
    if log_level() not in ("DEBUG", "INFO"):
        env["RAY_DATA_LOGGING_CONFIG"] = os.environ.get("RAY_DATA_LOGGING_CONFIG",
                                                        str(Path(__file__).with_name("ray_data_logging.yaml")))
    return env


# glibc's malloc in the processes that do the heavy work (Ray Train's workers, preprocessing tasks): one arena, large
# blocks from the heap rather than mmap, no trimming. By default each freed large block is unmapped and the next one
# faulted in again page by page, which made a DCFormer-small step at the paper's shape about a third slower; these
# settings cost about 1 GB more peak memory (bench/allocator.py, bench/results/allocator.md). Other allocators and
# platforms ignore them.
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def allocator_env() -> dict:
    """`KEEP_FREED_MEMORY` as environment variables for a task's or an actor's runtime env (on top of the job's);
    a value set in the driver's environment wins."""
    return {k: os.environ.get(k, v) for k, v in KEEP_FREED_MEMORY.items()}


def data_settings() -> dict:
    """This process's Ray Data settings, to apply here or in another process (`configure_data_context`): the V1
    Parquet reader unless RAY_DATA_USE_DATASOURCE_V2=1, execution plans printed only at `--log-level info|debug`,
    progress bars on a terminal."""
    return {"use_datasource_v2": os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0") == "1",
            "print_on_execution_start": log_level() in ("DEBUG", "INFO"),  # "Starting execution of Dataset ..."
            "enable_progress_bars": sys.stderr.isatty(), "log_level": log_level()}


def configure_data_context(settings: dict | None = None, preserve_order: bool = False) -> None:
    """The one place that sets Ray Data's context for preprocessing, training ingest and evaluation: its logging,
    progress bars and reader (`data_settings`), and, where asked, rows in their input order (`preserve_order`; once
    on in a process, it stays on). A task that dies with its worker is run again by Ray Data's own default."""
    from ray.data import DataContext

    settings = dict(settings or data_settings())
    ray_data_log_level(settings.pop("log_level"))
    ctx = DataContext.get_current()
    for k, v in settings.items():
        setattr(ctx, k, v)
    if preserve_order:
        ctx.execution_options.preserve_order = True


def task_cpus() -> float:
    """Logical CPUs that a CPU-bound task asks for so that no more of them run at once than there are cores: 1 on a
    cluster someone started (Ray counts cores there), the oversubscription of the local Ray that `init_ray` starts."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return 1.0
    return max(1.0, ray.cluster_resources().get("CPU", 1.0) / (os.cpu_count() or 1))


def log_level() -> str:
    """The platform's log level for Ray's libraries: `--log-level` (MED3DVLM_LOG_LEVEL), warning by default."""
    return os.environ.get("MED3DVLM_LOG_LEVEL", "warning").upper()


def ray_data_log_level(level: str) -> None:
    """Ray Data's loggers in this process at `level`; its "Progress bars disabled" notice (a warning, once in each
    process that runs a dataset without bars) only at info or debug."""
    import logging

    n = getattr(logging, level.upper(), logging.WARNING)
    logging.getLogger("ray.data").setLevel(n)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR if n > logging.INFO else n)


def quiet_ray_libraries() -> None:
    """Ray Data's execution plans and Ray Train's/Tune's per-checkpoint lines stay in Ray's log files (under the
    session's `logs/`), not on the terminal, unless `--log-level info|debug` (or MED3DVLM_LOG_LEVEL) asks for them."""
    import logging

    level = getattr(logging, log_level(), logging.WARNING)
    for name in ("ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    ray_data_log_level(log_level())


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=CHECKOUT).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_run_json(out, cfg, inputs: dict, figures: dict, started: float) -> str:
    """`<out>/run.json`: config, git SHA, command line, input hashes and figures of a run (a path or URI)."""
    from med3dvlm import storage

    path = storage.join(out, "run.json")
    storage.write_text(path, json.dumps({
        "config": cfg.to_dict() if cfg is not None else None, "git_sha": git_sha(), "argv": sys.argv, "inputs": inputs,
        "figures": figures, "wall_s": round(time.time() - started, 3),
    }, indent=1, default=str))
    return path


def user_config(name_or_path: str, overrides: list[str] | None = None):
    """`config.load_config` for a command line: a bad preset, file or key is a UserError naming it."""
    from med3dvlm.config import load_config

    try:
        return load_config(name_or_path, overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


def package_version() -> str:
    """"med3dvlm X.Y.Z" as installed (a checkout installs itself in `make setup`), or a note that it is not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"med3dvlm {version('med3dvlm')}"
    except PackageNotFoundError:
        return "med3dvlm (not installed; run from a checkout)"


DAMAGED = "damaged file: "  # how a damaged file's error begins (`data.verified`), wherever Ray carries it
NO_SPACE = "cannot write: "  # how a full disk's error begins (`data.shards`)


def one_line(error: BaseException) -> str | None:
    """The line of a damaged file or a full disk inside an error Ray raised on its behalf (a task's, a Train
    worker's), if there is one."""
    import re

    m = re.search(f"({re.escape(DAMAGED)}|{re.escape(NO_SPACE)})" + r"[^\n]*", str(error))
    return m.group(0).removesuffix("'").strip() if m else None


def run_cli(main):
    """Apply the environment defaults, run `main()`; bad input exits 2 with one line, never a traceback."""
    from med3dvlm.storage import StoreError

    apply_env_defaults()
    try:
        return main()
    except Exception as e:  # noqa: BLE001 - bad input (ours, or a damaged shard met inside a Ray task or worker)
        line = one_line(e)  # a damaged file's line, not the traceback Ray wraps it in
        if line is None and not isinstance(e, (UserError, StoreError)):
            raise
        print(f"error: {line or e}", file=sys.stderr)
        sys.exit(2)
