"""The stage driver: checks every input, plans the steps, runs one Ray Train `TorchTrainer` (DeepSpeed ZeRO inside
`train.loop`), and writes `<out>/stage<N>/` (the export, its lineage.json, run.json, history.json, curves.png, TensorBoard events);
Ray Train's run (DeepSpeed checkpoints) goes to `<out>/ray/`. Bad input fails before any worker starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from med3dvlm import lineage, storage
from med3dvlm.data import features
from med3dvlm.models.export import ExportError, check_tensors, read_meta
from med3dvlm.runtime import UserError, allocator_env, init_ray, log_level, sha256_json, write_run_json
from med3dvlm.train.datasets import StageData
from med3dvlm.train.plan import RunPlan, plan_steps
from med3dvlm.train.stages import get_stage


def check_shards(cfg, shards: str) -> dict:
    """The shards' manifest; refuses a folder without shards or with volumes of another shape."""
    from med3dvlm.data.shards import shard_files

    shard_files(shards)
    man = storage.join(shards, "manifest.json")
    if not storage.is_file(man):
        raise UserError(f"--shards {shards}: no manifest.json beside the shards; run pipelines.preprocess")
    manifest = storage.read_json(man)
    if tuple(manifest["config"]["shape"]) != tuple(cfg.data.shape):
        raise UserError(f"--shards {shards} hold volumes of shape {tuple(manifest['config']['shape'])}, "
                        f"the config asks for {tuple(cfg.data.shape)} (set data.shape or re-run preprocessing)")
    return manifest


def check_init(cfg, stage, init: str | None) -> None:
    """The previous stage's export: present when needed, of the right kind, encoder and input shape."""
    meta = None
    if init:
        try:
            meta = read_meta(init, stage.init_kind)
            check_tensors(init)
        except ExportError as e:
            raise UserError(f"--init {e}; stage {stage.number} needs the export of stage "
                            f"{max(stage.number - 1, 1)}") from None
    stage.check_init(cfg, init, meta)


def check_inputs(cfg, stage, shards: str, init: str | None) -> dict:
    """Every reason to refuse, found before any worker starts. Returns the shards' manifest."""
    manifest = check_shards(cfg, shards)
    stage.check_models(cfg, init)
    check_init(cfg, stage, init)
    if cfg.train.materialize and cfg.train.augment:
        raise UserError("train.materialize=true would repeat the first epoch's augmentation draws in every epoch; "
                        "set train.augment=false with it")
    if not 1 <= cfg.train.closed_orders <= 4:
        raise UserError(f"train.closed_orders={cfg.train.closed_orders}: a closed question has 1 to 4 orders of its "
                        "choices (rotations)")
    return manifest


def check_resources(cfg) -> None:
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker
    if res.get("CPU", 0) < need_cpu:
        raise UserError(f"train.num_workers={cfg.train.num_workers} x {cfg.train.cpus_per_worker} CPU needs {need_cpu} "
                        f"CPUs; the cluster has {res.get('CPU', 0):g}")
    if cfg.train.use_gpu and res.get("GPU", 0) < cfg.train.num_workers:
        raise UserError(f"train.num_workers={cfg.train.num_workers} with use_gpu needs {cfg.train.num_workers} GPUs; "
                        f"the cluster has {res.get('GPU', 0):g}")


def warn_if_unshared(out: str, log) -> None:
    """A plain path on a multi-node cluster only works when every node mounts it (NFS): say so once."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_uri(out) and len(nodes) > 1:
        log(f"[train] note: --out {out} is a local path on a {len(nodes)}-node cluster; it must be a shared mount on "
            f"every node (or use a URI such as s3://bucket/ckpt)")


def make_trainer(cfg, stage, shards: str, out: str, plan: RunPlan, callbacks, name: str | None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from med3dvlm.train.loop import train_loop_per_worker

    datasets = {"train": StageData(cfg, stage, shards)}
    if plan.validate:
        datasets["validation"] = StageData(cfg, stage, shards, cfg.train.validation_split, training=False)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage.join(out, "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures), callbacks=callbacks,
                             logging_config=LoggingConfig(log_level=log_level()),  # per-checkpoint lines: log files
                             worker_runtime_env={"env_vars": allocator_env()}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options(cfg.train.preserve_order)),
    )


def ingest_options(preserve_order: bool = False):
    """Ray Train's default ingest options (the driver's Ray Data settings) less `exclude_resources`, which Ray Train
    2.60's own default passes and Ray Data then reports as deprecated once per run; in order if asked
    (`train.preserve_order`)."""
    from ray.data import DataContext, ExecutionOptions

    opts = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=opts.resource_limits, preserve_order=opts.preserve_order or preserve_order,
                            verbose_progress=opts.verbose_progress)


def train(cfg, stage: int, shards: str, out: str, init: str | None = None, log=print, callbacks=None,
          name: str | None = None) -> dict:
    """Train one stage (`--stage N`); returns {"export", "figures", "history", "checkpoint"}."""
    from med3dvlm.plots import plot_curves

    started, stage = time.time(), get_stage(stage)
    manifest = check_inputs(cfg, stage, shards, init)
    init_ray()
    check_resources(cfg)
    cache = features.prepare(cfg, stage, shards, manifest, init, log)
    stage = stage.reading(cache)
    out = storage.absolute(out)
    export = storage.join(out, stage.name)
    plan = replace(plan_steps(cfg, stage, shards), init=storage.absolute(init) if init else None, export=export,
                   tensorboard=storage.join(export, "tensorboard"), log_level=log_level(), feature_cache=cache)
    warn_if_unshared(out, log)
    storage.delete(storage.join(export, "placement.json"))  # the loop appends one entry per (re)start of this run
    log(f"[train] stage {stage.number}: {plan.samples} samples, {plan.steps_per_epoch} steps/epoch x "
        f"{stage.settings(cfg).epochs:g} epochs = {plan.total_steps} steps on {cfg.train.num_workers} workers "
        f"({'GPU' if cfg.train.use_gpu else 'CPU'}, ZeRO-{cfg.train.zero_stage}); validation "
        + (f"every {plan.eval_every} steps" if plan.validate else "off"))
    name = name or run_name(cfg, stage, manifest, init, out)
    if storage.is_file(storage.join(out, "ray", name, "checkpoint_manager_snapshot.json")):
        log(f"[train] {storage.join(out, 'ray', name)} exists: the same command ran before; resuming from its last "
            f"checkpoint")
    result = make_trainer(cfg, stage, shards, out, plan, callbacks, name).fit()
    if result.error:
        raise result.error
    history = read_history(export)
    figures = summarize(history, stage)
    figures["restored_from_checkpoint"] = bool(history and history[0]["step"] > 0)
    record = lineage.record(cfg, stage.number, shards, manifest, export, init)
    lineage.write(export, record)
    write_run_json(export, cfg, {"shards_manifest": sha256_json(manifest), "init": init, "samples": plan.samples,
                                 "feature_cache": cache, "lineage": lineage.summary(record)}, figures, started)
    with storage.staged(export) as d:
        plot_curves(history, Path(d) / "curves.png", stage.number, stage.step_figures)
    log(f"[train] stage {stage.number} done in {time.time() - started:.0f} s: loss "
        f"{figures.get('loss_first', math.nan):.3f} -> {figures.get('loss_last', math.nan):.3f}, "
        f"{figures.get('samples_per_s', 0):.1f} samples/s, data wait "
        f"{100 * figures.get('data_wait_fraction', 0):.0f}% -> {export}")
    return {"export": export, "figures": figures, "history": history, "checkpoint": result.checkpoint}


def run_name(cfg, stage, manifest: dict, init: str | None, out: str) -> str:
    """Ray Train's run name, from what the run is (config, stage, shards, --init, --out): the same command again
    finds the run a killed driver left and resumes it (Ray Train V2 resumes a run of the same name and storage)."""
    key = sha256_json({"config": cfg.to_dict(), "stage": stage.number, "shards": sha256_json(manifest),
                       "init": storage.absolute(init) if init else None, "out": out})
    return f"{stage.name}-{key[:12]}"


def read_history(export: str) -> list[dict]:
    f = storage.join(export, "history.json")
    if not storage.is_file(f):
        raise RuntimeError(f"training finished but {f} is missing: rank 0 wrote the export on a disk this driver "
                           f"cannot see; on a multi-node cluster give --out a shared path or a URI (s3://...)")
    return storage.read_json(f)


def summarize(history: list[dict], stage) -> dict:
    """First and last fifth's mean loss, steady-state samples/s and data-wait fraction (and the stage's own figures,
    stage 1's t and b, at the last step)."""
    if not history:
        return {}
    k = max(1, len(history) // 5)
    steady = history[1:] or history
    wait = sum(h["data_wait_s"] for h in steady)
    comp = sum(h["compute_s"] for h in steady)
    fig = {"steps": len(history), "first_step": history[0]["step"], "last_step": history[-1]["step"],
           "loss_first": sum(h["loss"] for h in history[:k]) / k, "loss_last": sum(h["loss"] for h in history[-k:]) / k,
           "samples_per_s": sum(h["samples_per_s"] for h in steady) / len(steady),
           "data_wait_fraction": wait / max(wait + comp, 1e-9)}
    return {**fig, **stage.summary(history)}
