"""Train one stage on Ray Train + DeepSpeed ZeRO.

    python -m pipelines.train --stage 1 --config tiny --shards /data/shards --out /ckpt
    python -m pipelines.train --stage 2 --config tiny --shards /data/shards --out /ckpt --init /ckpt/stage1
    python -m pipelines.train --stage 3 --config tiny --shards /data/shards --out /ckpt --init /ckpt/stage2

Writes `<out>/stage<N>/` (a from_pretrained directory, run.json, history.json, curves.png, TensorBoard events) and
keeps Ray Train's run (DeepSpeed checkpoints) under `<out>/ray/`. Bad input fails before any worker starts.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from med3dvlm import storage
from pipelines.common import UserError, config_from_args, init_ray, parser, run_main, sha256_json, write_run_json

BUILTIN_TEXT = ("minilm", "tiny-bert")
BUILTIN_LLM = ("tiny-qwen2",)


def qa_splits(cfg, stage: int) -> tuple[str, ...]:
    """Which questions train: the official train CSVs, or (leak-free split) every question of a training volume."""
    base = ("train",) if cfg.train.split_field == "split" else ("train", "val", "test")
    return base + (("yn_train",) if stage == 3 else ())


def count_samples(cfg, stage: int, shards: str) -> int:
    from med3dvlm.data.samples import task_rows
    from med3dvlm.data.shards import read_table

    t = read_table(shards, ["volume_id", "report", "qa"], split="train", split_field=cfg.train.split_field)
    if cfg.train.max_train_volumes > 0:
        t = t.slice(0, cfg.train.max_train_volumes)
    if stage == 1:
        return len(t)
    splits = qa_splits(cfg, stage)
    return sum(len(task_rows({**r, "volume": None}, stage, splits)) for r in t.to_pylist())


def build_dataset(cfg, stage: int, shards: str, split: str = "train", training: bool = True):
    """A stage's samples from one split; training data is subset (`max_train_volumes`) and augmented, validation not."""
    from med3dvlm.data.samples import as_float, augment, task_rows, tokenize_reports, tokenize_tasks
    from med3dvlm.data.shards import read_shards

    cols = ["volume_id", "volume", "report"] + (["qa"] if stage > 1 else [])
    ds = read_shards(shards, split=split, split_field=cfg.train.split_field, columns=cols)
    if training and cfg.train.max_train_volumes > 0:
        ds = ds.limit(cfg.train.max_train_volumes)
    aug = augment if training and cfg.train.augment else as_float
    if stage == 1:
        return ds.map_batches(aug, batch_size=8).map_batches(
            tokenize_reports, batch_size=16, fn_kwargs={"text_encoder": cfg.model.text_encoder, "max_len": cfg.model.text_max_len})
    ds = ds.flat_map(task_rows, fn_kwargs={"stage": stage, "qa_splits": qa_splits(cfg, stage)})
    return ds.map_batches(aug, batch_size=8).map_batches(tokenize_tasks, batch_size=32, fn_kwargs={
        "llm": cfg.model.llm, "n_image": cfg.model.image_tokens, "max_len": cfg.model.max_len})


def check_inputs(cfg, stage: int, shards: str, init: str | None) -> dict:
    """Every reason to refuse, found before any worker starts. Returns the shards' manifest."""
    from med3dvlm.data.shards import list_shards

    man = storage.join(shards, "manifest.json")
    if not storage.is_file(man) or not list_shards(shards):
        raise UserError(f"--shards {shards}: no shards there (manifest.json and volumes/part-*.parquet); run pipelines.preprocess")
    manifest = storage.read_json(man)
    if tuple(manifest["config"]["shape"]) != tuple(cfg.data.shape):
        raise UserError(f"--shards {shards} hold volumes of shape {tuple(manifest['config']['shape'])}, "
                        f"the config asks for {tuple(cfg.data.shape)} (set data.shape or re-run preprocessing)")
    if cfg.model.text_encoder not in BUILTIN_TEXT and stage == 1 and not init and not storage.exists(cfg.model.text_encoder):
        raise UserError(f"model.text_encoder {cfg.model.text_encoder}: does not exist (models load from paths or storage URIs, never a hub)")
    if cfg.model.llm not in BUILTIN_LLM and stage == 2 and not storage.exists(cfg.model.llm):
        raise UserError(f"model.llm {cfg.model.llm}: does not exist (models load from paths or storage URIs, never a hub)")
    if stage > 1 and not init:
        raise UserError(f"stage {stage} starts from stage {stage - 1}'s export: pass --init DIR")
    if init:
        f = storage.join(init, "config.json")
        if not storage.is_file(f):
            raise UserError(f"--init {init}: not an exported model directory (no config.json)")
        meta = storage.read_json(f)
        want = "med3dvlm-clip" if stage <= 2 else "med3dvlm-vlm"
        if meta.get("kind") != want:
            raise UserError(f"--init {init}: holds a {meta.get('kind')} model; stage {stage} needs the export of stage "
                            f"{stage - 1 if stage > 1 else 1} ({want})")
        if meta["model"]["encoder"] != cfg.model.encoder:
            raise UserError(f"--init {init}: encoder {meta['model']['encoder']} != config's {cfg.model.encoder}")
        if stage == 3 and tuple(meta["input_shape"]) != tuple(cfg.data.shape):
            raise UserError(f"--init {init}: trained at {tuple(meta['input_shape'])}, the config asks for {tuple(cfg.data.shape)}")
    return manifest


def warn_if_unshared(out: str, log) -> None:
    """A plain path on a multi-node cluster only works when every node mounts it (NFS): say so once."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_uri(out) and len(nodes) > 1:
        log(f"[train] note: --out {out} is a local path on a {len(nodes)}-node cluster; it must be a shared mount on "
            f"every node (or use a URI such as s3://bucket/ckpt)")


def check_resources(cfg) -> None:
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker
    if res.get("CPU", 0) < need_cpu:
        raise UserError(f"train.num_workers={cfg.train.num_workers} x {cfg.train.cpus_per_worker} CPU needs {need_cpu} CPUs; "
                        f"the cluster has {res.get('CPU', 0):g}")
    if cfg.train.use_gpu and res.get("GPU", 0) < cfg.train.num_workers:
        raise UserError(f"train.num_workers={cfg.train.num_workers} with use_gpu needs {cfg.train.num_workers} GPUs; "
                        f"the cluster has {res.get('GPU', 0):g}")


def count_validation(cfg, shards: str) -> int:
    from med3dvlm.data.shards import read_table

    return len(read_table(shards, ["volume_id"], split=cfg.train.validation_split, split_field=cfg.train.split_field))


def train(cfg, stage: int, shards: str, out: str, init: str | None = None, log=print, callbacks=None,
          name: str | None = None) -> dict:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from med3dvlm.train.loop import train_loop_per_worker

    started = time.time()
    if stage not in (1, 2, 3):
        raise UserError(f"--stage must be 1, 2 or 3, not {stage}")
    manifest = check_inputs(cfg, stage, shards, init)
    validate = stage == 1 and cfg.train.eval_every > 0
    if validate and count_validation(cfg, shards) < 2:
        raise UserError(f"train.eval_every needs validation pairs: --shards {shards} has fewer than 2 rows with "
                        f"{cfg.train.split_field}={cfg.train.validation_split}")
    init_ray()
    check_resources(cfg)
    st = cfg.stage(stage)
    n = count_samples(cfg, stage, shards)
    per_step = st.batch_size * cfg.train.num_workers
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{n} training samples is fewer than one global batch ({st.batch_size} x {cfg.train.num_workers} workers)")
    total = math.ceil(st.epochs * steps_per_epoch)
    if st.max_steps > 0:
        total = min(total, st.max_steps)
    out = storage.absolute(out)
    export = storage.join(out, f"stage{stage}")
    warn_if_unshared(out, log)
    storage.delete(storage.join(export, "placement.json"))  # the loop appends one entry per (re)start of this run
    log(f"[train] stage {stage}: {n} samples, {steps_per_epoch} steps/epoch x {st.epochs:g} epochs = {total} steps "
        f"on {cfg.train.num_workers} workers ({'GPU' if cfg.train.use_gpu else 'CPU'}, ZeRO-{cfg.train.zero_stage})")
    datasets = {"train": build_dataset(cfg, stage, shards)}
    if validate:
        datasets["validation"] = build_dataset(cfg, 1, shards, cfg.train.validation_split, training=False)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stage": stage, "init": storage.absolute(init) if init else None,
                           "steps_per_epoch": steps_per_epoch, "total_steps": total, "export": export,
                           "tensorboard": storage.join(export, "tensorboard")},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(name=name or f"stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=storage.join(out, "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures), callbacks=callbacks),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    hist_f = storage.join(export, "history.json")
    if not storage.is_file(hist_f):
        raise RuntimeError(f"training finished but {hist_f} is missing: rank 0 wrote the export on a disk this driver "
                           f"cannot see; on a multi-node cluster give --out a shared path or a URI (s3://...)")
    history = storage.read_json(hist_f)
    figures = summarize(history, stage)
    figures["restored_from_checkpoint"] = bool(history and history[0]["step"] > 0)
    write_run_json(export, cfg, {"shards_manifest": sha256_json(manifest), "init": init, "samples": n}, figures, started)
    with storage.staged(export) as d:
        plot_curves(history, Path(d) / "curves.png", stage)
    log(f"[train] stage {stage} done in {time.time() - started:.0f} s: loss {figures.get('loss_first', float('nan')):.3f} -> "
        f"{figures.get('loss_last', float('nan')):.3f}, {figures.get('samples_per_s', 0):.1f} samples/s, "
        f"data wait {100 * figures.get('data_wait_fraction', 0):.0f}% -> {export}")
    return {"export": export, "figures": figures, "history": history, "checkpoint": result.checkpoint}


def summarize(history: list[dict], stage: int) -> dict:
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
    if stage == 1:
        fig["t_last"], fig["b_last"] = history[-1]["t"], history[-1]["b"]
    return fig


def plot_curves(history: list[dict], path: Path, stage: int) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "lr", "samples_per_s"] + (["t", "b"] if stage == 1 else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    steps = [h["step"] for h in history]
    for ax, k in zip(axes, keys):
        ax.plot(steps, [h[k] for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(f"stage {stage}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def arg_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
    p.add_argument("--shards", required=True, help="preprocessed shards: a path or a URI (s3://bucket/shards)")
    p.add_argument("--out", required=True, help="where stage<N>/ (the export) and ray/ (checkpoints) go: a path or a URI; "
                                                "on a multi-node cluster a shared path or a URI")
    p.add_argument("--init", default=None, help="the previous stage's export (required for stages 2 and 3)")
    return p


def main(argv=None):
    args = arg_parser().parse_args(argv)
    cfg = config_from_args(args)
    return train(cfg, args.stage, args.shards, args.out, args.init)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
