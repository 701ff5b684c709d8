"""The demo's tiny pretrained LLM (`train.tiny_llm`): its trimmed vocabulary against the packaged MiniLM tokenizer,
its choice-lookup skill on questions it never saw, and its directory as an ordinary `model.llm` path."""

import numpy as np
import pytest
import torch

from med3dvlm.config import load_config
from med3dvlm.data.samples import task_rows
from med3dvlm.data.synthetic import PHASES, PLANES, LetterBalance, sample_case, vqa_rows
from med3dvlm.models.clip import load_tokenizer
from med3dvlm.models.prompt import LETTERS
from med3dvlm.train.tiny_llm import build_tiny_llm, lookup_examples


def tasks_of(cases: range, seed: int = 5) -> list[dict]:
    """Stage-3 tasks of synthetic cases, as the shards would give them (one series each, closed questions in 4 orders)."""
    balance, tasks = LetterBalance(seed), []
    for i in cases:
        case = sample_case(i, seed)
        qa = [{"question": r[3], "choice_a": r[4], "choice_b": r[5], "choice_c": r[6], "choice_d": r[7],
               "answer": r[8], "answer_choice": r[9], "split": "train", "yes_no": False}
              for r in vqa_rows(case, PLANES[i % 3], list(PHASES)[i % 3], "img", "text", seed, balance)]
        row = {"volume_id": case.case_id, "report": f"The {case.organ} is normal.", "qa": qa, "volume": None}
        tasks += task_rows(row, ("train",), closed_orders=4)
    return tasks


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    cfg = load_config("tiny")
    out = tmp_path_factory.mktemp("llm")
    # 1000 steps: the lookup forms suddenly (loss 0.14 -> 0.03) somewhere past 500, where is machine-dependent; at 600
    # it had formed on one 2-core box (0.84) and not on another (0.50, an AMD EPYC, 2026-11-30)
    return cfg, build_tiny_llm(cfg, tasks_of(range(40)), out, steps=1000, log=lambda *_: None)


def test_the_trimmed_vocabulary_tokenises_every_training_text_as_minilm_and_reloads_as_itself(tiny_llm):
    _, path = tiny_llm
    minilm, tok = load_tokenizer("minilm"), load_tokenizer(path)  # the path every LLM loads by (beside a qwen2 config)
    assert len(tok) < 400 < len(minilm)
    for t in tasks_of(range(40))[:50]:
        for text in (t["prompt"], t["answer"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.convert_ids_to_tokens(ids) == minilm.tokenize(text)
    assert tok.tokenize("hepatocellular") == ["[UNK]"]  # a word none of the texts uses


def test_the_pretrained_llm_answers_the_letter_of_the_cued_choice_on_unseen_questions(tiny_llm):
    cfg, path = tiny_llm
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    llm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    letters = [tok.convert_tokens_to_ids(x.lower()) for x in LETTERS]
    right = []
    for ids, labels in lookup_examples(tasks_of(range(60, 80)), tok, cfg.model.image_tokens, cfg.model.max_len):
        first = labels.index(next(x for x in labels if x != -100))  # the answer's first token: its letter
        with torch.no_grad():
            logits = llm(torch.tensor([ids[:first]])).logits[0, -1, letters]
        right.append(letters[int(logits.argmax())] == labels[first])
    assert np.mean(right) > 0.7  # chance: 0.25; 0.93 at these settings (2026-11-30)


def test_its_directory_is_an_ordinary_llm_path_and_the_vlm_export_keeps_its_tokenizer(tiny_llm, tmp_path):
    _, path = tiny_llm
    from med3dvlm.models.vlm import VLM

    cfg = load_config("tiny", [f"model.llm={path}"])
    vlm = VLM.from_config(cfg.model, cfg.data.shape)
    assert vlm.llm.get_input_embeddings().weight.shape[0] == len(vlm.tokenizer) == len(load_tokenizer(path))
    vlm.save_pretrained(tmp_path / "export")
    back = VLM.from_pretrained(tmp_path / "export")
    prompt = " Which organ is the main focus of this image? Choices: A. Liver B. Spleen C. Kidney D. Pancreas"
    assert back.encode_example(prompt, " B. Spleen") == vlm.encode_example(prompt, " B. Spleen")
