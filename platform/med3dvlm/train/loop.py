"""`train_loop_per_worker`: one Ray Train worker's run of a stage, as a story (set up, resume, step, export).

Runs inside Ray Train workers (the process group is Ray's: gloo on CPU, nccl on GPU). The stage (`train.stages`)
says what is built and read; the components say when they act: the validator (`train.validation`), the
checkpointer (`train.checkpoints`), the step log (`train.metrics`); the engine is `train.engine`'s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings

import torch

from med3dvlm import storage
from med3dvlm.models.prompt import trim_padding
from med3dvlm.runtime import ray_data_log_level
from med3dvlm.train.checkpoints import Checkpointer, record_placement
from med3dvlm.train.engine import autocast, export_model, resume, setup_engine
from med3dvlm.train.metrics import Progress, StepLog
from med3dvlm.train.precise_bn import RecentVolumes
from med3dvlm.train.stages import get_stage
from med3dvlm.train.validation import Validator


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    plan = config["plan"]
    cfg, stage = plan.config(), get_stage(plan.stage).reading(plan.feature_cache)
    ctx = ray.train.get_context()
    rank, total = ctx.get_world_rank(), plan.total_steps
    device = _worker_setup(cfg, ctx, plan.log_level)

    # ---------------------------------------------------------------- the engine, resumed where a failure left it
    engine, scheduler = setup_engine(cfg, stage, plan, device)
    start = resume(engine)
    resumed = start > 0
    record_placement(plan.export, start, rank, ctx.get_world_size())

    # ---------------------------------------------------------------- the components the loop asks
    log = StepLog(stage, stage.settings(cfg).batch_size, plan.tensorboard if rank == 0 else None,
                  Progress(stage.number, start, total, plan.steps_per_epoch,
                           cfg.train.log_every if rank == 0 else 0, cfg.train.log_seconds))
    validator = Validator(plan.eval_every, total)
    checkpointer = Checkpointer(cfg.train.checkpoint_every or plan.steps_per_epoch, total)
    recent = RecentVolumes(cfg.train.precise_bn_batches)  # precise BatchNorm statistics before validation and export

    # ---------------------------------------------------------------- the steps
    for step, epoch, batch, data_s in _steps(cfg, stage, plan, start, rank):
        if step == cfg.train.fail_at_step and not resumed and rank == ctx.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): this worker's process dies mid-epoch
        t0 = time.perf_counter()
        loss = train_step(engine, cfg, batch, stage.batch_keys, device)
        recent.add(batch.get("volume"))  # none where the stage reads cached features
        m = log.step(engine, scheduler, step, epoch, loss, data_s, time.perf_counter() - t0)
        done = step + 1
        if done == total or validator.due(done):  # the final checkpoint and the export hold them too
            recent.recalibrate(engine.module.vision, device)
        if validator.due(done):
            m.update(validator.run(engine.module, device))
            log.validation(m, done)
        if done == total:
            finish(cfg, plan, engine, log, rank)
        if checkpointer.due(done):
            log.sync()
            checkpointer.save(engine, m, step)
        elif validator.between_checkpoints(done):
            checkpointer.report(m)

    # ---------------------------------------------------------------- restarted after the last checkpoint
    if start >= total:
        finish(cfg, plan, engine, log, rank)


def train_step(engine, cfg, batch: dict, keys: tuple[str, ...], device) -> torch.Tensor:
    from med3dvlm.train.augment import apply_augment

    inputs = {k: v.to(device) for k, v in trim_padding({k: batch[k] for k in keys}).items()}
    if "volume" in inputs:
        inputs["volume"] = apply_augment(inputs["volume"], batch.get("augment"))  # uint8 -> float on the device
    with autocast(cfg, device):
        loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    if cfg.train.use_gpu:
        torch.cuda.synchronize()
    return loss


def finish(cfg, plan, engine, log: StepLog, rank: int) -> None:
    """TensorBoard closed, the export and history.json (rank 0) written: before the run's last report, so a Tune
    trial stopped at that report (max_t) already has its export."""
    log.close()
    if plan.export:
        export_model(engine, plan.export, cfg.train.zero_stage)
        if rank == 0 and log.history:  # none: a run resumed after its last step keeps the history it wrote
            storage.write_text(storage.join(plan.export, "history.json"), json.dumps(log.history))


def _steps(cfg, stage, plan, start: int, rank: int):
    """(step, epoch, batch, seconds waited for it) from `start` to the plan's last step; a resumed run skips the
    batches its epoch consumed before the failure."""
    step, total, per_epoch = start, plan.total_steps, plan.steps_per_epoch
    while step < total:
        epoch = step // per_epoch
        skip = step - epoch * per_epoch
        t_wait = time.perf_counter()
        for i, batch in enumerate(_epoch(cfg, stage, epoch, rank)):
            if i < skip:
                t_wait = time.perf_counter()
                continue
            if i >= per_epoch or step >= total:
                break
            yield step, epoch, batch, time.perf_counter() - t_wait
            step += 1
            t_wait = time.perf_counter()
        if step < min(total, (epoch + 1) * per_epoch):
            raise RuntimeError(f"rank {rank}: the dataset shard ran dry at step {step} of {total}")


def _epoch(cfg, stage, epoch: int, rank: int):
    """This worker's batches of one epoch; stage 2/3 rows of one volume arrive together (one `expand_tasks` call),
    so a local shuffle buffer, reseeded every epoch, mixes them."""
    import ray.train

    shuffle = {"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
               "local_shuffle_seed": cfg.train.seed + 1000 * rank + epoch} if cfg.train.shuffle_buffer > 0 else {}
    return ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=stage.settings(cfg).batch_size, drop_last=True, **shuffle)


def _worker_setup(cfg, ctx, log_level: str) -> torch.device:
    """Seeds, threads and log levels of this worker; its device."""
    torch.manual_seed(cfg.train.seed + ctx.get_world_rank())
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.train.use_gpu else torch.device("cpu")
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    # DeepSpeed's ZeRO calls the collective under its deprecated name; the warning is DeepSpeed's to act on
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    # Ray Train's "Reporting training result" line (one per checkpoint and worker) goes to a logger named by its
    # file, outside "ray.train", and Ray Data logs each validation pass: both stay in the log files unless
    # --log-level info asks
    logging.getLogger().setLevel(log_level)
    ray_data_log_level(log_level)
    return device
