"""Batch predictors for evaluation: callables on numpy batches of shard rows, used as a Ray Data actor pool
(`map_batches(Embedder|Generator, compute=ActorPoolStrategy(...))`) and directly in tests.

Each output row carries `key` (unique per sample) so that a resumed evaluation skips samples already written.
A failure on one sample becomes that sample's `error` with an empty prediction; it never loses the rest of the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from med3dvlm.data.transform import to_float

class Embedder:
    """Stage-1 (CLIP) features of volumes and their reports."""

    def __init__(self, model_dir: str, device: str = "cpu", threads: int | None = None):
        from med3dvlm.models.clip import CLIPModel

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_dir).to(self.device).eval()
        self.model.vision.fold_batchnorm()  # as the Serve Encoder: BatchNorm folded into the convolutions

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        vol = to_float(np.asarray(batch["volume"])).unsqueeze(1).to(self.device)
        reports = [str(r) for r in batch["report"]]
        img = self.model.encode_image(vol).float().cpu().numpy()
        txt = self.model.encode_text(**{k: v.to(self.device) for k, v in self.model.tokenize(reports).items()})
        return {"volume_id": np.asarray(batch["volume_id"]), "report": np.asarray(reports, dtype=object),
                "image_embedding": img, "text_embedding": txt.float().cpu().numpy()}


class Generator:
    """Report or VQA answers from a stage-2/3 VLM export, batched greedy (or sampled) generation, for the samples a
    generation task (`eval.tasks`) asks of each shard row."""

    def __init__(self, model_dir: str, task, device: str = "cpu", max_new_tokens: int = 256,
                 gen_batch: int = 8, sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                 seed: int = 42, done: frozenset = frozenset(), threads: int | None = None, dtype: str | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0):
        from med3dvlm.models.vlm import VLM

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = VLM.from_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else None).to(self.device).eval()
        self.model.vision.fold_batchnorm()
        self.task, self.seed, self.done, self.gen_batch = task, seed, done, gen_batch
        self.gen_kw = {"max_new_tokens": max_new_tokens, "do_sample": sample}
        if repetition_penalty != 1.0:
            self.gen_kw["repetition_penalty"] = repetition_penalty
        if no_repeat_ngram_size:  # on the generated tokens only, as asked (transformers warns that it skips the prompt)
            self.gen_kw["no_repeat_ngram_size"] = no_repeat_ngram_size
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
        if sample:
            self.gen_kw.update(temperature=temperature, top_p=top_p)

    def _generate(self, vols: torch.Tensor, prompts: list[str]) -> tuple[list[str], list[str]]:
        try:
            return self.model.generate(vols, prompts, **self.gen_kw), [""] * len(prompts)
        except Exception as e:  # one bad sample must not sink its batch: retry one by one
            if len(prompts) == 1:
                return [""], [f"{type(e).__name__}: {e}"[:300]]
            preds, errs = [], []
            for k in range(len(prompts)):
                p, err = self._generate(vols[k:k + 1], prompts[k:k + 1])
                preds += p
                errs += err
            return preds, errs

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        samples = [s for s in self.task.expand(batch, self.seed) if s["key"] not in self.done]
        vols = to_float(np.asarray(batch["volume"]))
        preds, errors = [], []
        for k in range(0, len(samples), self.gen_batch):
            chunk = samples[k:k + self.gen_batch]
            v = vols[[s["i"] for s in chunk]].unsqueeze(1).to(self.device, dtype=next(self.model.parameters()).dtype)
            p, e = self._generate(v, [s["question"] for s in chunk])
            preds += p
            errors += e
        cols = {c: np.asarray([s[c] for s in samples], dtype=object) for c in
                ("key", "question", "reference", "answer_choice")}
        cols["question_type"] = np.asarray([s["question_type"] for s in samples], dtype=np.int64)
        cols["volume_id"] = np.asarray([str(batch["volume_id"][s["i"]]) for s in samples], dtype=object)
        cols["prediction"] = np.asarray(preds, dtype=object)
        cols["error"] = np.asarray(errors, dtype=object)
        return cols
