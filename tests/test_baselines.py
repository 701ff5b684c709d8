"""The demo's baselines: what a model that ignores its image would score must be computed right, and the synthetic
task must not be solvable without the image."""

import csv
from collections import Counter

import numpy as np
import pytest
import torch

from med3dvlm.eval.baselines import majority_closed, retrieval_chance, rotation, wilson
from med3dvlm.eval.results import read_rows


def test_majority_baseline_of_a_hand_made_sample_file(tmp_path):
    rows = [  # (question type, answer letter): Plane A A B C -> 2/4; Organ D D D -> 3/3
        (1, "A"), (1, "A"), (1, "B"), (1, "C"), (3, "D"), (3, "D"), (3, "D")]
    f = tmp_path / "samples.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "question_type", "answer_choice", "prediction", "lenient", "strict"])
        w.writerows([[i, t, a, "A.", int(a == "A"), int(a == "A")] for i, (t, a) in enumerate(rows)])
    m = majority_closed(read_rows(f))
    assert m["per_type"]["Plane"] == {"letter": "A", "accuracy": 0.5}
    assert m["per_type"]["Organ"] == {"letter": "D", "accuracy": 1.0}
    assert m["mean"] == pytest.approx(0.75)


def test_wilson_interval_is_the_score_test_inversion():
    # Wilson (1927): the interval's ends are the p where the score test is exactly at z: (k/n - p)^2 = z^2 p (1-p) / n
    for k, n in ((8, 10), (0, 23), (5, 23), (23, 23)):
        for p in wilson(k, n):
            if 0 < p < 1:
                assert (k / n - p) ** 2 == pytest.approx(1.96 ** 2 * p * (1 - p) / n, rel=1e-9)
    assert wilson(0, 23)[0] == 0.0 and wilson(23, 23)[1] == 1.0


def test_retrieval_control_of_an_image_blind_model_equals_its_score():
    from med3dvlm.eval.retrieval import rank_of_target
    from med3dvlm.eval.tasks.retrieval import retrieval_baselines

    g = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    reports = [f"report {i % 6}" for i in range(12)]
    blind = torch.ones(12, 8) / 8 ** 0.5  # the test double: the same embedding whatever the volume
    s = blind @ txt.t()
    b = retrieval_baselines(blind, txt, reports, rank_of_target(s), rank_of_target(s.t()))
    r1 = float((rank_of_target(s) <= 1).float().mean())
    assert b["control"]["image_to_text_R@1"] == pytest.approx(r1)
    assert b["distinct"]["image_to_text_R@1"] == pytest.approx(b["distinct"]["control_image_to_text_R@1"])
    assert b["chance_R@1"] == retrieval_chance(reports) == pytest.approx(1 / 6)
    seeing = txt.clone()  # a model whose image embedding is its report's: perfect, and its control is not
    s = seeing @ txt.t()
    b = retrieval_baselines(seeing, txt, reports, rank_of_target(s), rank_of_target(s.t()))
    assert b["control"]["image_to_text_R@1"] < 0.5


def test_rotation_is_a_derangement():
    for n in range(2, 40):
        r = rotation(n)
        assert sorted(r) == list(range(n)) and all(r[i] != i for i in range(n))


def test_shuffled_images_pair_each_text_with_another_volume(ray_session):
    import ray

    from med3dvlm.eval.feed import rotate_volumes

    n = 9  # rows in shard order; cases c0 (v0, v1), c1 (v2), ...: the order is by (case, id), as here
    ds = ray.data.from_items([{"volume_id": f"v{i}", "case_id": f"c{(i + 1) // 2}", "qa": f"q{i}",
                               "volume": np.full((2, 2, 2), i, np.uint8)} for i in range(n)])
    rows = sorted(rotate_volumes(ds.select_columns(["volume_id", "case_id", "volume"]), ds.drop_columns(["volume"]))
                  .take_all(), key=lambda r: r["volume_id"])
    assert [r["qa"] for r in rows] == [f"q{i}" for i in range(n)]  # texts stay with their sample
    got = [int(r["volume"].flat[0]) for r in rows]
    assert got == rotation(n)  # each sample sees the volume of sample (i + n//2) mod n
    assert all(f"c{(g + 1) // 2}" != r["case_id"] for g, r in zip(got, rows))  # never its own case's volume

    def constant(volume) -> str:  # a test double that ignores its image
        return "A."

    def looks(volume) -> str:
        return "ABCD"[int(volume.flat[0]) % 4] + "."

    truth = ["ABCD"[i % 4] + "." for i in range(n)]
    for model, same in ((constant, True), (looks, False)):
        plain = sum(model(np.full((2, 2, 2), i, np.uint8)) == truth[i] for i in range(n))
        shuffled = sum(model(r["volume"]) == truth[i] for i, r in enumerate(rows))
        assert (plain == shuffled) is same


def test_synthetic_answers_are_balanced_across_letters_within_each_type(tmp_path):
    from med3dvlm.data.synthetic import write_m3d_tree

    write_m3d_tree(tmp_path, cases=60, seed=3)
    by_type: dict = {}
    for name in ("M3D_VQA_train.csv", "M3D_VQA_val.csv", "M3D_VQA_test.csv"):
        with open(tmp_path / name, newline="") as f:
            for r in csv.DictReader(f):
                by_type.setdefault(r["Question Type"], Counter())[r["Answer Choice"]] += 1
                assert r[f"Choice {r['Answer Choice']}"] == r["Answer"]
    assert set(by_type) == {"1", "2", "3", "4", "5"}
    for t, c in by_type.items():
        assert set(c) == set("ABCD") and max(c.values()) - min(c.values()) <= 3, (t, c)
    with open(tmp_path / "M3D_Cap.json") as f:
        import json

        cap = json.load(f)
    texts = {(tmp_path / e["text"].replace("M3D_Cap_npy", "M3D_Cap")).read_text() for e in cap["train"]}
    assert len(texts) > 20  # reports differ by what the image shows, so retrieval is meaningful


def test_synthetic_phase_and_lesions_survive_the_min_max_normalisation():
    """M3D's preprocessing divides by each volume's own range, which erased a phase shown by brightness alone when
    the organ was the brightest structure; the spine anchors the range, so body, aorta and organ keep their levels,
    and a small lesion in the smallest organ still covers a few hundred voxels of the 32x64x64 model input."""
    import dataclasses

    from med3dvlm.data.synthetic import ORGANS, render_volume, sample_case
    from med3dvlm.data.transform import resize_trilinear

    case = dataclasses.replace(sample_case(0, seed=0), organ="kidney", lesion=False)
    aorta, body = [], []
    for phase in ("non_contrast", "portal_venous", "arterial"):
        v = render_volume(case, phase, (40, 48, 64), seed=0)
        v = (v - v.min()) / (v.max() - v.min())  # M3D's min-max step
        aorta.append(float(v[20, 30, 35]))  # the aorta's centre: y 0.62, x 0.55 of the box
        body.append(float(np.median(v[v > 0])))
    assert aorta[0] + 0.2 < aorta[1] and aorta[1] + 0.2 < aorta[2]
    assert max(body) - min(body) < 0.02
    for organ in ORGANS:
        small = dataclasses.replace(case, organ=organ, lesion=True, size="small", density="hypodense")
        diff = [resize_trilinear(render_volume(c, "portal_venous", (40, 48, 64), seed=0), (32, 64, 64))
                for c in (small, dataclasses.replace(small, lesion=False))]
        assert (np.abs(diff[0] - diff[1]) > 0.2).sum() > 150, organ


def test_distinct_report_ranks_count_identical_reports_as_one_answer():
    from med3dvlm.eval.retrieval import distinct_report_ranks, rank_of_target

    ta, tb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    txt = torch.stack([ta, ta, tb])  # reports a, a, b: a text tower embeds identical texts identically
    img = txt.clone()  # every volume's embedding is its report's: a perfect model
    assert distinct_report_ranks(img, txt, ["a", "a", "b"]).tolist() == [1, 1, 1]
    assert rank_of_target(img @ txt.t()).tolist() == [1, 2, 1]  # M3D-Bench's diagonal rule: the identical text ranks ahead


def test_a_blind_models_distinct_report_recall_is_the_chance_the_demo_prints():
    from med3dvlm.eval.retrieval import distinct_report_ranks

    g = torch.Generator().manual_seed(1)
    reports = [f"report {i % 4}" for i in range(12)]
    base = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    txt = base[[i % 4 for i in range(12)]]
    hits = [float((distinct_report_ranks(torch.randn(12, 8, generator=g), txt, reports) <= 1).float().mean())
            for _ in range(400)]
    assert sum(hits) / len(hits) == pytest.approx(retrieval_chance(reports), abs=0.03)  # 1/4
