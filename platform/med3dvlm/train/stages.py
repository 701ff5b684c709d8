"""The three training stages as objects (in the manner of open_clip's task objects): each says which export it starts
from and writes, how its model is built and which parts train, which samples it reads and how many, which batch keys
its step takes, and which figures it reports beside the loss. The driver, the datasets, the loop and the plots ask
the stage; none branches on its number. A stage reading cached tower features is `stage.reading(cache)`.

    stage = get_stage(2); model = stage.build_model(cfg, init)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from med3dvlm.models.export import CLIP, VLM
from med3dvlm.runtime import UserError
from med3dvlm.train.checks import BUILTIN_LLM, BUILTIN_TEXT, exists_or_refuse, same_vocabulary

@dataclass(frozen=True)
class Stage:
    """What every stage has; the subclasses below add how they build, read and report."""

    number: int
    export_kind: str  # what the stage writes: CLIP or VLM
    init_kind: str  # the export `--init` must be
    init_required: bool = True
    batch_keys: tuple[str, ...] = ("volume", "input_ids", "attention_mask", "labels")
    step_figures: tuple[str, ...] = ()  # per-step figures beside loss, lr and samples/s (logged, plotted, summarised)
    validates: bool = False  # validation loss and R@1 every `train.eval_every` steps
    yes_no: bool = False  # the yes/no questions train too (`M3D_VQA_yn_train.csv`)
    features: str | None = None  # the feature cache read instead of the volumes (`reading`)

    @property
    def name(self) -> str:
        return f"stage{self.number}"

    def settings(self, cfg):
        """The stage's `train.stageN` settings (batch size, lr, epochs, ...)."""
        return getattr(cfg.train, self.name)

    def reading(self, features: str | None) -> "Stage":
        """This stage reading the feature cache at `features` (`data.features`), not the volumes (None: itself)."""
        if not features:
            return self
        rest = tuple(k for k in self.batch_keys if k != "volume")
        return replace(self, features=features, batch_keys=("feat_low", "feat_high") + rest)

    def read(self, shards: str, split: str, split_field: str):
        """The stage's columns of one split as a Ray Dataset: decoded volumes, or the cached features."""
        from med3dvlm.data.features import read_features

        if self.features:
            return read_features(self.features, split, split_field, list(self.columns))
        from med3dvlm.data.shards import read_shards

        return read_shards(shards, split=split, split_field=split_field, columns=list(self.columns))

    def check_init(self, cfg, init: str | None, meta: dict | None) -> None:
        """`init`'s export metadata (`meta`, None without one) against the config; UserError naming the mismatch."""
        if self.init_required and not init:
            raise UserError(f"stage {self.number} starts from stage {self.number - 1}'s export: pass --init DIR")
        if meta and meta["model"]["encoder"] != cfg.model.encoder:
            raise UserError(f"--init {init}: encoder {meta['model']['encoder']} != config's {cfg.model.encoder}")

    def check_models(self, cfg, init: str | None) -> None:
        """The models this stage builds from a path: present (never fetched from a hub)."""

    def step_report(self, module) -> dict:
        """Figures of the model itself after a step (stage 1: the sigmoid loss's t and b)."""
        return {}

    def summary(self, history: list[dict]) -> dict:
        """The last step's `step_figures`, for the run's summary."""
        return {f"{k}_last": history[-1][k] for k in self.step_figures} if history else {}


@dataclass(frozen=True)
class ContrastiveStage(Stage):
    """Stage 1: the DCFormer and the text tower learn a joint embedding with the sigmoid loss (SigLIP)."""

    number: int = 1
    export_kind: str = CLIP
    init_kind: str = CLIP
    init_required: bool = False
    batch_keys: tuple[str, ...] = ("volume", "input_ids", "attention_mask")
    step_figures: tuple[str, ...] = ("t", "b")
    validates: bool = True

    columns = ("volume_id", "volume", "report")  # the shard columns it reads

    def check_models(self, cfg, init):
        if not init:
            exists_or_refuse("model.text_encoder", cfg.model.text_encoder, BUILTIN_TEXT)

    def build_model(self, cfg, init: str | None):
        from med3dvlm.models.clip import CLIPModel

        model = CLIPModel.from_pretrained(init) if init else CLIPModel.from_config(cfg.model)
        if self.settings(cfg).text_lr_scale == 0:  # frozen: no gradients, optimizer state or all-reduce for the tower
            model.text.requires_grad_(False)
        return model

    def step_report(self, module):
        return {"t": float(module.loss_fn.temperature.detach()), "b": float(module.loss_fn.bias.detach())}

    def count(self, cfg, rows: list[dict]) -> int:
        return len(rows)

    def samples(self, cfg, ds, augment: bool):
        """Shard rows -> (volume, report tokens), with augmentation parameters when `augment`."""
        from med3dvlm.data.samples import tokenize_reports

        return _augmented(ds, augment).map_batches(tokenize_reports, batch_size=16, fn_kwargs={
            "text_encoder": cfg.model.text_encoder, "max_len": cfg.model.text_max_len})


@dataclass(frozen=True)
class InstructionStage(Stage):
    """Stages 2 and 3: the VLM learns reports and questions (`model.trainable` says which parts train)."""

    number: int = 3
    export_kind: str = VLM
    init_kind: str = VLM
    yes_no: bool = True

    columns = ("volume_id", "volume", "report", "qa")  # the shard columns it reads

    def check_models(self, cfg, init):
        exists_or_refuse("model.llm", cfg.model.llm, BUILTIN_LLM)  # its tokenizer tokenises the samples

    def check_init(self, cfg, init, meta):
        super().check_init(cfg, init, meta)
        if meta and self.init_kind == VLM:
            if tuple(meta["input_shape"]) != tuple(cfg.data.shape):
                raise UserError(f"--init {init}: trained at {tuple(meta['input_shape'])}, the config asks for "
                                f"{tuple(cfg.data.shape)}")
            same_vocabulary(cfg, init, meta)

    def build_model(self, cfg, init: str | None):
        from med3dvlm.models.vlm import VLM as Model

        model = Model.from_pretrained(init) if init else Model.from_config(cfg.model, cfg.data.shape)
        model.set_stage(self.number)
        return model

    def qa_splits(self, cfg) -> tuple[str, ...]:
        """Which questions train: the official train CSVs, or (leak-free split) every question of a training
        volume; and the yes/no questions where this stage takes them."""
        base = ("train",) if cfg.train.split_field == "split" else ("train", "val", "test")
        return base + (("yn_train",) if self.yes_no else ())

    def count(self, cfg, rows: list[dict]) -> int:
        from med3dvlm.data.samples import task_rows

        splits = self.qa_splits(cfg)
        return sum(len(task_rows({**r, "volume": None}, splits, closed_orders=cfg.train.closed_orders)) for r in rows)

    def samples(self, cfg, ds, augment: bool):
        """Shard rows -> one row per report or question task (prompt + answer tokens); one volume per call, so its
        tasks' copies of it are one take (a flat_map of rows: 2.7x slower)."""
        from med3dvlm.data.samples import expand_tasks, tokenize_tasks

        ds = ds.map_batches(expand_tasks, batch_size=1, fn_kwargs={
            "qa_splits": self.qa_splits(cfg), "closed_orders": cfg.train.closed_orders})
        return _augmented(ds, augment).map_batches(tokenize_tasks, batch_size=32, fn_kwargs={
            "llm": cfg.model.llm, "n_image": cfg.model.image_tokens, "max_len": cfg.model.max_len})


@dataclass(frozen=True)
class ProjectorStage(InstructionStage):
    """Stage 2: a new VLM whose vision tower comes from stage 1's export; the LLM from `model.llm`."""

    number: int = 2
    init_kind: str = CLIP
    yes_no: bool = False

    def build_model(self, cfg, init: str | None):
        from med3dvlm.models.clip import CLIPModel
        from med3dvlm.models.vlm import VLM as Model

        model = Model.from_config(cfg.model, cfg.data.shape)
        if init:
            model.vision.load_state_dict(CLIPModel.from_pretrained(init).vision.state_dict())
        model.set_stage(self.number)
        return model


def _augmented(ds, augment: bool):
    """Augmentation parameters drawn in Ray Data; the train worker applies them (`train.augment`)."""
    from med3dvlm.train.augment import augment_params

    return ds.map_batches(augment_params, batch_size=32) if augment else ds


STAGES = {s.number: s for s in (ContrastiveStage(), ProjectorStage(), InstructionStage())}


def get_stage(number: int) -> Stage:
    """The stage object for `--stage N`; a number without one is refused naming the choices."""
    if number not in STAGES:
        raise UserError(f"--stage must be {', '.join(map(str, STAGES))}, not {number}")
    return STAGES[number]
