"""A stage's training and validation data as Ray Datasets over the shards (augmentation and tokenisation in Ray Data,
off the trainer), and the sample counts the driver plans steps with."""

from __future__ import annotations

from med3dvlm.data.shards import read_table
from med3dvlm.runtime import configure_data_context, data_settings


def count_samples(cfg, stage, shards: str) -> int:
    """Training samples of a stage (`train.stages`): volumes (stage 1), or their report and question tasks."""
    t = read_table(shards, ["volume_id", "report", "qa"], split="train", split_field=cfg.train.split_field)
    if cfg.train.max_train_volumes > 0:
        t = t.slice(0, cfg.train.max_train_volumes)
    return stage.count(cfg, t.to_pylist())


def count_validation(cfg, shards: str) -> int:
    return len(read_table(shards, ["volume_id"], split=cfg.train.validation_split, split_field=cfg.train.split_field))


def build_dataset(cfg, stage, shards: str, split: str = "train", training: bool = True):
    """A stage's samples from one split; training data is subset (`max_train_volumes`) and augmented, validation not."""
    ds = stage.read(shards, split, cfg.train.split_field)
    if training and cfg.train.max_train_volumes > 0:
        ds = ds.limit(cfg.train.max_train_volumes)
    return stage.samples(cfg, ds, augment=training and cfg.train.augment)


class StageData:
    """A stage's dataset as Ray Train builds it when a worker group starts (in the run's controller): a run restarted
    after a node loss reads its samples afresh instead of referring to blocks that lived on the lost node. It carries
    the driver's Ray Data settings into the controller's process."""

    def __init__(self, cfg, stage, shards: str, split: str = "train", training: bool = True):
        self.args = (cfg, stage, shards, split, training)
        self.settings = {**data_settings(), "enable_progress_bars": False}

    def __call__(self):
        configure_data_context(self.settings, preserve_order=self.args[0].train.preserve_order)
        ds = build_dataset(*self.args)
        return ds.materialize() if self.args[0].train.materialize else ds  # read, decode and tokenise once
