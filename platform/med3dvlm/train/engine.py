"""The engine a worker trains with: the stage's model, AdamW with a cosine schedule, wrapped by DeepSpeed ZeRO; its
resume from Ray Train's checkpoint and its export as a `from_pretrained` directory (gathered under ZeRO-3)."""

from __future__ import annotations

import importlib
import math

import torch

from med3dvlm import storage
from med3dvlm.config import Config


def deepspeed_config(cfg: Config, stage, use_gpu: bool) -> dict:
    st = stage.settings(cfg)
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


def build_model(cfg: Config, stage, init: str | None):
    """The stage's model (`Stage.build_model`), recording how its inputs were made."""
    from med3dvlm.models.export import data_info

    model = stage.build_model(cfg, init)
    model.data = data_info(cfg.data)
    return model


def _stub_deepspeed_jit() -> None:
    # The CPU accelerator JIT-builds a shared-memory comm op (35 s, 3 GB) inside initialize(); gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def setup_engine(cfg: Config, stage, plan, device):
    """The stage's model, AdamW with a cosine schedule, wrapped by `deepspeed.initialize`; (engine, scheduler)."""
    import deepspeed

    use_gpu = cfg.train.use_gpu
    st = stage.settings(cfg)
    model = build_model(cfg, stage, plan.init)
    model.to(memory_format=torch.contiguous_format)  # DeepSpeed broadcasts and flattens parameters as flat bytes
    if use_gpu:
        model = model.to(device)
    # fused: one pass over the flat fp32 partitions that ZeRO hands it, on CPU as on CUDA (several times faster
    # than torch's per-tensor default; bench/results/history.md)
    optimizer = torch.optim.AdamW(param_groups(model, st.lr, st.weight_decay, st.text_lr_scale), lr=st.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(plan.total_steps, st.warmup_ratio))
    _stub_deepspeed_jit()
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg, stage, use_gpu))
    return engine, scheduler


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for the forward pass: on GPU with `train.bf16`, on CPU with `train.bf16_cpu` as well (the
    weights, gradients and optimizer stay float32 there; DeepSpeed's own bf16 mode is GPU only)."""
    on = cfg.train.bf16 and (device.type == "cuda" or cfg.train.bf16_cpu)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(on))


def resume(engine) -> int:
    """The step to start from: 0, or the one after the checkpoint Ray Train restored (every rank loads its shard)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="ds")
    if "rng" in client:  # this rank's random stream where it stood (dropout): a resumed run repeats an uninterrupted one
        import torch.distributed as dist

        torch.set_rng_state(client["rng"][dist.get_rank() if dist.is_initialized() else 0])
    return client["step"] + 1


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


def export_model(engine, out: str, zero_stage: int) -> None:
    """Rank 0 writes a from_pretrained directory; under ZeRO-3 every rank takes part in gathering the weights."""
    import torch.distributed as dist

    model = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = gathered_state(model) if zero_stage == 3 else None
    if rank == 0:
        with storage.staged(out) as d:
            model.save_pretrained(d, state=state)
    if dist.is_initialized():
        dist.barrier()
