"""Stage 1's validation: the sigmoid loss and retrieval recall on the validation split, every `eval_every` steps and
at the last (`Validator.due`)."""

from __future__ import annotations

import torch

from med3dvlm.models.prompt import trim_padding
from med3dvlm.train.plan import due


KEEP_VALIDATION_BYTES = 256 << 20


class Validator:
    """Asked after every step whether to validate (`due`); runs the validation on the worker's copy of the split.
    A split under KEEP_VALIDATION_BYTES is read once and kept for the run: a Ray Data pass costs seconds of start-up
    each time, more than the validation itself on a small split. A larger split streams on every pass."""

    def __init__(self, every: int, total: int):
        self.every, self.total = every, total
        self.kept: list | None = None

    def due(self, done: int) -> bool:
        return due(done, self.every, self.total)

    def between_checkpoints(self, done: int) -> bool:
        """A validation on a multiple of `every` (reported even without a checkpoint, for Tune's schedulers)."""
        return self.every > 0 and done % self.every == 0

    def run(self, model, device) -> dict:
        return validate_stage1(model, device, self.batches())

    def batches(self):
        import ray.train

        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for b in ray.train.get_dataset_shard("validation").iter_torch_batches(batch_size=16):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in b.values() if isinstance(t, torch.Tensor))
                kept = None if size > KEEP_VALIDATION_BYTES else kept
                if kept is not None:
                    kept.append(b)
            yield b
        self.kept = kept


@torch.no_grad()
def validate_stage1(model, device, batches) -> dict:
    """Sigmoid loss and retrieval recall on the whole validation split (every worker holds all of it)."""
    from med3dvlm.eval.retrieval import retrieval_metrics
    from med3dvlm.train.augment import apply_augment

    was = model.training
    model.eval()
    imgs, txts = [], []
    for b in batches:
        imgs.append(model.encode_image(apply_augment(b["volume"].to(device), None)).float())
        t = trim_padding({k: b[k] for k in ("input_ids", "attention_mask")})
        txts.append(model.encode_text(t["input_ids"].to(device), t["attention_mask"].to(device)).float())
    model.train(was)
    img, txt = torch.cat(imgs), torch.cat(txts)
    r = retrieval_metrics(img.cpu(), txt.cpu(), ks=(1, 5))
    out = {"val_loss": float(model.loss_fn(img, txt, gather=False)), "val_n": len(img)}
    out.update({f"val_{k}": v for k, v in r.items() if k != "n"})
    out["val_R@1"] = (r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2
    return out
