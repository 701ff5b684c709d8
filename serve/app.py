"""Ray Serve application: report generation, VQA and retrieval over HTTP, with autoscaling and a web viewer.

    serve run med3dvlm.serve.app:build_app model=out/demo/ckpt/stage3 clip=out/demo/ckpt/stage1 index=out/demo/shards
    serve deploy serve/config.yaml                       # a cluster: deployments' replicas/autoscaling from the file

This module is the builder; the deployments are in `serve.deployments`, the HTTP API in `serve.api`, composed with
DeploymentHandles. Arguments (`key=value` after the import path, or `args:` in YAML):

    model          stage-2/3 export (reports, VQA)            clip / index   stage-1 export and shards (retrieval)
                   (each a path or a storage URI such as s3://bucket/ckpt/stage3; a URI is copied once per node)
    config         preprocessing preset/YAML (default: as      token          bearer token (or $MED3DVLM_SERVE_TOKEN)
                   the export records its training data)
    max_upload_mb  upload limit (256)                          cache_size     uploads kept for follow-up requests (256)
    uploads        where uploads are kept, by content hash: a path or URI every ingress replica reaches (default: a
                   folder in this machine's temp dir; with ingress replicas on several nodes give s3://... or NFS)
    device         cpu | cuda (cpu)                            index_split    only this split in the index (all)
    dtype          the Encoder's and Generator's weights: float32 (default) | bfloat16 | float16 (on a GPU)
    replica_cpus   CPUs per replica for every deployment (default: each deployment's own)
    gpus_per_replica  GPUs for each Encoder and Generator replica when device=cuda (1)
    replicas       a fixed number of Encoder and Generator replicas instead of autoscaling
    ingress_replicas  a fixed number of `Api` (HTTP ingress) replicas instead of autoscaling
    upscale_delay_s / downscale_delay_s   the autoscaled deployments' delays (5 / 60 s)
    look_back_period_s / metrics_interval_s  how long a window Serve averages the ongoing requests over and how
                   often replicas report them (Serve's own defaults: 30 / 10 s); shorter reacts sooner
"""

import dataclasses
import os
import re
import sys

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from ray import serve

from med3dvlm.settings import ARGS, load_settings, setting

from .api import Api
from .deployments import Encoder, Generator, Preprocessor, Retriever

__all__ = ["build_app", "APP_ARGS", "AppArgs", "AppSettings", "Api", "Encoder", "Generator", "Preprocessor", "Retriever"]


@dataclasses.dataclass
class AppSettings:
    """The application's settings, each with its help and its bounds or choices beside it (`settings.setting`),
    loaded by the project's one settings loader (`AppArgs` below hands them to it)."""

    model: str | None = setting(None, "stage-2/3 export for reports and VQA (path or URI)")
    clip: str | None = setting(None, "stage-1 export for retrieval (with index)")
    index: str | None = setting(None, "shards whose volumes and reports retrieval searches (with clip)")
    index_split: str | None = setting(None, "only this split in the index (None: all)")
    index_split_field: str = setting("split", "the field index_split reads", choices=("split", "case_split"))
    config: str | None = setting(None, "preprocessing preset or YAML (default: as the export records its data)")
    token: str | None = setting(None, "bearer token (or $MED3DVLM_SERVE_TOKEN); none: no auth")
    max_upload_mb: float = setting(256, "upload limit in MiB", 0.001)
    cache_size: int = setting(256, "uploads kept for follow-up requests", 1)
    uploads: str | None = setting(None, "where uploads are kept: a path or URI every ingress replica reaches")
    device: str = setting("cpu", "cpu or cuda[:N]")
    dtype: str | None = setting(None, "Encoder and Generator weights (None: float32; half precision on a GPU)",
                                choices=("float32", "bfloat16", "float16"))
    replica_cpus: float | None = setting(None, "CPUs per replica for every deployment", 0.001)
    gpus_per_replica: float | None = setting(None, "GPUs per Encoder and Generator replica with device=cuda (1)", 0.001)
    replicas: int | None = setting(None, "a fixed number of Encoder and Generator replicas instead of autoscaling", 1)
    ingress_replicas: int | None = setting(None, "a fixed number of Api (HTTP ingress) replicas", 1)
    upscale_delay_s: float | None = setting(None, "autoscaling: seconds before adding replicas (5)", 0.0)
    downscale_delay_s: float | None = setting(None, "autoscaling: seconds before removing replicas (60)", 0.0)
    look_back_period_s: float | None = setting(None, "autoscaling: the window ongoing requests are averaged over", 0.0)
    metrics_interval_s: float | None = setting(None, "autoscaling: how often replicas report their load", 0.0)

    def __post_init__(self):
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"argument 'device' is {self.device!r}; it must be cpu or cuda (cuda:N for one GPU)")


class AppArgs(BaseModel):
    """The typed arguments Serve validates before it calls `build_app` (Ray Serve's typed application builder): the
    `key=value` arguments of `serve run`, or `args:` in a deploy config, loaded into `AppSettings` by the one settings
    loader, so an unknown argument is refused with the nearest known one and a number out of bounds names its bounds.
    Under the `serve` command line a refusal is one line and exit 2, not a traceback."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    settings: AppSettings

    @model_validator(mode="before")
    @classmethod
    def _load(cls, data):
        if isinstance(data, AppSettings):
            return {"settings": data}
        if isinstance(data, dict) and isinstance(data.get("settings"), AppSettings):
            return data
        try:
            return {"settings": load_settings(AppSettings, dict(data), ARGS)}
        except ValueError as e:
            refuse(e)


AUTOSCALE_ARGS = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metrics_interval_s")
APP_ARGS = {f.name for f in dataclasses.fields(AppSettings)}


def refuse(e: Exception):
    """Under the `serve` command line: one line and exit 2; elsewhere the error itself (a ValueError naming it)."""
    if os.path.basename(sys.argv[0]) != "serve":
        raise e
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def data_settings(meta: dict, config: str | None) -> dict:
    """How uploads are preprocessed: as the export records its training data, or (older exports) from `config`."""
    from med3dvlm.config import load_config

    if "data" in meta and config is None:
        return {"window": list(meta["data"]["window"]), "window_mode": meta["data"]["window_mode"]}
    cfg = load_config(config or "tiny")
    return {"window": list(cfg.data.window), "window_mode": cfg.data.window_mode}


def build_app(args: AppArgs) -> serve.Application:
    """`serve run med3dvlm.serve.app:build_app model=DIR [clip=DIR index=SHARDS] [token=...] ...`: Serve validates the
    arguments into `AppArgs` first; a Python caller may pass a dict. Bad arguments or exports raise ValueError naming
    them; under the `serve` command line, one line and exit 2 instead of a traceback."""
    from med3dvlm.runtime import UserError
    from med3dvlm.storage import StoreError

    try:
        a = (args if isinstance(args, AppArgs) else AppArgs.model_validate(args)).settings
        return _build_app(a)
    except ValidationError as e:  # a dict a Python caller passed: the loader's own line
        refuse(e.errors()[0].get("ctx", {}).get("error", e))
    except (ValueError, UserError, StoreError) as e:
        refuse(e)


def _build_app(a: AppSettings) -> serve.Application:
    from med3dvlm import storage
    from med3dvlm.models.export import CLIP, VLM, check_tensors, read_meta
    from med3dvlm.runtime import apply_env_defaults

    apply_env_defaults()
    if not a.model:
        raise ValueError("model=DIR: give a stage-2/3 export directory or URI")
    model = storage.absolute(a.model)
    meta = read_meta(model, VLM)
    check_tensors(model)
    clip, index = [storage.absolute(v) if v else None for v in (a.clip, a.index)]
    if bool(clip) != bool(index):
        raise ValueError("retrieval needs both clip=DIR (stage-1 export) and index=SHARDS")
    if clip:
        read_meta(clip, CLIP)
        check_tensors(clip)
    max_bytes = int(a.max_upload_mb * (1 << 20))
    token = a.token or os.environ.get("MED3DVLM_SERVE_TOKEN") or None
    deps = {d.name: d for d in (Api, Preprocessor, Encoder, Generator) + ((Retriever,) if clip else ())}
    deps = place(deps, a, cluster_resources())
    info = {"path": str(model), "encoder": meta["model"]["encoder"], "input_shape": meta["input_shape"],
            "llm": meta["model"]["llm"], "lora": meta["lora"]}
    retriever = deps["Retriever"].bind(clip, index, a.index_split, a.index_split_field) if clip else None
    settings = data_settings(meta, a.config)
    pre = deps["Preprocessor"].bind(meta["input_shape"], settings, max_bytes)
    return deps["Api"].bind(pre, deps["Encoder"].bind(model, a.device, a.dtype),
                            deps["Generator"].bind(model, a.device, a.dtype), retriever,
                            upload_store(a, {"input_shape": list(meta["input_shape"]), **settings}),
                            token, max_bytes, info)


def upload_store(a: AppSettings, preprocessing: dict) -> dict:
    """Where the ingress replicas keep uploads (`uploads`, else a private folder in the temp dir) and how many.
    Uploads go to a subfolder named by the preprocessing (input shape, HU window): apps that share a root (two apps
    on one machine, by default) neither resolve each other's ids to a volume their model was not given nor prune
    each other's uploads, unless they preprocess alike."""
    import hashlib
    import json
    import tempfile

    from med3dvlm import storage

    base = a.uploads or os.path.join(tempfile.gettempdir(), f"med3dvlm-uploads-{os.getuid()}")
    key = hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode()).hexdigest()[:12]
    return {"root": storage.join(storage.absolute(base), f"prep-{key}"), "max_stored": a.cache_size}


def cluster_resources() -> dict | None:
    """Where the replicas will run: the Ray this process is attached to, or the local Ray that `serve run` starts
    (this machine's cores and GPUs); None for a cluster `serve run` attaches to later (its autoscaler decides)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    if os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def min_replicas(d) -> int:
    auto = d._deployment_config.autoscaling_config
    return int(auto.min_replicas) if auto else int(d.num_replicas or 1)


def place(deps: dict, a: AppSettings, cluster: dict | None) -> dict:
    """Each deployment with its CPUs (`replica_cpus`, else its own, scaled down to fit the cluster when the minimum
    replicas would not), its GPUs (Encoder and Generator on cuda; refused when the cluster has too few) and
    `replicas=N` (a fixed count for Encoder and Generator), `ingress_replicas=N` (for Api)."""
    gpus = (a.gpus_per_replica or 1) if a.device.startswith("cuda") else 0
    on_gpu = ("Encoder", "Generator")
    fixed = {**({k: a.replicas for k in on_gpu} if a.replicas else {}),
             **({"Api": a.ingress_replicas} if a.ingress_replicas else {})}
    deps.update({k: deps[k].options(num_replicas=n, autoscaling_config=None) for k, n in fixed.items()})
    delays = {k: getattr(a, k) for k in AUTOSCALE_ARGS if getattr(a, k) is not None}
    for k, d in deps.items():
        auto = d._deployment_config.autoscaling_config
        if delays and auto:
            deps[k] = d.options(autoscaling_config={**auto.model_dump(exclude_unset=True), **delays})
    cpus = {k: float(a.replica_cpus or d.ray_actor_options.get("num_cpus", 1)) for k, d in deps.items()}
    if cluster is not None:
        check_gpus({k: min_replicas(deps[k]) * gpus for k in on_gpu}, cluster.get("GPU", 0))
        if a.replica_cpus is None:
            cpus = fit_cpus(cpus, {k: min_replicas(d) for k, d in deps.items()}, cluster.get("CPU", 0))
    return {k: d.options(ray_actor_options={**d.ray_actor_options, "num_cpus": cpus[k],
                                            **({"num_gpus": gpus} if gpus and k in on_gpu else {})})
            for k, d in deps.items()}


def check_gpus(need: dict, have: float) -> None:
    if sum(need.values()) > have + 1e-9:
        parts = " + ".join(f"{k} {v:g}" for k, v in need.items())
        raise ValueError(f"device=cuda needs {sum(need.values()):g} GPUs for the minimum replicas ({parts}); the "
                         f"cluster has {have:g}: pass gpus_per_replica={have / len(need):g} (or device=cpu)")


def fit_cpus(cpus: dict, replicas: dict, have: float) -> dict:
    """Scale every deployment's CPUs by one factor when its minimum replicas ask more than the cluster has."""
    need = sum(cpus[k] * replicas[k] for k in cpus)
    if need <= have:
        return cpus
    scale = have / need
    if scale * min(cpus.values()) < 0.01:
        raise ValueError(f"the minimum replicas ask {need:g} CPUs and the cluster has {have:g}: too few to share; "
                         f"pass replica_cpus=... or attach to a larger cluster (RAY_ADDRESS)")
    fitted = {k: int(v * scale * 100) / 100 for k, v in cpus.items()}
    print(f"med3dvlm: the minimum replicas ask {need:g} CPUs, the cluster has {have:g}: each deployment's CPUs are "
          f"scaled by {scale:.2f} (" + ", ".join(f"{k} {v:g}" for k, v in fitted.items()) + "); replica_cpus=N sets "
          "them", file=sys.stderr, flush=True)
    return fitted
