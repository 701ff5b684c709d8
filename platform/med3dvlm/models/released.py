"""Released Med3DVLM checkpoint folders <-> our exports.

A released checkpoint (as the authors publish `Med3DVLM-Qwen-2.5-7B`) is an HF folder: `config.json` (a Qwen2 config
with model_type `vlm_qwen` and the vision/projector fields of `VLMMetaModel.initialize_vision_modules`), the weights
in `model.safetensors` or `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, tokenizer files,
LoRA merged. Keys: the LLM's own, `model.vision_tower.vision_tower.encoder.*` and `model.mm_projector.*`
(`models.convert` maps them). Imports read one shard at a time, so a 7B checkpoint is in memory once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from med3dvlm import storage
from med3dvlm.models.convert import from_released, to_released
from med3dvlm.models.export import VLM as VLM_KIND
from med3dvlm.models.export import data_info, model_dir, read_meta, write_meta
from med3dvlm.runtime import UserError

INDEX = "model.safetensors.index.json"
VISION_PREFIX = "model.vision_tower.vision_tower.encoder."
PROJECTOR_PREFIX = "model.mm_projector."
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


def _model_config(cfg, released: dict, shapes: dict, source: str):
    """Our model config for the checkpoint, or a refusal naming what the config cannot hold."""
    variant = detect_variant(shapes)
    if variant != cfg.model.encoder:
        raise UserError(f"the checkpoint holds DCFormer-{variant}; the config says model.encoder={cfg.model.encoder} "
                        f"(pass model.encoder={variant})")
    tokens = int(released.get("proj_out_num", cfg.model.image_tokens))
    return replace(cfg.model, encoder=variant, splice="m3d_legacy", image_tokens=tokens, llm=str(source),
                   mixer_depth=int(released.get("mm_mlp_depth", cfg.model.mixer_depth)))


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


def import_released(checkpoint: str, out: str, cfg, log=print) -> dict:
    """A released checkpoint folder (path or URI) -> our stage-3 export in `out` (a path or URI)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from med3dvlm.models.prompt import IMAGE_TOKEN

    if not storage.is_file(storage.join(checkpoint, "config.json")):
        raise UserError(f"--checkpoint {checkpoint}: not a released checkpoint folder (no config.json)")
    folder = Path(model_dir(checkpoint))
    released = json.loads((folder / "config.json").read_text())
    files = weight_files(folder)
    shapes = key_shapes(files)
    h, w, d = released.get("input_size", [cfg.data.shape[1], cfg.data.shape[2], cfg.data.shape[0]])
    input_shape = (int(d), int(h), int(w))
    if input_shape != tuple(cfg.data.shape):
        raise UserError(f"the checkpoint was trained at {input_shape} (D, H, W); the config's data.shape is "
                        f"{tuple(cfg.data.shape)} (pass data.shape=[{d},{h},{w}])")
    model_cfg = _model_config(cfg, released, shapes, checkpoint)
    llm_cfg = llm_config(released)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        raise UserError(f"--checkpoint {checkpoint}: its tokenizer has no {IMAGE_TOKEN} token")
    state = _convert_shards(files, _expected(model_cfg, llm_cfg, tok, input_shape))
    log(f"[import] {checkpoint}: DCFormer-{model_cfg.encoder}, {llm_cfg.model_type} of width {llm_cfg.hidden_size}, "
        f"{sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters in {len(files)} shard(s)")
    with storage.staged(out) as dst:
        dst = Path(dst)
        write_meta(dst, VLM_KIND, asdict(model_cfg), {**data_info(cfg.data), "shape": list(input_shape)},
                   input_shape=list(input_shape), lora=False,
                   source={"released_checkpoint": str(checkpoint)})
        llm_cfg.save_pretrained(dst / "llm")
        tok.save_pretrained(dst / "tokenizer")
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    return {"export": str(out), "encoder": model_cfg.encoder, "shards": [f.name for f in files],
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
            "mm_projector_type": "mixer", "mm_mlp_depth": 2, "proj_out_num": vlm.cfg.image_tokens,
            "input_size": [h, w, d], "patch_size": [16, 16, 16], "dim": vlm.vision.out_channels[-1], "depth": 12,
            "mm_hidden_size": vlm.vision.out_channels[-1], "low_input_size": [p.low_tokens, p.low_channels],
            "high_input_size": [p.high_tokens, p.high_channels],
            "low_output_size": token_schedule(p.low_tokens, half, p.depth),
            "high_output_size": token_schedule(p.high_tokens, half, p.depth),
            "img_token_id": vlm.image_token_id, "vocab_size": len(vlm.tokenizer)}


def export_released(export: str, out: str, max_shard_bytes: int = 5 << 30, log=print) -> dict:
    """One of our stage-2/3 exports -> a released-layout checkpoint folder (LoRA merged) in `out`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from med3dvlm.models.vlm import VLM

    read_meta(export, VLM_KIND)
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
    log(f"[export] {export} -> {out}: {len(split.filename_to_tensors)} shard(s), released layout, LoRA merged")
    return {"checkpoint": str(out), "shards": sorted(split.filename_to_tensors)}
