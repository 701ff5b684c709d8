"""Ray Serve application: report generation, VQA and retrieval over HTTP, with autoscaling and a web viewer.

    serve run serve.app:build_app model=out/demo/ckpt/stage3 clip=out/demo/ckpt/stage1 index=out/demo/shards
    serve deploy serve/config.yaml                       # a cluster: deployments' replicas/autoscaling from the file

This module is the builder; the deployments are in `serve.deployments`, the HTTP API in `serve.api`, composed with
DeploymentHandles. Arguments (`key=value` after the import path, or `args:` in YAML):

    model          stage-2/3 export (reports, VQA)            clip / index   stage-1 export and shards (retrieval)
                   (each a path or a storage URI such as s3://bucket/ckpt/stage3; a URI is copied once per node)
    config         preprocessing preset/YAML (default: as      token          bearer token (or $MED3DVLM_SERVE_TOKEN)
                   the export records its training data)
    max_upload_mb  upload limit (256)                          cache_size     volumes kept for follow-up questions (64)
    device         cpu | cuda (cpu)                            index_split    only this split in the index (all)
    dtype          the Encoder's and Generator's weights: float32 (default) | bfloat16 | float16 (on a GPU)
    replica_cpus   CPUs per replica for every deployment (default: each deployment's own)
    gpus_per_replica  GPUs for each Encoder and Generator replica when device=cuda (1)
    replicas       a fixed number of Encoder and Generator replicas instead of autoscaling
"""

import os

from ray import serve

from serve.api import Api
from serve.deployments import Encoder, Generator, Preprocessor, Retriever, VolumeCache

__all__ = ["build_app", "APP_ARGS", "Api", "Encoder", "Generator", "Preprocessor", "Retriever", "VolumeCache"]
APP_ARGS = {"model", "clip", "index", "index_split", "index_split_field", "config", "token", "max_upload_mb",
            "cache_size", "device", "dtype", "replica_cpus", "gpus_per_replica", "replicas"}


def data_settings(meta: dict, config: str | None) -> dict:
    """How uploads are preprocessed: as the export records its training data, or (older exports) from `config`."""
    from med3dvlm.config import load_config

    if "data" in meta and config is None:
        return {"window": list(meta["data"]["window"]), "window_mode": meta["data"]["window_mode"]}
    cfg = load_config(config or "tiny")
    return {"window": list(cfg.data.window), "window_mode": cfg.data.window_mode}


def build_app(args: dict) -> serve.Application:
    """`serve run serve.app:build_app model=DIR [clip=DIR index=SHARDS] [token=...] ...`"""
    from med3dvlm import storage
    from med3dvlm.models.export import CLIP, VLM, read_meta
    from med3dvlm.runtime import apply_env_defaults

    apply_env_defaults()
    unknown = sorted(set(args) - APP_ARGS)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; the app takes {', '.join(sorted(APP_ARGS))}")
    model = args.get("model")
    if not model:
        raise ValueError("model=DIR: give a stage-2/3 export directory or URI")
    model = storage.absolute(model)
    meta = read_meta(model, VLM)
    clip, index = [storage.absolute(args[k]) if args.get(k) else None for k in ("clip", "index")]
    if bool(clip) != bool(index):
        raise ValueError("retrieval needs both clip=DIR (stage-1 export) and index=SHARDS")
    if clip:
        read_meta(clip, CLIP)
    max_bytes = int(float(args.get("max_upload_mb", 256)) * (1 << 20))
    token = args.get("token") or os.environ.get("MED3DVLM_SERVE_TOKEN") or None
    device, dtype = args.get("device", "cpu"), args.get("dtype")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype}: float32, bfloat16 or float16")
    cpus = args.get("replica_cpus")  # one CPU figure for every deployment (small machines, tests)
    gpus = float(args.get("gpus_per_replica", 1)) if device.startswith("cuda") else 0
    fixed = args.get("replicas")  # a fixed replica count for Encoder and Generator (benchmarks), no autoscaling

    def opt(d, gpu: bool = False):
        res = {"num_cpus": float(cpus)} if cpus is not None else {}
        if gpu and gpus:
            res["num_gpus"] = gpus
        d = d.options(ray_actor_options={**d.ray_actor_options, **res}) if res else d
        return d.options(num_replicas=int(fixed), autoscaling_config=None) if gpu and fixed else d

    info = {"path": str(model), "encoder": meta["model"]["encoder"], "input_shape": meta["input_shape"],
            "llm": meta["model"]["llm"], "lora": meta["lora"]}
    retriever = opt(Retriever).bind(clip, index, args.get("index_split"), args.get("index_split_field", "split")) \
        if clip else None
    pre = opt(Preprocessor).bind(meta["input_shape"], data_settings(meta, args.get("config")), max_bytes)
    return opt(Api).bind(pre, opt(Encoder, True).bind(model, device, dtype), opt(Generator, True).bind(model, device, dtype),
                         retriever, opt(VolumeCache).bind(int(args.get("cache_size", 64))), token, max_bytes, info)
