"""Per-sample text metrics exactly as M3D-Bench computes them with HF `evaluate` (BAAI-DCAI/M3D `Bench/eval`), offline.

- BLEU-1: 13a tokenisation, clipped unigram precision times the brevity penalty, no smoothing (evaluate's "bleu" with
  max_order=1). An empty prediction (or reference) scores 0.
- ROUGE-1: F-measure of `rouge_score` without stemming.
- METEOR: nltk's `meteor_score` on `word_tokenize` tokens, alpha 0.9, beta 3, gamma 0.5 (WordNet from local files).
- BERTScore F1: `bert_score` with a model from a local path only (the benchmark's roberta-large layer 17 when given).

Predictions and references are stripped first, as the benchmark does. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _tok13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def bleu1(pred: str, ref: str) -> float:
    hyp, gold = _tok13a()(pred.strip()).split(), _tok13a()(ref.strip()).split()
    if not hyp or not gold:
        return 0.0
    ref_counts = Counter(gold)
    matches = sum(min(c, ref_counts[w]) for w, c in Counter(hyp).items())
    ratio = len(hyp) / len(gold)
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return bp * matches / len(hyp)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)


def rouge1(pred: str, ref: str) -> float:
    return _rouge().score(ref.strip(), pred.strip())["rouge1"].fmeasure


@lru_cache(maxsize=1)
def _meteor_ready():
    from med3dvlm.eval.nltk_data import check

    check()
    return True


def meteor(pred: str, ref: str) -> float:
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    _meteor_ready()
    hyp = word_tokenize(pred.strip())
    if not hyp:
        return 0.0
    return float(meteor_score([word_tokenize(ref.strip())], hyp, alpha=0.9, beta=3, gamma=0.5))


def text_scores(pred: str, ref: str) -> dict:
    """BLEU-1, ROUGE-1 and METEOR of one prediction against its reference."""
    return {"bleu": bleu1(pred, ref), "rouge1": rouge1(pred, ref), "meteor": meteor(pred, ref)}


BENCHMARK_BERTSCORE = "roberta-large, layer 17"


class BertScore:
    """BERTScore F1 with a model from a local directory; never downloads.

    The benchmark uses roberta-large at layer 17 (no idf, no rescaling); a local roberta-large directory gets layer 17
    automatically. Any other model uses its last layer and is labelled as not comparable with the paper.
    """

    def __init__(self, model_path: str | None = None, num_layers: int | None = None, batch_size: int = 32):
        import json

        from med3dvlm.models.clip import minilm_path

        self.packaged = model_path is None
        path = Path(model_path) if model_path else Path(minilm_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"BERTScore model {path}: no config.json there (give a local model directory)")
        cfg = json.loads((path / "config.json").read_text())
        is_roberta_large = cfg.get("model_type") == "roberta" and cfg.get("num_hidden_layers") == 24
        self.num_layers = num_layers or (17 if is_roberta_large else cfg.get("num_hidden_layers"))
        self.path, self.batch_size = str(path), batch_size
        self.comparable = is_roberta_large and self.num_layers == 17
        name = "roberta-large" if is_roberta_large else path.name if not self.packaged else "all-MiniLM-L6-v2 (packaged)"
        self.label = f"{name}, layer {self.num_layers}" + ("" if self.comparable else "; not the benchmark's "
                                                                                      f"{BENCHMARK_BERTSCORE}")
        self._scorer = None

    def __call__(self, preds: list[str], refs: list[str]) -> list[float]:
        if not preds:
            return []
        if self._scorer is None:
            import logging

            from bert_score import BERTScorer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            logging.getLogger("bert_score").setLevel(logging.ERROR)
            self._scorer = BERTScorer(model_type=self.path, num_layers=self.num_layers, batch_size=self.batch_size)
        preds, refs = [p.strip() for p in preds], [r.strip() for r in refs]
        # an empty prediction or reference scores 0 (bert_score cannot encode "" with transformers 5)
        keep = [i for i, (p, r) in enumerate(zip(preds, refs)) if p and r]
        out = [0.0] * len(preds)
        if keep:
            _, _, f1 = self._scorer.score([preds[i] for i in keep], [refs[i] for i in keep], verbose=False)
            for i, f in zip(keep, f1.tolist()):
                out[i] = float(f)
        return out
