"""`train_loop_per_worker` for the three stages: the model from config, DeepSpeed ZeRO, Ray Train data and checkpoints.

Runs inside Ray Train workers (the process group is Ray's: gloo on CPU, nccl on GPU). Each step logs loss, lr,
samples/s, data-wait vs compute time (and t, b in stage 1). Every rank saves its DeepSpeed shard and reports it;
a restarted worker resumes from the last one. At the end rank 0 exports a `from_pretrained` directory.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings

import torch

from med3dvlm import storage
from med3dvlm.config import Config, config_from_dict
from med3dvlm.models.prompt import trim_padding
from med3dvlm.runtime import ray_data_log_level
from med3dvlm.train.precise_bn import RecentVolumes


def deepspeed_config(cfg: Config, stage: int, use_gpu: bool) -> dict:
    st = cfg.stage(stage)
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": st.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": st.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_gpu and cfg.train.bf16)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio)))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, text_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on everything trainable except biases and norm weights (as HF Trainer does; t' is decayed);
    the stage-1 text tower (`text.*`) at lr x text_lr_scale."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith("bias") or p.ndim == 1 and "t_prime" not in name)
        scale = text_lr_scale if name.startswith("text.") else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if d else 0.0, "lr": lr * sc} for (d, sc), ps in groups.items()]


def build_model(cfg: Config, stage: int, init: str | None):
    from med3dvlm.models.clip import CLIPModel
    from med3dvlm.models.export import data_info
    from med3dvlm.models.vlm import VLM

    if stage == 1:
        model = CLIPModel.from_pretrained(init) if init else CLIPModel.from_config(cfg.model)
        if cfg.stage(1).text_lr_scale == 0:  # frozen: no gradients, optimizer state or all-reduce for the tower
            model.text.requires_grad_(False)
    elif stage == 2:
        model = VLM.from_config(cfg.model, cfg.data.shape)
        if init:
            model.vision.load_state_dict(CLIPModel.from_pretrained(init).vision.state_dict())
    else:
        model = VLM.from_pretrained(init) if init else VLM.from_config(cfg.model, cfg.data.shape)
    if stage > 1:
        model.set_stage(stage)
    model.data = data_info(cfg.data)  # the export records how its inputs were made
    return model


def _stub_deepspeed_jit() -> None:
    # The CPU accelerator JIT-builds a shared-memory comm op (35 s, 3 GB) inside initialize(); gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def gathered_state(model) -> dict:
    """The full state dict of a ZeRO-3 model, gathered one module at a time (every rank takes part): the peak is
    one module's parameters, never the whole model. Rank 0 gets CPU copies; the other ranks an empty dict."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    keys, state = set(model.state_dict()), {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(prefix=name, recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank == 0:
                state.update({k: p.detach().cpu().clone() for k, p in params if k in keys})
    if rank == 0:  # buffers (BatchNorm statistics) are never partitioned
        state.update({k: b.detach().cpu().clone() for k, b in model.named_buffers() if k in keys})
    return state


def export_model(engine, model, out: str, zero_stage: int) -> None:
    """Rank 0 writes a from_pretrained directory; under ZeRO-3 every rank takes part in gathering the weights."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = gathered_state(model) if zero_stage == 3 else None
    if rank == 0:
        with storage.staged(out) as d:
            model.save_pretrained(d, state=state)
    if dist.is_initialized():
        dist.barrier()


def setup_engine(cfg: Config, config: dict, device):
    """The stage's model, AdamW with a cosine schedule, wrapped by `deepspeed.initialize`; (engine, scheduler)."""
    import deepspeed

    stage, use_gpu = config["stage"], cfg.train.use_gpu
    st = cfg.stage(stage)
    model = build_model(cfg, stage, config.get("init"))
    model.to(memory_format=torch.contiguous_format)  # DeepSpeed broadcasts and flattens parameters as flat bytes
    if use_gpu:
        model = model.to(device)
    # fused: one pass over the flat fp32 partitions that ZeRO hands it, on CPU as on CUDA (84M parameters on this
    # project's CPU box: 65 ms a step against 227 for torch's per-tensor default, 2026-11-30)
    optimizer = torch.optim.AdamW(param_groups(model, st.lr, st.weight_decay, st.text_lr_scale), lr=st.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config["total_steps"], st.warmup_ratio))
    _stub_deepspeed_jit()
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg, stage, use_gpu))
    return engine, scheduler


def resume(engine) -> int:
    """The step to start from: 0, or the one after the checkpoint Ray Train restored (every rank loads its shard)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="ds")
    return client["step"] + 1


class Progress:
    """Rank 0's progress lines, as HF Trainer / torchtitan print them: every `every` steps, but no sooner than
    `gap` seconds after the last line (a fast stage stays readable), and at each epoch's end."""

    def __init__(self, stage: int, start: int, total: int, steps_per_epoch: int, every: int, gap: float = 0.0):
        self.stage, self.start, self.total, self.per_epoch, self.every = stage, start, total, steps_per_epoch, every
        self.t0 = self.t_line = time.perf_counter()
        self.gap = gap

    def step(self, m: dict) -> None:
        if not self.every:
            return
        done, now = m["step"] + 1, time.perf_counter()
        due = done % self.every == 0 and now - self.t_line >= self.gap
        if not (due or done % self.per_epoch == 0 or done == self.total):
            return
        self.t_line = now
        elapsed = now - self.t0
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        wait = m["data_wait_s"] / max(m["data_wait_s"] + m["compute_s"], 1e-9)
        print(f"[train] stage {self.stage} step {done}/{self.total} epoch {m['epoch'] + 1}: loss {m['loss']:.4f} "
              f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s data wait {100 * wait:.0f}% "
              f"ETA {_clock(eta)}", flush=True)

    def validation(self, m: dict, step: int) -> None:
        if self.every:
            print(f"[train] stage {self.stage} validation at step {step}: loss {m['val_loss']:.4f} "
                  f"R@1 {100 * m['val_R@1']:.1f}% (n={m['val_n']})", flush=True)


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _staging_dir(uri: str) -> str:
    """The node-local folder where TensorBoard writes before an upload to `uri`, named by it: a worker restarted on
    this node replaces the folder a killed one left (its events up to the last checkpoint are in the bucket)."""
    d = os.path.join(tempfile.gettempdir(), f"med3dvlm-tb-{hashlib.sha256(uri.encode()).hexdigest()[:16]}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


class StepLog:
    """Per-step metrics (loss averaged over ranks, lr, samples/s, data wait vs compute, stage 1's t and b) kept in
    `history` and written to TensorBoard by rank 0 (for a URI: to a node-local folder, uploaded at every checkpoint)."""

    def __init__(self, stage: int, batch_size: int, tb: str | None, progress: Progress | None = None):
        self.stage, self.batch_size, self.history, self.progress = stage, batch_size, [], progress
        self.tb = tb
        self.tb_remote = bool(tb) and not storage.is_local(tb)
        self.tb_dir = _staging_dir(tb) if self.tb_remote else tb and storage.resolve(tb)[1]
        self.writer = _tb_writer(self.tb_dir)
        self.t_last = time.perf_counter()

    def step(self, engine, scheduler, step: int, epoch: int, loss, data_s: float, compute_s: float) -> dict:
        import torch.distributed as dist

        loss_v, world = float(loss.detach()), 1
        if dist.is_initialized():
            world = dist.get_world_size()
            lt = torch.tensor([loss_v], device=loss.device)
            dist.all_reduce(lt)
            loss_v = float(lt.item()) / world
        now = time.perf_counter()
        m = {"step": step, "epoch": epoch, "loss": loss_v, "lr": max(scheduler.get_last_lr()),
             "samples_per_s": self.batch_size * world / max(now - self.t_last, 1e-9),
             "data_wait_s": data_s, "compute_s": compute_s}
        self.t_last = now
        if self.stage == 1:
            lf = engine.module.loss_fn
            m["t"], m["b"] = float(lf.temperature.detach()), float(lf.bias.detach())
        self.history.append(m)
        self.scalars(m, step)
        if self.progress:
            self.progress.step(m)
        return m

    def scalars(self, m: dict, step: int, keys=None) -> None:
        if self.writer:
            for k in keys or [k for k in m if k not in ("step", "epoch")]:
                self.writer.add_scalar(f"stage{self.stage}/{k}", m[k], step)

    def sync(self) -> None:
        """Flush the events; for a URI, upload them (at every checkpoint: a restarted run's TensorBoard keeps the
        steps before the failure)."""
        if self.writer:
            self.writer.flush()
            if self.tb_remote:
                storage.copy_dir(self.tb_dir, self.tb)

    def close(self) -> None:
        self.sync()
        if self.writer:
            self.writer.close()
            self.writer = None  # the last checkpoint comes after the export: nothing left to sync then
        if self.tb_remote:
            shutil.rmtree(self.tb_dir, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = config_from_dict(config["cfg"])
    stage, use_gpu = config["stage"], cfg.train.use_gpu
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    # DeepSpeed's ZeRO calls the collective under its deprecated name; the warning is DeepSpeed's to act on
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    # Ray Train's "Reporting training result" line (one per checkpoint and worker) goes to a logger named by its
    # file, outside "ray.train", and Ray Data logs each validation pass: both stay in the log files unless
    # --log-level info asks
    logging.getLogger().setLevel(config.get("log_level", "WARNING"))
    ray_data_log_level(config.get("log_level", "WARNING"))
    engine, scheduler = setup_engine(cfg, config, device)
    start = resume(engine)
    _record_placement(config.get("export"), start, rank, world)
    log = StepLog(stage, cfg.stage(stage).batch_size, config.get("tensorboard") if rank == 0 else None,
                  Progress(stage, start, config["total_steps"], config["steps_per_epoch"],
                           cfg.train.log_every if rank == 0 else 0, cfg.train.log_seconds))
    recent = RecentVolumes(cfg.train.precise_bn_batches)
    run_epochs(cfg, config, engine, scheduler, log, start, device, rank, recent)
    if start >= config["total_steps"]:  # restarted after the last checkpoint: run_epochs had no step left to finish
        finish(cfg, config, engine, log, rank)


def finish(cfg: Config, config: dict, engine, log: StepLog, rank: int) -> None:
    """TensorBoard closed, the export and history.json (rank 0) written: before the run's last report, so a Tune
    trial stopped at that report (max_t) already has its export."""
    log.close()
    if config.get("export"):
        export_model(engine, engine.module, config["export"], cfg.train.zero_stage)
        if rank == 0:
            storage.write_text(storage.join(config["export"], "history.json"), json.dumps(log.history))


def _batches(cfg: Config, stage: int, epoch: int, rank: int):
    """This worker's batches of one epoch; stage 2/3 rows of one volume arrive together (one `expand_tasks` call),
    so a local shuffle buffer, reseeded every epoch, mixes them."""
    import ray.train

    shuffle = {"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
               "local_shuffle_seed": cfg.train.seed + 1000 * rank + epoch} if cfg.train.shuffle_buffer > 0 else {}
    return ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.stage(stage).batch_size, drop_last=True, **shuffle)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for the forward pass: on GPU with `train.bf16`, on CPU with `train.bf16_cpu` as well (the
    weights, gradients and optimizer stay float32 there; DeepSpeed's own bf16 mode is GPU only)."""
    on = cfg.train.bf16 and (device.type == "cuda" or cfg.train.bf16_cpu)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(on))


def train_step(engine, cfg: Config, batch: dict, keys: list[str], device) -> torch.Tensor:
    from med3dvlm.train.augment import apply_augment

    use_gpu = cfg.train.use_gpu
    inputs = {k: v.to(device) for k, v in trim_padding({k: batch[k] for k in keys}).items()}
    inputs["volume"] = apply_augment(inputs["volume"], batch.get("augment"))  # uint8 -> float on the device
    with autocast(cfg, device):
        loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    if use_gpu:
        torch.cuda.synchronize()
    return loss


def run_epochs(cfg: Config, config: dict, engine, scheduler, log: StepLog, start: int, device, rank: int,
               recent: RecentVolumes) -> None:
    """Steps `start` .. total: train, log, validate every `eval_every` (stage 1), checkpoint every `checkpoint_every`
    (or per epoch) and at the end, after the export (`finish`); a resumed run skips the batches its epoch consumed
    before the failure. Precise BatchNorm statistics (from `recent`) come before each validation and the last
    checkpoint, which the export then equals."""
    import ray.train

    stage, steps_per_epoch, total = config["stage"], config["steps_per_epoch"], config["total_steps"]
    keys = ["volume", "input_ids", "attention_mask"] + (["labels"] if stage > 1 else [])
    ckpt_every = cfg.train.checkpoint_every or steps_per_epoch
    every = config.get("eval_every", 0)
    validate = every > 0
    step = start
    while step < total:
        epoch = step // steps_per_epoch
        skip = step - epoch * steps_per_epoch
        t_wait = time.perf_counter()
        for i, batch in enumerate(_batches(cfg, stage, epoch, rank)):
            if i < skip:
                t_wait = time.perf_counter()
                continue
            if i >= steps_per_epoch or step >= total:
                break
            data_s = time.perf_counter() - t_wait
            if step == cfg.train.fail_at_step and start == 0 and rank == 0:
                raise RuntimeError(f"fault injection: worker {rank} fails at step {step}")
            t0 = time.perf_counter()
            loss = train_step(engine, cfg, batch, keys, device)
            recent.add(batch["volume"])
            m = log.step(engine, scheduler, step, epoch, loss, data_s, time.perf_counter() - t0)
            step += 1
            if step == total or (validate and step % every == 0):  # the final checkpoint and export hold them too
                recent.recalibrate(engine.module.vision, device)
            if validate and (step % every == 0 or step == total):
                m.update(validate_stage1(engine.module, device))
                log.scalars(m, step - 1, ("val_loss", "val_R@1"))
                if log.progress:
                    log.progress.validation(m, step)
            if step == total:
                finish(cfg, config, engine, log, rank)
            if step % ckpt_every == 0 or step == total:
                log.sync()
                _save_and_report(engine, m, step - 1)
            elif validate and step % every == 0:
                ray.train.report(dict(m))  # validation figures between checkpoints (Tune's schedulers read them)
            t_wait = time.perf_counter()
        if step < min(total, (epoch + 1) * steps_per_epoch):
            raise RuntimeError(f"rank {rank}: the dataset shard ran dry at step {step} of {total}")


def _record_placement(export: str | None, start: int, rank: int, world: int) -> None:
    """Append this (re)start's rank -> node map to <export>/placement.json (which node ran which worker)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    if rank == 0 and export:
        f = storage.join(export, "placement.json")
        runs = storage.read_json(f) if storage.is_file(f) else []
        runs.append({"start_step": start, "nodes": nodes})
        storage.write_text(f, json.dumps(runs, indent=1))


_VALIDATION: dict = {}  # run name -> this worker's validation batches, when small enough to keep
KEEP_VALIDATION_BYTES = 256 << 20


def _validation_batches():
    """The validation split's batches. A split under KEEP_VALIDATION_BYTES is read once and kept in the worker: a
    Ray Data pass costs seconds of start-up each time, more than the validation itself on a small split. A larger
    split streams on every pass and is never held."""
    import ray.train

    run = ray.train.get_context().get_experiment_name()
    if run in _VALIDATION:
        yield from _VALIDATION[run]
        return
    kept, size = [], 0
    for b in ray.train.get_dataset_shard("validation").iter_torch_batches(batch_size=16):
        if kept is not None:
            size += sum(t.numel() * t.element_size() for t in b.values() if isinstance(t, torch.Tensor))
            kept = None if size > KEEP_VALIDATION_BYTES else kept
            if kept is not None:
                kept.append(b)
        yield b
    if kept is not None:
        _VALIDATION[run] = kept


@torch.no_grad()
def validate_stage1(model, device) -> dict:
    """Sigmoid loss and retrieval recall on the whole validation split (every worker holds all of it)."""
    from med3dvlm.eval.retrieval import retrieval_metrics
    from med3dvlm.train.augment import apply_augment

    was = model.training
    model.eval()
    imgs, txts = [], []
    for b in _validation_batches():
        imgs.append(model.encode_image(apply_augment(b["volume"].to(device), None)).float())
        t = trim_padding({k: b[k] for k in ("input_ids", "attention_mask")})
        txts.append(model.encode_text(t["input_ids"].to(device), t["attention_mask"].to(device)).float())
    model.train(was)
    img, txt = torch.cat(imgs), torch.cat(txts)
    r = retrieval_metrics(img.cpu(), txt.cpu(), ks=(1, 5))
    out = {"val_loss": float(model.loss_fn(img, txt, gather=False)), "val_n": len(img)}
    out.update({f"val_{k}": v for k, v in r.items() if k != "n"})
    out["val_R@1"] = (r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2
    return out


def _save_and_report(engine, metrics: dict, step: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds", client_state={"step": step})  # a collective: every rank saves its shard
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_step{step + 1:07d}")


def _tb_writer(path: str | None):
    if not path:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(path)
