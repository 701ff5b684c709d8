"""What a stage checks before any worker starts, beyond its export's kind: that the models it builds from a path are
there, and that an export's tokenizer is the one the run tokenises with."""

from __future__ import annotations

from med3dvlm import storage
from med3dvlm.runtime import UserError

BUILTIN_TEXT = ("minilm", "tiny-bert")
BUILTIN_LLM = ("tiny-qwen2",)


def exists_or_refuse(key: str, location: str, builtin: tuple[str, ...]) -> None:
    if location not in builtin and not storage.exists(location):
        raise UserError(f"{key} {location}: does not exist (models load from paths or storage URIs, never a hub)")


def same_vocabulary(cfg, init: str, meta: dict) -> None:
    """The export's tokenizer is the one the run tokenises its samples with (`model.llm`'s, plus the image token):
    an id the export's embeddings lack would fail in a worker a minute later as an IndexError."""
    from transformers import AutoTokenizer

    from med3dvlm.models.prompt import vlm_tokenizer

    theirs = AutoTokenizer.from_pretrained(storage.local_path(storage.join(init, "tokenizer")), local_files_only=True)
    ours = vlm_tokenizer(cfg.model.llm)
    if theirs.get_vocab() != ours.get_vocab():
        raise UserError(f"--init {init}: its tokenizer ({len(theirs)} tokens) is not model.llm={cfg.model.llm}'s "
                        f"({len(ours)} tokens), which tokenises the samples; pass the model.llm it was trained with "
                        f"(its config.json says {meta['model']['llm']})")
