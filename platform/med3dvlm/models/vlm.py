"""The VLM: DCFormer + dual-stream projector + any HF causal LM, image tokens spliced into the input embeddings.

Sequence layout and prompts: `models.prompt`. Splice modes:
- `exact` (default): the N placeholder embeddings are replaced one-for-one by the N image tokens; no text is lost.
- `m3d_legacy`: the released Med3DVLM/M3D layout (mirthAI/Med3DVLM's `prepare_inputs_labels_for_multimodal`): the first placeholder keeps its own
  embedding, the image tokens fill the next N positions, so the first text token is overwritten. Use it only to run
  released weights, which were trained that way.
Labels: -100 on the placeholders, the prompt and the padding; the answer and its EOS are learned.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from med3dvlm.config import ModelConfig, config_from_dict
from med3dvlm.models.dcformer import build_dcformer
from med3dvlm.models.export import VLM as VLM_KIND
from med3dvlm.models.export import copy_state, model_dir, read_meta, write_meta
from med3dvlm.models.projector import DualStreamProjector, projector_config_for
from med3dvlm.models.prompt import IMAGE_TOKEN, encode_example, pad_batch, vlm_tokenizer

PARTS = ("vision", "llm")  # what `from_pretrained` can load: vision tower + projector, the LLM (+ LoRA), or both
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model.trainable -> stage -> the parts that train (the rest frozen):
# `paper`: the projector, then LoRA + projector (Med3DVLM's paper); `released_code`: as the released scripts train
# (the input embeddings from stage 2; LoRA, the vision tower and the LM head too in stage 3); `full`: projector and the
# whole LLM, no LoRA (an LLM trained from scratch has nothing for LoRA to preserve).
TRAINABLE = {
    "paper": {2: ("projector",), 3: ("projector", "lora")},
    "released_code": {2: ("projector", "embed_in"), 3: ("projector", "lora", "embed_in", "vision", "embed_out")},
    "full": {2: ("projector", "llm"), 3: ("projector", "llm")},
}
PART_MODULES = {"projector": lambda m: m.projector, "vision": lambda m: m.vision, "llm": lambda m: m.llm,
                "embed_in": lambda m: m.llm.get_input_embeddings(), "embed_out": lambda m: m.llm.get_output_embeddings()}


def build_llm(cfg: ModelConfig, tokenizer, weights: bool = True, dtype: torch.dtype | None = None):
    """A causal LM: `tiny-qwen2` (random, from a config) or a local HF path; its vocabulary fits the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    if cfg.llm == "tiny-qwen2":
        hf = Qwen2Config(vocab_size=len(tokenizer), hidden_size=cfg.llm_hidden, intermediate_size=2 * cfg.llm_hidden,
                         num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                         num_key_value_heads=cfg.llm_kv_heads, max_position_embeddings=max(cfg.max_len, 512),
                         tie_word_embeddings=False)
        return AutoModelForCausalLM.from_config(hf)
    path = model_dir(cfg.llm)
    if weights:
        llm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    else:
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != old:
        mean_in = llm.get_input_embeddings().weight.data[:old].mean(0)
        out = llm.get_output_embeddings()
        mean_out = out.weight.data[:old].mean(0) if out is not None else None
        llm.resize_token_embeddings(len(tokenizer))
        new = range(min(old, len(tokenizer)), len(tokenizer))  # new rows start at the mean, as the reference
        for i in new:
            llm.get_input_embeddings().weight.data[i] = mean_in
            if mean_out is not None:
                llm.get_output_embeddings().weight.data[i] = mean_out
    return llm


class VLM(nn.Module):
    """Vision tower + projector + LLM. A serving replica may hold only a part: `llm=None` (the encoder side, which
    then needs `llm_width`) or `with_vision=False` (the generator side)."""

    def __init__(self, cfg: ModelConfig, llm: nn.Module | None, tokenizer, input_shape: tuple[int, int, int],
                 data: dict | None = None, with_vision: bool = True, llm_width: int | None = None):
        super().__init__()
        if cfg.splice not in ("exact", "m3d_legacy"):
            raise ValueError(f"splice must be exact or m3d_legacy, not {cfg.splice!r}")
        self.cfg, self.data = cfg, data
        self.input_shape = tuple(input_shape)
        self.llm = llm
        width = llm.config.hidden_size if llm is not None else llm_width
        self.vision = build_dcformer(cfg.encoder, cfg.stem_act, cfg.layer_scale_init) if with_vision else None
        self.projector = DualStreamProjector(projector_config_for(
            self.vision, self.input_shape, width, cfg.image_tokens, cfg.mixer_depth)) if with_vision else None
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.lora = False
        self.freeze_vision = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, input_shape, weights: bool = True, dtype=None) -> "VLM":
        tok = vlm_tokenizer(cfg.llm)
        return cls(cfg, build_llm(cfg, tok, weights, dtype), tok, input_shape)

    # ------------------------------------------------------------ training presets
    def add_lora(self) -> None:
        import warnings

        from peft import LoraConfig, get_peft_model

        if self.lora:
            return
        with warnings.catch_warnings():  # peft 0.21 reads the attribute transformers 5 renamed: peft's to change
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated", category=FutureWarning)
            self.llm = get_peft_model(self.llm, LoraConfig(
                r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout, bias="none",
                target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        self.lora = True

    def set_stage(self, stage: int) -> None:
        """Which parameters train in stage 2 or 3 (`TRAINABLE`, by `model.trainable`); the rest are frozen, and a
        frozen vision tower runs in eval mode (except in `released_code`, as the reference)."""
        parts = TRAINABLE.get(self.cfg.trainable, {}).get(stage)
        if parts is None:
            raise ValueError(f"no trainable preset {self.cfg.trainable!r} for stage {stage}")
        if "lora" in parts:
            self.add_lora()
        self.requires_grad_(False)
        for part in parts:
            if part == "lora":
                for n, p in self.llm.named_parameters():
                    if "lora_" in n:
                        p.requires_grad_(True)
            else:
                PART_MODULES[part](self).requires_grad_(True)
        self.freeze_vision = not any(p.requires_grad for p in self.vision.parameters())
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision and self.cfg.trainable != "released_code":
            self.vision.eval()  # BatchNorm statistics stay as stage 1 left them
        return self

    def num_params(self, trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    # ------------------------------------------------------------ forward
    def encode_images(self, volume: torch.Tensor | None, feat_low=None, feat_high=None) -> torch.Tensor:
        """Image tokens from a volume, or from the tower's two feature maps computed before (the feature cache)."""
        if volume is not None:
            feats = self.vision(volume)
            feat_low, feat_high = feats[-2], feats[-1]
        dtype = next(self.projector.parameters()).dtype
        return self.projector(feat_low.to(dtype), feat_high.to(dtype))

    def splice_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions that receive image tokens."""
        mask = input_ids == self.image_token_id
        n = self.cfg.image_tokens
        if not bool((mask.sum(1) == n).all()):
            raise ValueError(f"every sequence needs exactly {n} {IMAGE_TOKEN} tokens, got {mask.sum(1).tolist()}")
        if self.cfg.splice == "m3d_legacy":
            shifted = torch.zeros_like(mask)
            shifted[:, 1:] = mask[:, :-1]
            return shifted
        return mask

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()(input_ids)
        mask = self.splice_mask(input_ids).unsqueeze(-1)
        return emb.masked_scatter(mask, image_tokens.to(emb.dtype))

    def forward(self, volume=None, input_ids=None, attention_mask=None, labels=None, feat_low=None, feat_high=None):
        """With labels: the LM head runs only on the positions that are learned (the answers), not on every
        placeholder and prompt token; the loss equals HF's mean token cross-entropy, at a fraction of the
        head's compute and memory (vocab x sequence logits). Without labels: the LLM's full output."""
        emb = self.embed(input_ids, self.encode_images(volume, feat_low, feat_high))
        if labels is None:
            return self.llm(inputs_embeds=emb, attention_mask=attention_mask)
        return self.answer_loss(emb, attention_mask, labels)

    def answer_loss(self, emb: torch.Tensor, attention_mask, labels) -> CausalLMOutputWithPast:
        """`forward`'s loss from spliced embeddings (`embed`): the LM head on the learned positions only."""
        base = self.llm.get_base_model() if self.lora else self.llm
        hidden = base.get_decoder()(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), target[keep])
        return CausalLMOutputWithPast(loss=loss)

    # ------------------------------------------------------------ text
    def encode_example(self, prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
        """(input_ids, labels): placeholders + prompt (masked) + answer + EOS (learned); see `models.prompt`."""
        return encode_example(self.tokenizer, self.cfg.image_tokens, self.cfg.max_len, prompt, answer)

    def collate(self, examples: list[tuple[list[int], list[int]]], left_pad: bool = False) -> dict:
        return pad_batch(examples, self.tokenizer.pad_token_id, left_pad)

    @torch.no_grad()
    def generate(self, volume: torch.Tensor, prompts: list[str], max_new_tokens: int = 64, **kw) -> list[str]:
        """Batched greedy generation (left padding, attention mask); returns the decoded answers."""
        return self.generate_from_features(self.encode_images(volume), prompts, max_new_tokens, **kw)

    @torch.no_grad()
    def generate_from_features(self, image_tokens: torch.Tensor, prompts: list[str], max_new_tokens: int = 64,
                               **kw) -> list[str]:
        """`generate` from `encode_images` output (B, image_tokens, hidden): serving runs the encoder elsewhere."""
        batch = self.collate([self.encode_example(p, None) for p in prompts], left_pad=True)
        dev = image_tokens.device
        emb = self.embed(batch["input_ids"].to(dev), image_tokens)
        out = self.llm.generate(inputs_embeds=emb, attention_mask=batch["attention_mask"].to(dev),
                                max_new_tokens=max_new_tokens, do_sample=kw.pop("do_sample", False),
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **kw)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, state: dict | None = None) -> None:
        """`state`: the tensors to write instead of `state_dict()` (a ZeRO-3 export gathers them module by module)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_meta(path, VLM_KIND, asdict(self.cfg), self.data, input_shape=list(self.input_shape), lora=self.lora)
        base = self.llm.get_base_model() if self.lora else self.llm
        base.config.save_pretrained(path / "llm")
        self.tokenizer.save_pretrained(path / "tokenizer")
        state = state if state is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, parts: tuple[str, ...] = PARTS, device=None) -> "VLM":
        """Load an export, or only some of its `parts` ("vision": tower + projector; "llm": the LLM with LoRA): the
        other part is never built and its tensors are never read. The modules are allocated on `device` in `dtype`
        without a random initialisation and filled tensor by tensor, so a replica's peak memory is about its weights."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.initialization import no_init_weights

        if not parts or set(parts) - set(PARTS):
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, not {parts!r}")
        path = Path(model_dir(path))
        meta = read_meta(path, VLM_KIND)
        cfg = config_from_dict({"model": meta["model"]}).model
        tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        llm_cfg = AutoConfig.from_pretrained(path / "llm", local_files_only=True)
        with torch.device(device or "cpu"), no_init_weights():
            llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=dtype) if "llm" in parts else None
            model = cls(cfg, llm, tok, tuple(meta["input_shape"]), meta.get("data"), with_vision="vision" in parts,
                        llm_width=llm_cfg.hidden_size)
            if meta["lora"] and llm is not None:
                model.add_lora()
            if dtype is not None:
                model.to(dtype)
        prefixes = (("vision.", "projector.") if "vision" in parts else ()) + (("llm.",) if "llm" in parts else ())
        copy_state(model, path, prefixes)
        return model
