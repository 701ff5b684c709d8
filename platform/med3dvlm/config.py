"""The training config: typed dataclasses (`settings.setting` fields), named presets, YAML files and `key=value`
overrides, loaded by the one settings loader (`settings.load_settings`).

    cfg = load_config("tiny", ["model.encoder=nano", "train.stage1.lr=3e-4"])

Presets are plain functions returning a complete config (torchtitan style):
`tiny` (CPU/CI, seconds), `m3d` (M3D's 32x256x256 input) and `paper` (Med3DVLM's run, 128x256x256).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from med3dvlm import settings
from med3dvlm.settings import (POSITIVE, bounds_text, load_settings, parse_overrides, read_settings_file, setting,
                               type_name)


@dataclass
class DataConfig:
    """How raw volumes become shards."""

    shape: tuple[int, int, int] = setting((32, 256, 256), "(D, H, W) of every volume after preprocessing", 1, 4096)
    dtype: str = setting("uint8", "voxel type in the shards: uint8 or float16")
    window: tuple[float, float] = setting((400.0, 40.0), "HU window (width, level) applied to raw CT")
    window_mode: str = setting("auto", "auto: DICOM CT and NIfTI with air (<= -500 HU) get the window; always; never")
    rows_per_shard: int = setting(64, "volumes per Parquet shard", 1)
    row_group_size: int = setting(16, "volumes per Parquet row group (8-32)", 1)
    case_split: tuple[float, float, float] = setting((0.8, 0.1, 0.1), "leak-free train/validation/test fractions "
                                                                      "by case (the case_split field)")
    max_file_bytes: int = setting(2 << 30, "inputs larger than this are quarantined, never read", 1)


@dataclass
class LossConfig:
    """Sigmoid (SigLIP) loss; defaults are the Med3DVLM code's, SigLIP's own are t' = log 10, b = -10."""

    t_init: float = setting(math.log(1 / 0.07), "initial log-temperature t' (t = exp(t'))")
    b_init: float = setting(0.0, "initial bias b")
    learn_t: bool = setting(True, "t' is learned")
    learn_b: bool = setting(True, "b is learned")
    symmetric: bool = setting(True, "logits = (L + L^T) / 2, as the reference code")
    t_max: float = setting(0.0, "clamp t' at this value when > 0 (0: no clamp, as the reference)")


@dataclass
class ModelConfig:
    """The DCFormer, the stage-1 text tower, the projector and the LLM."""

    encoder: str = setting("small", "DCFormer variant: nano, naive, tiny, small, base, large")
    stem_act: bool = setting(False, "an activation in the stem (the reference has none)")
    layer_scale_init: float = setting(1e-6, "blocks' layer-scale init (reference 1e-6; larger lets a small encoder "
                                            "trained briefly use its blocks)")
    embed_dim: int = setting(768, "stage-1 joint embedding width", 1)
    text_encoder: str = setting("minilm", "stage-1 text tower: minilm (packaged offline), tiny-bert (from config) "
                                          "or a local path")
    text_max_len: int = setting(512, "report tokens the text tower reads", 1)
    loss: LossConfig = setting(LossConfig(), "the sigmoid loss")
    image_tokens: int = setting(256, "visual tokens given to the LLM (half per projector stream)", 2)
    mixer_depth: int = setting(2, "Mixer blocks per projector stream")
    llm: str = setting("tiny-qwen2", "tiny-qwen2 (built from config, MiniLM tokenizer) or a local path to an HF "
                                     "causal LM")
    llm_hidden: int = setting(64, "tiny-qwen2 only: width")
    llm_layers: int = setting(2, "tiny-qwen2 only: layers")
    llm_heads: int = setting(4, "tiny-qwen2 only: attention heads")
    llm_kv_heads: int = setting(2, "tiny-qwen2 only: key/value heads")
    max_len: int = setting(512, "tokens of a sequence, image tokens included", 1)
    splice: str = setting("exact", "exact (placeholders replaced one-for-one) or m3d_legacy (the released weights' "
                                   "layout)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    trainable: str = setting("paper", "which parts train in stages 2-3: paper, released_code or full "
                                      "(models.vlm.TRAINABLE)")


@dataclass
class StageConfig:
    """One training stage's optimisation."""

    batch_size: int = setting(8, "samples per worker per step", 1)
    lr: float = setting(1e-4, "peak learning rate (AdamW, cosine after warm-up)", **POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms)", 0)
    epochs: float = setting(1.0, "passes over the stage's samples", **POSITIVE)
    max_steps: int = setting(0, "> 0 caps the number of steps", 0)
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming up", 0, 1)
    grad_clip: float = setting(1.0, "gradient norm clip", 0)
    text_lr_scale: float = setting(1.0, "stage 1: the text tower's lr = lr x this (a pretrained tower wants less; "
                                        "0: frozen)", 0)


@dataclass
class TrainConfig:
    """Ray Train, DeepSpeed and the data feed."""

    num_workers: int = setting(2, "Ray Train workers", 1)
    use_gpu: bool = setting(False, "one GPU per worker")
    cpus_per_worker: float = setting(1.0, "CPUs Ray reserves per worker", **POSITIVE)
    placement_strategy: str = setting("PACK", "worker placement: PACK (fewest nodes) or SPREAD (one per node first)")
    zero_stage: int = setting(2, "DeepSpeed ZeRO stage", 0, 3)
    offload: bool = setting(False, "ZeRO CPU offload of the optimizer (and, at stage 3, the parameters)")
    bf16: bool = setting(True, "bf16 autocast (and DeepSpeed bf16) on GPU")
    bf16_cpu: bool = setting(False, "bf16 autocast on CPU workers too (fast where the CPU has AMX / AVX-512 BF16)")
    seed: int = setting(42, "seed of the model init, the shuffles and the prompts")
    checkpoint_every: int = setting(0, "steps between checkpoints; 0: at the end of every epoch", 0)
    keep_checkpoints: int = setting(2, "DeepSpeed checkpoints kept per run (the newest; resume needs one)", 1)
    log_every: int = setting(10, "rank 0 prints a progress line every N steps (0: off)", 0)
    log_seconds: float = setting(10.0, "... but no sooner than this after its last line (0: no limit)", 0)
    fail_at_step: int = setting(-1, "fault injection for tests: the last rank's worker process is killed (SIGKILL) "
                                    "once at this step")
    max_failures: int = setting(2, "worker failures Ray Train recovers from (from the last checkpoint)", -1)
    split_field: str = setting("split", "split (the official M3D split, comparable numbers) or case_split (leak-free)")
    augment: bool = setting(True, "the reference augmentation (rot90 H-W, flips, intensity), drawn in Ray Data")
    shuffle_buffer: int = setting(256, "rows in each worker's local shuffle buffer (0: shard order)", 0)
    eval_every: int = setting(-1, "stage 1: validation every N steps (-1: every epoch if the split has rows; 0: off)")
    validation_split: str = setting("validation", "the split (in split_field) validation reads")
    max_train_volumes: int = setting(0, "train on the first N training volumes only (0: all)", 0)
    materialize: bool = setting(False, "hold the stage's samples in Ray's object store after one read (data that fits "
                                       "in memory, no augmentation)")
    preserve_order: bool = setting(False, "samples reach the workers in the shards' order: with augment off a re-run "
                                          "repeats its trajectory")
    feature_cache: str = setting("auto", "stages 2-3 read the frozen tower's features from the cache beside the shards "
                                         "(data/features.py): auto (when one is valid), on (build it), off")
    closed_orders: int = setting(1, "stages 2-3: each closed question in N orders of its choices (1: as given)")
    precise_bn_batches: int = setting(0, "re-estimate a trained tower's BatchNorm statistics from the last N batches "
                                         "before validation and export (0: off)", 0)
    stage1: StageConfig = setting(StageConfig(batch_size=64, lr=1e-4, weight_decay=0.1, epochs=100), "stage 1 (SigLIP)")
    stage2: StageConfig = setting(StageConfig(batch_size=16, lr=1e-4, epochs=3), "stage 2 (projector)")
    stage3: StageConfig = setting(StageConfig(batch_size=8, lr=5e-5, epochs=5), "stage 3 (instruction tuning)")


@dataclass
class Config:
    name: str = setting("paper", "the preset it started from")
    data: DataConfig = setting(DataConfig(), "preprocessing")
    model: ModelConfig = setting(ModelConfig(), "the model")
    train: TrainConfig = setting(TrainConfig(), "training")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage(self, n: int) -> StageConfig:
        return getattr(self.train, f"stage{n}")


# ---------------------------------------------------------------- presets


def paper() -> Config:
    """Med3DVLM's run: DCFormer-small at 128x256x256, ClinicalBERT-style text tower, Qwen2.5-7B-Instruct."""
    cfg = Config(name="paper")
    cfg.data.shape = (128, 256, 256)
    cfg.model.text_encoder = "/models/ClinicalBERT"  # a local path the user gives
    cfg.model.llm = "/models/Qwen2.5-7B-Instruct"
    cfg.train.use_gpu = True
    cfg.train.num_workers = 8
    return cfg


def m3d() -> Config:
    """M3D's input shape (32x256x256), otherwise the paper's settings."""
    cfg = paper()
    cfg.name = "m3d"
    cfg.data.shape = (32, 256, 256)
    return cfg


def tiny() -> Config:
    """CPU/CI: a nano encoder at 32x64x64, the packaged MiniLM text tower, a 2-layer Qwen2; seconds per stage."""
    cfg = Config(name="tiny")
    cfg.data.shape = (32, 64, 64)
    cfg.data.rows_per_shard = 32
    cfg.data.row_group_size = 8
    cfg.model.encoder = "nano"
    cfg.model.embed_dim = 64
    cfg.model.text_encoder = "minilm"
    cfg.model.text_max_len = 40
    cfg.model.image_tokens = 8
    cfg.model.max_len = 96
    cfg.model.lora_r = 8
    cfg.model.lora_alpha = 16
    cfg.train.num_workers = 2
    cfg.train.use_gpu = False
    cfg.train.cpus_per_worker = 0.5
    cfg.train.keep_checkpoints = 1  # the demo's disk: the exports are what a user needs
    cfg.train.split_field = "case_split"
    # the demo's held-out check: 28 volumes of its 100 cases (13 distinct reports) where 0.8 / 0.1 / 0.1 held out 14
    # (9): one volume moved R@1 by 7 points, and its target (3 x chance) was met by one volume in some runs
    cfg.data.case_split = (0.7, 0.15, 0.15)
    cfg.train.augment = False  # flips and rotations scramble the synthetic laterality labels a few epochs cannot untangle
    cfg.train.materialize = True  # 12 short epochs: re-reading the shards each epoch was 46% of stage 1's time
    cfg.train.preserve_order = True  # the demo's table repeats on a re-run (it did not: the blocks' order varied)
    cfg.train.precise_bn_batches = 16  # minutes of training at lr 1e-3 leave BatchNorm's running statistics stale
    cfg.model.trainable = "full"  # a random tiny LLM has nothing to preserve: it trains whole, without LoRA
    cfg.model.loss.t_init, cfg.model.loss.b_init = math.log(10), -10.0  # SigLIP's init: stable with batches of 8
    cfg.model.layer_scale_init = 0.1
    # the packaged MiniLM stays frozen: its 22M parameters' backward, Adam step and gradient all-reduce were most of
    # a stage-1 step on CPU, and the linear head on its first token learns the 20 synthetic reports alone
    cfg.train.stage1 = StageConfig(batch_size=8, lr=1e-3, weight_decay=0.1, epochs=12, text_lr_scale=0.0)
    cfg.train.stage2 = StageConfig(batch_size=8, lr=1e-3, epochs=1)
    # each closed question in its four choice orders (stages 2, 3): with the extra question-answering steps the demo's
    # reports use the image (chosen on validation cases; the figures are in the git log)
    cfg.train.closed_orders = 4
    # ten epochs (2,000 steps; the pretrained tiny LLM's 141-piece vocabulary halves a step): closed VQA on validation
    # cases still rose from 6 to 10 epochs (`bench/closed_vqa_steps.py --pretrain-steps 3000 --stage3-epochs N`)
    cfg.train.stage3 = StageConfig(batch_size=8, lr=1e-3, epochs=10)
    return cfg


PRESETS = {"paper": paper, "m3d": m3d, "tiny": tiny}


# ---------------------------------------------------------------- loading


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` strings; values are parsed as YAML (numbers, booleans, lists)."""
    return load_settings(Config, parse_overrides(overrides), base=cfg)


def bounds(cls=None) -> dict[str, tuple]:
    """Dotted key -> (least, most, above) of every field that has bounds (`setting`), nested configs included."""
    return {key: f.metadata["bounds"] for key, _, f in fields_of(cls) if f.metadata.get("bounds")}


def fields_of(cls=None, prefix: str = ""):
    """(dotted key, type, field) of every config key (`settings.fields_of` of `Config` by default)."""
    return settings.fields_of(cls or Config, prefix)


def config_reference() -> str:
    """The configuration reference (markdown): every key with its type, its value in each preset, its bounds and its
    line of help, from the fields themselves (`setting`)."""
    presets = {n: f() for n, f in PRESETS.items()}
    lines = ["# Configuration reference", "",
             "Written by `python -m pipelines.config_reference` from `platform/med3dvlm/config.py` (a test checks that "
             "it is current). Any command takes `--config PRESET|FILE` and then `key=value` overrides; a YAML file "
             "holds the same keys nested, with `base: <preset>` (default paper).", "",
             "| key | type | " + " | ".join(presets) + " | bounds | what it sets |",
             "|---|---|" + "---|" * len(presets) + "---|---|"]
    for key, tp, f in fields_of():
        if dataclasses.is_dataclass(tp):
            lines.append(f"| **{key}** | | " + " | " * len(presets) + f" | {f.metadata['help']} |")
            continue
        values = []
        for cfg in presets.values():
            v = cfg
            for part in key.split("."):
                v = getattr(v, part)
            values.append(f"`{json.dumps(v)}`")
        b = f.metadata.get("bounds")
        lines.append(f"| `{key}` | {type_name(tp)} | " + " | ".join(values) + " | "
                     + (bounds_text(*b) if b else "") + f" | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def load_config(name_or_path: str | Config = "tiny", overrides: list[str] | None = None) -> Config:
    """A preset name, a YAML/JSON file (optionally with `base: <preset>`), or a Config; then overrides."""
    if isinstance(name_or_path, Config):
        cfg = copy.deepcopy(name_or_path)
    elif name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"config '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a file")
        data = read_settings_file(str(path))
        base = data.pop("base", "paper")
        if not isinstance(base, str) or base not in PRESETS:
            raise ValueError(f"config file {path}: unknown base preset '{base}'")
        cfg = load_settings(Config, data, base=PRESETS[base]())
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    return load_settings(Config, data)
