"""A run's plan: what the driver decides before any worker starts (samples, steps, validation cadence, where the
export goes) and hands to every worker as one typed object."""

from __future__ import annotations

import math
from dataclasses import dataclass

from med3dvlm.config import Config, config_from_dict
from med3dvlm.runtime import UserError
from med3dvlm.train.datasets import count_samples, count_validation


@dataclass(frozen=True)
class RunPlan:
    cfg: dict  # the run's Config as a dict (`config()` rebuilds it in the worker)
    stage: int
    samples: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int = 0  # steps between validations (0: none)
    init: str | None = None  # the export the stage starts from
    export: str | None = None  # where rank 0 writes the stage's export
    tensorboard: str | None = None
    feature_cache: str | None = None  # the feature cache stages 2-3 read instead of the volumes (data/features.py)
    log_level: str = "WARNING"  # Ray Data/Train's own lines on a worker's console

    @property
    def validate(self) -> bool:
        return self.eval_every > 0

    def config(self) -> Config:
        return config_from_dict(self.cfg)


def due(done: int, every: int, total: int) -> bool:
    """Every `every` steps (0: never) and at the last: when a step that has `done` steps behind it is due to act."""
    return every > 0 and (done % every == 0 or done == total)


def plan_steps(cfg: Config, stage, shards: str) -> RunPlan:
    st = stage.settings(cfg)
    n = count_samples(cfg, stage, shards)
    steps_per_epoch = n // (st.batch_size * cfg.train.num_workers)
    if steps_per_epoch == 0:
        raise UserError(f"{n} training samples is fewer than one global batch ({st.batch_size} x "
                        f"{cfg.train.num_workers} workers)")
    total = math.ceil(st.epochs * steps_per_epoch)
    total = min(total, st.max_steps) if st.max_steps > 0 else total
    return RunPlan(cfg.to_dict(), stage.number, n, steps_per_epoch, total,
                   eval_interval(cfg, stage, shards, steps_per_epoch))


def eval_interval(cfg: Config, stage, shards: str, steps_per_epoch: int) -> int:
    """A validating stage validates every `eval_every` steps; by default (-1) every epoch when the validation split
    has rows."""
    every = cfg.train.eval_every if stage.validates else 0
    if every == 0:
        return 0
    if count_validation(cfg, shards) < 2:
        if every < 0:
            return 0
        raise UserError(f"train.eval_every needs validation pairs: --shards {shards} has fewer than 2 rows with "
                        f"{cfg.train.split_field}={cfg.train.validation_split}")
    return every if every > 0 else steps_per_epoch
