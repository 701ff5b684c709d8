"""M3D-Bench metrics against their reference packages, and `pipelines.evaluate` end to end on the trained tiny models."""

import csv
import json
import math

import pytest
import torch

from med3dvlm.eval.retrieval import rank_of_target, recall_at_k, retrieval_at_n, retrieval_metrics
from med3dvlm.eval.text import BertScore, bleu1, meteor, rouge1
from med3dvlm.eval.vqa import accuracy_by_type, lenient_correct, named_correct, strict_correct

PAIRS = [  # (prediction, reference)
    ("The liver is normal in size.", "The liver is normal in size."),  # identical
    ("Kidneys unremarkable.", "A large cyst in the spleen"),  # disjoint
    ("", "The liver is normal."),  # empty prediction
    ("liver , normal ; no (ascites).", "Liver normal, no ascites."),  # punctuation
    ("THE LIVER IS NORMAL", "the liver is normal"),  # casing
    ("the the the the the", "the cat sat on the mat"),  # clipped counts
    ("liver", "a much longer reference sentence about the liver and the spleen"),  # brevity penalty
    (" ".join(["there is a hypodense lesion in segment seven of the liver"] * 12),
     " ".join(["a hypodense lesion is seen in the right lobe of the liver"] * 10)),  # long
    ("Lésion hépatique de 3 cm ✓", "Lésion hépatique 3cm"),  # non-ASCII
]


def test_bleu1_equals_sacrebleu_13a_unigram_bleu_without_smoothing():
    from sacrebleu.metrics import BLEU

    ref = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=False)
    for pred, gold in PAIRS:
        want = ref.sentence_score(pred, [gold]).score / 100 if pred else 0.0
        assert bleu1(pred, gold) == pytest.approx(want, abs=1e-9), (pred, gold)
    # by hand: 5 "the" clipped to 2 of 5 tokens, no brevity penalty (5 < 6 tokens -> exp(1 - 6/5))
    assert bleu1("the the the the the", "the cat sat on the mat") == pytest.approx(2 / 5 * math.exp(1 - 6 / 5))


def test_rouge1_is_rouge_score_f_without_stemming():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    for pred, gold in PAIRS:
        assert rouge1(pred, gold) == pytest.approx(sc.score(gold, pred)["rouge1"].fmeasure)
    # no stemming: "lesions" and "lesion" differ; by hand P = 1/2, R = 1/2
    assert rouge1("two lesions", "two lesion") == pytest.approx(0.5)


def test_meteor_matches_nltk_and_the_documented_example():
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    # HF evaluate's METEOR docstring example
    assert round(meteor("It is a guide to action which ensures that the military always obeys the commands of the party",
                        "It is a guide to action that ensures that the military will forever heed Party commands"), 4) == 0.6944
    for pred, gold in PAIRS[:2] + PAIRS[3:]:
        want = meteor_score([word_tokenize(gold)], word_tokenize(pred), alpha=0.9, beta=3, gamma=0.5)
        assert meteor(pred, gold) == pytest.approx(want)
    assert meteor("", "The liver is normal.") == 0.0
    # WordNet synonyms count ("ill" ~ "sick" is found only through WordNet; nltk looks synonyms up after stemming,
    # so stem-changing words such as "large" never match "big", in the benchmark as here)
    assert meteor("the patient is ill", "the patient is sick") > meteor("the patient is red", "the patient is sick")


def test_nltk_data_names_the_missing_piece(tmp_path, monkeypatch):
    import nltk

    from med3dvlm.eval.nltk_data import NltkDataError, check, lexnames_lines

    lines = lexnames_lines()
    assert len(lines) == 45 and lines[3] == "03\tnoun.Tops\t1" and lines[44] == "44\tadj.ppl\t3"
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(NltkDataError, match="WordNet"):
        check()


def test_bertscore_local_model_and_its_label():
    bs = BertScore()
    f = bs(["the liver is normal", "", "spleen cyst"], ["the liver is normal", "the liver", "kidney stone"])
    assert f[0] == pytest.approx(1.0, abs=1e-4) and f[1] == 0.0 and 0 < f[2] < f[0]
    assert "not the benchmark" in bs.label and "MiniLM" in bs.label
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertScore("/no/such/model")


def test_recall_at_k_on_a_hand_worked_matrix():
    # rows = images, cols = texts; image 0 ranks its text 1st, image 1 ranks its text 3rd, image 2 ranks its text 2nd
    s = torch.tensor([[0.9, 0.1, 0.0],
                      [0.5, 0.2, 0.6],
                      [0.1, 0.3, 0.2]])
    assert recall_at_k(s, 1) == pytest.approx(1 / 3)
    assert recall_at_k(s, 2) == pytest.approx(2 / 3)
    assert recall_at_k(s, 3) == pytest.approx(1.0)
    assert rank_of_target(s).tolist() == [1, 3, 2]
    # columns: text 0 ranks image 0 first; text 1 ranks images 2, 1 -> 2nd; text 2 ranks images 1, 2 -> 2nd
    assert rank_of_target(s.t()).tolist() == [1, 2, 2]
    img, txt = torch.eye(3), s.t().contiguous()
    m = retrieval_metrics(img, txt, ks=(1,))  # img @ txt.T = s
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3) and m["text_to_image_R@1"] == pytest.approx(1 / 3)
    # ties rank by index (torch.topk order): with all scores equal only the first query finds its item at rank 1
    assert rank_of_target(torch.ones(4, 4)).tolist() == [1, 2, 3, 4] and recall_at_k(torch.ones(4, 4), 1) == 0.25
    assert list(retrieval_at_n(torch.eye(150), torch.eye(150), ns=(100, 500))) == ["100"]
    assert list(retrieval_at_n(torch.eye(7), torch.eye(7))) == ["7"]


@pytest.mark.parametrize("pred,letter,lenient,strict", [
    ("B. Liver", "B", True, True),
    ("The answer is B. Liver", "B", True, True),
    ("A. Spleen, or maybe B. Liver", "B", True, False),  # the benchmark's rule is easy to game
    ("B", "B", False, True),
    ("Liver", "B", False, False),
    ("", "A", False, False),
    ("C. Kidney", "B", False, False),
])
def test_closed_vqa_lenient_vs_strict(pred, letter, lenient, strict):
    assert lenient_correct(pred, letter) is lenient
    assert strict_correct(pred, letter) is strict


@pytest.mark.parametrize("pred,answer,named", [
    ("b. non - contrast", "Non-contrast", True),  # the tiny config's uncased WordPiece decoding
    ("A. Liver", "Liver", True),  # the wrong letter, the right organ: still named
    ("a. left side of the liver", "Right side of the liver", False),
    ("D. Hypodense lesion", "Hyperdense lesion", False),
    ("", "Liver", False),
    ("A. Liver", "", False),
])
def test_closed_vqa_named_ignores_the_letter(pred, answer, named):
    assert named_correct(pred, answer) is named


def test_accuracy_by_type_scores_the_rules_a_file_has():
    old = [{"question_type": "1", "lenient": "1", "strict": "0"}, {"question_type": "3", "lenient": "0", "strict": "0"}]
    new = [{**r, "named": "1"} for r in old]
    assert "named" not in accuracy_by_type(old) and accuracy_by_type(old)["lenient"]["mean"] == 0.5
    assert accuracy_by_type(new)["named"] == {"per_type": {"Plane": 1.0, "Organ": 1.0}, "mean": 1.0}


def test_generator_keeps_a_failing_sample_as_an_error(chain, shards):
    """One sample whose generation raises becomes that sample's error; its batch-mates still get answers."""
    from med3dvlm.data.shards import read_table, volumes_from_table
    from med3dvlm.eval.predict import Generator
    from med3dvlm.eval.tasks import get_task

    t = read_table(shards[0], ["volume_id", "volume", "report"]).slice(0, 3)
    g = Generator(chain[3]["export"], get_task("report"), max_new_tokens=4)
    real = g.model.generate

    def flaky(vols, prompts, **kw):
        if len(prompts) > 1:
            raise RuntimeError("batch failed")
        if vols.shape[0] == 1 and flaky.calls == 1:
            flaky.calls += 1
            raise ValueError("bad sample")
        flaky.calls += 1
        answers.append(real(vols, prompts, **kw))
        return answers[-1]

    flaky.calls, answers = 0, []
    g.model.generate = flaky
    out = g({"volume_id": t["volume_id"].to_pylist(), "volume": volumes_from_table(t), "report": t["report"].to_pylist()})
    assert list(out["error"]) == ["", "ValueError: bad sample", ""]
    # the failing sample has no answer; its batch-mates keep the model's own (whatever a tiny model writes)
    assert out["prediction"][1] == "" and [out["prediction"][0], out["prediction"][2]] == [a[0] for a in answers]


# ----------------------------------------------------------------------------------------------- pipeline
def _eval(task, model, shards, out, *extra):
    from med3dvlm.eval.runner import evaluate
    from pipelines.evaluate import parse_args

    # the chain trained on case_split's training cases; the official split's test volumes share some of them
    # (test_lineage.py tests the refusal)
    return evaluate(parse_args(["--task", task, "--model", model, "--shards", shards, "--out", str(out),
                                "--allow-overlap", *extra]), log=lambda *_: None)


def _test_rows(shards, split="test", field="split"):
    from med3dvlm.data.shards import read_table

    return read_table(shards, ["volume_id", "report", "qa"], split=split, split_field=field).to_pylist()


def test_evaluate_retrieval_end_to_end(chain, shards, tmp_path):
    res = _eval("retrieval", chain[1]["export"], str(shards[0]), tmp_path, "--split", "train,validation",
                "--split-field", "case_split")
    want = _test_rows(shards[0], "train", "case_split") + _test_rows(shards[0], "validation", "case_split")
    assert res["n"] == len(want)
    m = res["metrics"][str(len(want))]
    assert 0 <= m["image_to_text_R@1"] <= m["image_to_text_R@5"] <= m["image_to_text_R@10"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "samples.csv")))
    assert sorted(r["volume_id"] for r in rows) == sorted(r["volume_id"] for r in want)
    # the per-sample ranks and the aggregate agree
    assert sum(int(r["image_to_text_rank"]) == 1 for r in rows) / len(rows) == pytest.approx(m["image_to_text_R@1"])
    assert (tmp_path / "similarity.png").stat().st_size > 1000
    assert "image->text" in (tmp_path / "results.md").read_text()


def test_evaluate_closed_vqa_scores_every_test_question(chain, shards, tmp_path):
    res = _eval("vqa-closed", chain[3]["export"], str(shards[0]), tmp_path, "--max-new-tokens", "8")
    # every test question once: M3D_VQA_test5k.csv is a subset of M3D_VQA_test.csv (its rows repeat test rows)
    questions = [q for r in _test_rows(shards[0]) for q in {
        (q["question"], q["answer"], q["choice_a"], q["choice_b"], q["choice_c"], q["choice_d"]): q
        for q in r["qa"] if not q["yes_no"]}.values()]
    assert len(questions) < len([q for r in _test_rows(shards[0]) for q in r["qa"] if not q["yes_no"]])
    assert res["n"] == res["metrics"]["n"] == len(questions) > 0
    rows = list(csv.DictReader(open(tmp_path / "samples.csv")))
    assert sorted(r["question"] for r in rows) == sorted(
        __import__("med3dvlm.models.prompt", fromlist=["closed_prompt"]).closed_prompt(q)[0] for q in questions)
    assert set(res["metrics"]["lenient"]["per_type"]) <= {"Plane", "Phase", "Organ", "Abnormality", "Location"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["lenient"]["mean"] == pytest.approx(
        sum(saved["metrics"]["lenient"]["per_type"].values()) / len(saved["metrics"]["lenient"]["per_type"]))


def test_evaluate_report_resumes_without_redoing_samples(chain, shards, tmp_path):
    first = _eval("report", chain[3]["export"], str(shards[0]), tmp_path, "--limit", "2", "--max-new-tokens", "12")
    assert first["n"] == 2
    before = list(csv.DictReader(open(tmp_path / "samples.csv")))
    res = _eval("report", chain[3]["export"], str(shards[0]), tmp_path, "--resume", "--max-new-tokens", "12",
                "--replicas", "2")
    rows = list(csv.DictReader(open(tmp_path / "samples.csv")))
    n_test = len(_test_rows(shards[0]))
    assert res["n"] == len(rows) == n_test and len({r["key"] for r in rows}) == n_test
    assert rows[:2] == before  # kept, not regenerated
    for r in rows:
        assert 0 <= float(r["meteor"]) <= 1 and 0 <= float(r["bleu"]) <= 1
    assert res["metrics"]["meteor"] == pytest.approx(sum(float(r["meteor"]) for r in rows) / len(rows))
    assert "MiniLM" in res["bertscore_model"]


def test_evaluate_refuses_bad_input_before_starting(chain, shards, tmp_path):
    from med3dvlm.runtime import UserError

    with pytest.raises(UserError, match="expected stage 1's export"):
        _eval("retrieval", chain[3]["export"], str(shards[0]), tmp_path)
    with pytest.raises(UserError, match="expected a stage-2/3 export"):
        _eval("vqa-open", chain[1]["export"], str(shards[0]), tmp_path)
    with pytest.raises(UserError, match="no 'holdout' rows"):
        _eval("report", chain[3]["export"], str(shards[0]), tmp_path, "--split", "holdout")
    with pytest.raises(UserError, match="no shards"):
        _eval("report", chain[3]["export"], str(tmp_path), tmp_path)
    with pytest.raises(UserError, match="max-new-tokens"):
        _eval("report", chain[3]["export"], str(shards[0]), tmp_path, "--max-new-tokens", "0")
