"""A stage's training and validation data as Ray Datasets over the shards (augmentation and tokenisation in Ray Data,
off the trainer), and the sample counts the driver plans steps with."""

from __future__ import annotations

from med3dvlm.data.shards import read_shards, read_table
from med3dvlm.runtime import configure_data_context, data_settings


def qa_splits(cfg, stage: int) -> tuple[str, ...]:
    """Which questions train: the official train CSVs, or (leak-free split) every question of a training volume."""
    base = ("train",) if cfg.train.split_field == "split" else ("train", "val", "test")
    return base + (("yn_train",) if stage == 3 else ())


def count_samples(cfg, stage: int, shards: str) -> int:
    """Training samples of a stage: volumes (stage 1), or their report and question tasks (stages 2, 3)."""
    from med3dvlm.data.samples import task_rows

    t = read_table(shards, ["volume_id", "report", "qa"], split="train", split_field=cfg.train.split_field)
    if cfg.train.max_train_volumes > 0:
        t = t.slice(0, cfg.train.max_train_volumes)
    if stage == 1:
        return len(t)
    splits = qa_splits(cfg, stage)
    return sum(len(task_rows({**r, "volume": None}, stage, splits, closed_orders=cfg.train.closed_orders))
               for r in t.to_pylist())


def count_validation(cfg, shards: str) -> int:
    return len(read_table(shards, ["volume_id"], split=cfg.train.validation_split, split_field=cfg.train.split_field))


def build_dataset(cfg, stage: int, shards: str, split: str = "train", training: bool = True):
    """A stage's samples from one split; training data is subset (`max_train_volumes`) and augmented, validation not."""
    from med3dvlm.data.samples import expand_tasks, tokenize_reports, tokenize_tasks
    from med3dvlm.train.augment import augment_params

    cols = ["volume_id", "volume", "report"] + (["qa"] if stage > 1 else [])
    ds = read_shards(shards, split=split, split_field=cfg.train.split_field, columns=cols)
    if training and cfg.train.max_train_volumes > 0:
        ds = ds.limit(cfg.train.max_train_volumes)
    if stage > 1:  # one volume per call: its tasks' copies of it are one take (a flat_map of rows: 2.7x slower)
        ds = ds.map_batches(expand_tasks, batch_size=1, fn_kwargs={
            "stage": stage, "qa_splits": qa_splits(cfg, stage), "closed_orders": cfg.train.closed_orders})
    if training and cfg.train.augment:  # parameters only: the train worker applies them (train.augment)
        ds = ds.map_batches(augment_params, batch_size=32)
    if stage == 1:
        return ds.map_batches(tokenize_reports, batch_size=16, fn_kwargs={
            "text_encoder": cfg.model.text_encoder, "max_len": cfg.model.text_max_len})
    return ds.map_batches(tokenize_tasks, batch_size=32, fn_kwargs={
        "llm": cfg.model.llm, "n_image": cfg.model.image_tokens, "max_len": cfg.model.max_len})


class StageData:
    """A stage's dataset as Ray Train builds it when a worker group starts (in the run's controller): a run restarted
    after a node loss reads its samples afresh instead of referring to blocks that lived on the lost node. It carries
    the driver's Ray Data settings into the controller's process."""

    def __init__(self, cfg, stage: int, shards: str, split: str = "train", training: bool = True):
        self.args = (cfg, stage, shards, split, training)
        self.settings = {**data_settings(), "enable_progress_bars": False}

    def __call__(self):
        from ray.data import DataContext

        configure_data_context(self.settings)
        if self.args[0].train.preserve_order:
            DataContext.get_current().execution_options.preserve_order = True
        ds = build_dataset(*self.args)
        return ds.materialize() if self.args[0].train.materialize else ds  # read, decode and tokenise once
