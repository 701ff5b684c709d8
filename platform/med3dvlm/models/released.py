"""Released Med3DVLM checkpoint folders <-> our exports.

A released checkpoint (as the authors publish `Med3DVLM-Qwen-2.5-7B`) is an HF folder: `config.json` (a Qwen2 config
with model_type `vlm_qwen` and the vision/projector fields of `VLMMetaModel.initialize_vision_modules`), the weights
in `model.safetensors` or `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, tokenizer files,
LoRA merged. Keys: the LLM's own, `model.vision_tower.vision_tower.encoder.*` and `model.mm_projector.*`
(`models.convert` maps them). Imports read one shard at a time, so a 7B checkpoint is in memory once.

What the released layout cannot hold (our model settings such as the splice mode and the stem's activation, the data
settings serving preprocesses with, the export's own metadata) `export_released` writes beside it in `med3dvlm.json`,
a file the reference code never reads; `import_released` restores it, so a round trip gives back the same tensors
(LoRA merged), tokenizer and settings, and therefore the same greedy answers. A folder without it (the authors' own)
takes those settings from `--config`, and the import says which.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from med3dvlm import storage
from med3dvlm.models.convert import from_released, to_released
from med3dvlm.models.export import VLM as VLM_KIND
from med3dvlm.models.export import ExportError, check_tensors, data_info, model_dir, read_meta, write_meta
from med3dvlm.config import config_from_dict
from med3dvlm.runtime import UserError

INDEX = "model.safetensors.index.json"
SIDECAR = "med3dvlm.json"  # our settings beside a released-layout folder (export_released writes it)
VISION_PREFIX = "model.vision_tower.vision_tower.encoder."
PROJECTOR_PREFIX = "model.mm_projector."
# Settings the weights alone do not fix. A `--config` that disagrees with a folder's med3dvlm.json on one of
# ANSWER_KEYS is refused (the model would answer differently); on one of RUN_KEYS it is used, with a warning.
ANSWER_KEYS = ("model.encoder", "model.stem_act", "model.image_tokens", "model.mixer_depth", "model.splice",
               "data.shape", "data.window", "data.window_mode")
RUN_KEYS = ("model.max_len", "model.lora_r", "model.lora_alpha", "model.lora_dropout", "model.trainable")
# config.json fields that describe the vision side, not the LLM (src/model/vlm_arch.py of the reference)
VLM_FIELDS = ("input_size", "patch_size", "dim", "depth", "vision_tower", "vision_select_layer",
              "vision_select_feature", "mm_projector_type", "mm_mlp_depth", "proj_out_num", "low_input_size",
              "high_input_size", "low_output_size", "high_output_size", "mm_hidden_size", "img_token_id")


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, each checked to exist; a folder without weights is refused."""
    if (folder / INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--checkpoint {folder}: {INDEX} is not a weight index ({e})") from None
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise UserError(f"--checkpoint {folder}: not a released checkpoint folder (no model.safetensors or {INDEX})")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"--checkpoint {folder}: {len(missing)} weight shard(s) listed in {INDEX} are missing: "
                        f"{', '.join(missing[:3])}")
    return [folder / n for n in names]


def key_shapes(files: list[Path]) -> dict[str, tuple]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def detect_variant(shapes: dict[str, tuple]) -> str:
    """The DCFormer variant whose released keys and shapes the checkpoint's vision tower has exactly."""
    from med3dvlm.models.dcformer import VARIANTS, build_dcformer

    have = {k: v for k, v in shapes.items() if k.startswith(VISION_PREFIX)}
    if not have:
        raise UserError(f"not a Med3DVLM checkpoint: no vision tower keys ({VISION_PREFIX}*)")
    for name in VARIANTS:
        with torch.device("meta"):
            sd = {f"vision.{k}": v for k, v in build_dcformer(name).state_dict().items()}
        want = {k: tuple(v.shape) for k, v in to_released(sd).items()}
        if want == have:
            return name
    raise UserError(f"the checkpoint's vision tower ({len(have)} tensors) matches none of the DCFormer variants "
                    f"{', '.join(VARIANTS)}")


def llm_config(released: dict):
    """The LLM's HF config: the released config less its vision fields, as the Qwen2 architecture it subclasses."""
    from transformers import AutoConfig

    fields = {k: v for k, v in released.items() if k not in VLM_FIELDS and k not in ("architectures", "auto_map")}
    model_type = fields.pop("model_type", "qwen2")
    return AutoConfig.for_model("qwen2" if model_type == "vlm_qwen" else model_type, **fields)


def _model_config(cfg, released: dict, shapes: dict, source: str, log=print):
    """Our model config for a folder without med3dvlm.json (the authors' own), or a refusal naming what the config
    cannot hold; one line says which settings came from the config rather than the folder."""
    variant = detect_variant(shapes)
    if variant != cfg.model.encoder:
        raise UserError(f"the checkpoint holds DCFormer-{variant}; the config says model.encoder={cfg.model.encoder} "
                        f"(pass model.encoder={variant})")
    tokens = int(released.get("proj_out_num", cfg.model.image_tokens))
    model = replace(cfg.model, encoder=variant, splice="m3d_legacy", image_tokens=tokens, llm=str(source),
                    mixer_depth=int(released.get("mm_mlp_depth", cfg.model.mixer_depth)))
    log(f"[import] {source} has no {SIDECAR}: model.splice=m3d_legacy (as released weights were trained); from the "
        f"config {cfg.name}: " + ", ".join(f"{k}={_text(_value(_settings(model, cfg.data), k))}"
                                          for k in ANSWER_KEYS + RUN_KEYS if k not in FROM_RELEASED))
    return model


FROM_RELEASED = ("model.encoder", "model.image_tokens", "model.mixer_depth", "model.splice", "data.shape")


def _settings(model_cfg, data_cfg) -> dict:
    return {"model": asdict(model_cfg), "data": data_info(data_cfg)}


def _value(settings: dict, key: str):
    """A dotted key's value in `{"model": ..., "data": ...}`, as JSON holds it (tuples as lists)."""
    part, name = key.split(".")
    return json.loads(json.dumps(settings[part].get(name)))


def _text(value) -> str:
    """A setting as one writes it in an override: `exact`, `false`, `[400.0,40.0]`."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def read_sidecar(folder: Path) -> dict | None:
    """The folder's med3dvlm.json (None when it has none), or a refusal naming it."""
    f = folder / SIDECAR
    if not f.is_file():
        return None
    try:
        own = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(own, dict) or not isinstance(own.get("model"), dict) or not isinstance(own.get("data"), dict):
        raise UserError(f"{f}: not a {SIDECAR} (no 'model' and 'data' settings)")
    try:
        own["model"] = config_from_dict({"model": own["model"]}).model
    except ValueError as e:
        raise UserError(f"{f}: {e}") from None
    return own


def _own_settings(own: dict, cfg, explicit: bool, log=print):
    """The folder's settings; a config the user gave may change how the model runs (warned), never its answers."""
    model, data = own["model"], own["data"]
    if not explicit:
        return model, data
    mine, theirs = _settings(cfg.model, cfg.data), {"model": asdict(model), "data": data}
    for key in ANSWER_KEYS + RUN_KEYS:
        a, b = _value(mine, key), _value(theirs, key)
        if a == b or b is None:  # None: the folder records no such setting
            continue
        if key in ANSWER_KEYS:
            raise UserError(f"{key}: the config says {_text(a)}, the folder's {SIDECAR} {_text(b)}, and the model "
                            f"would answer differently (leave out --config, or pass {key}={_text(b)})")
        log(f"[import] warning: {key}={_text(a)} from the config, where the folder's {SIDECAR} has {_text(b)} (how "
            f"the model runs or trains, not its weights)")
        model = replace(model, **{key.split(".")[1]: a})
    return model, data


def _expected(model_cfg, llm_cfg, tok, input_shape) -> dict[str, tuple]:
    """Our VLM's keys and shapes for this checkpoint, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from med3dvlm.models.vlm import VLM

    with torch.device("meta"):
        try:
            vlm = VLM(model_cfg, AutoModelForCausalLM.from_config(llm_cfg), tok, input_shape)
        except ValueError as e:
            raise UserError(f"the config cannot hold this checkpoint: {e}") from None
    return {k: tuple(v.shape) for k, v in vlm.state_dict().items()}


def _convert_shards(files: list[Path], expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Every tensor in our layout, shard by shard; any key or shape the model does not have is named."""
    from safetensors import safe_open

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                try:
                    state.update(from_released({k: h.get_tensor(k)}))
                except KeyError as e:
                    raise UserError(f"{f.name}: {e.args[0]}") from None
    if "llm.lm_head.weight" in expected and "llm.lm_head.weight" not in state:  # tied embeddings are saved once
        state["llm.lm_head.weight"] = state.get("llm.model.embed_tokens.weight")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise UserError(f"the checkpoint does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                        f"shapes differ at {[(k, tuple(state[k].shape), expected[k]) for k in wrong[:2]]}")
    return state


def import_released(checkpoint: str, out: str, cfg, log=print, explicit: bool = True) -> dict:
    """A released-layout folder (path or URI) -> our stage-3 export in `out` (a path or URI). Its med3dvlm.json,
    where it has one, gives the settings; `explicit`: `cfg` is the user's own choice, to be checked against it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from med3dvlm.models.prompt import IMAGE_TOKEN

    if not storage.is_file(storage.join(checkpoint, "config.json")):
        raise UserError(f"--checkpoint {checkpoint}: not a released checkpoint folder (no config.json)")
    folder = Path(model_dir(checkpoint))
    released = json.loads((folder / "config.json").read_text())
    files = weight_files(folder)
    shapes = key_shapes(files)
    own = read_sidecar(folder)
    model_cfg, data = _own_settings(own, cfg, explicit, log) if own else (None, {})
    data = {**data_info(cfg.data), **data}  # an export made without data settings records none: the config's
    h, w, d = released.get("input_size", [data["shape"][1], data["shape"][2], data["shape"][0]])
    input_shape = (int(d), int(h), int(w))
    if input_shape != tuple(data["shape"]):
        where = f"its {SIDECAR} says" if own else "the config's data.shape is"
        raise UserError(f"the checkpoint was trained at {input_shape} (D, H, W); {where} {tuple(data['shape'])}"
                        + ("" if own else f" (pass data.shape=[{d},{h},{w}])"))
    if own and (variant := detect_variant(shapes)) != model_cfg.encoder:
        raise UserError(f"{folder / SIDECAR}: says DCFormer-{model_cfg.encoder}, the weights hold DCFormer-{variant}")
    model_cfg = model_cfg or _model_config(cfg, released, shapes, checkpoint, log)
    llm_cfg = llm_config(released)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        raise UserError(f"--checkpoint {checkpoint}: its tokenizer has no {IMAGE_TOKEN} token")
    state = _convert_shards(files, _expected(model_cfg, llm_cfg, tok, input_shape))
    log(f"[import] {checkpoint}: DCFormer-{model_cfg.encoder}, {llm_cfg.model_type} of width {llm_cfg.hidden_size}, "
        f"{sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters in {len(files)} shard(s)")
    source = {"released_checkpoint": str(checkpoint), **({k: own[k] for k in ("exported_from", "lora_merged")
                                                           if k in own} if own else {})}
    with storage.staged(out) as dst:
        dst = Path(dst)
        write_meta(dst, VLM_KIND, asdict(model_cfg), {**data, "shape": list(input_shape)},
                   input_shape=list(input_shape), lora=False, source=source)
        llm_cfg.save_pretrained(dst / "llm")
        tok.save_pretrained(dst / "tokenizer")
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return {"export": str(out), "encoder": model_cfg.encoder, "shards": [f.name for f in files],
            "settings": SIDECAR if own else f"config {cfg.name}",
            "sha256": {f.name: storage.sha256(str(f)) for f in files}}


def released_config(vlm) -> dict:
    """config.json of a released checkpoint for `vlm` (its LLM's config plus the reference's vision fields)."""
    from med3dvlm.models.projector import token_schedule

    base = vlm.llm.get_base_model() if vlm.lora else vlm.llm
    d, h, w = vlm.input_shape
    p = vlm.projector.config
    half = p.image_tokens // 2
    return {**base.config.to_dict(), "model_type": "vlm_qwen", "architectures": ["VLMQwenForCausalLM"],
            "vision_tower": "dcformer", "vision_select_layer": -2, "vision_select_feature": "cls_patch",
            "mm_projector_type": "mixer", "mm_mlp_depth": vlm.cfg.mixer_depth, "proj_out_num": vlm.cfg.image_tokens,
            "input_size": [h, w, d], "patch_size": [16, 16, 16], "dim": vlm.vision.out_channels[-1], "depth": 12,
            "mm_hidden_size": vlm.vision.out_channels[-1], "low_input_size": [p.low_tokens, p.low_channels],
            "high_input_size": [p.high_tokens, p.high_channels],
            "low_output_size": token_schedule(p.low_tokens, half, p.depth),
            "high_output_size": token_schedule(p.high_tokens, half, p.depth),
            "img_token_id": vlm.image_token_id}  # vocab_size: the LLM's own, its embedding rows


def export_released(export: str, out: str, max_shard_bytes: int = 5 << 30, log=print) -> dict:
    """One of our stage-2/3 exports -> a released-layout checkpoint folder (LoRA merged) in `out`, with the settings
    the layout cannot hold in med3dvlm.json beside it."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from med3dvlm.models.vlm import VLM

    try:
        meta = read_meta(export, VLM_KIND)
        check_tensors(export)
    except ExportError as e:
        raise UserError(f"--checkpoint {e}") from None
    vlm = VLM.from_pretrained(export).eval()
    if vlm.lora:
        vlm.llm = vlm.llm.merge_and_unload()
        vlm.lora = False
    state = to_released(vlm.state_dict())
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    with storage.staged(out) as dst:
        dst = Path(dst)
        for name, keys in split.filename_to_tensors.items():
            save_file({k: state[k].contiguous() for k in keys}, str(dst / name), metadata={"format": "pt"})
        if split.is_sharded:
            (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": split.tensor_to_filename}, indent=1))
        (dst / "config.json").write_text(json.dumps(released_config(vlm), indent=1))
        vlm.tokenizer.save_pretrained(dst)
        data = meta.get("data") or {"shape": meta["input_shape"]}
        (dst / SIDECAR).write_text(json.dumps({"model": meta["model"], "data": data,
                                               "lora_merged": bool(meta["lora"]), "exported_from": str(export)}, indent=1))
    log(f"[export] {export} -> {out}: {len(split.filename_to_tensors)} shard(s), released layout, LoRA merged, our "
        f"settings in {SIDECAR}")
    if vlm.cfg.splice != "m3d_legacy":
        log(f"[export] note: model.splice={vlm.cfg.splice}; the reference code splices image tokens the m3d_legacy "
            f"way and will answer differently from this model (our importer restores {vlm.cfg.splice})")
    return {"checkpoint": str(out), "shards": sorted(split.filename_to_tensors), "settings": SIDECAR}
