"""What a model that never looks at its image would score, and how sure a figure is at small n.

- the shuffled-image control: the same model on the same questions/reports, each paired with another sample's volume
  (a rotation by half the set, so series of one case, which lie together in the shards, never meet their own case);
  a model that ignores the image scores the same with and without it
- closed VQA: chance (one of four) and the per-type majority answer on the same questions
- retrieval: chance as a uniform pick among the distinct reports present (1/d, never below the 1/n that a random
  ranking reaches under the benchmark's diagonal rule)
- reports: always answering the most common training report
- intervals: Wilson for a proportion, a percentile bootstrap for a mean
"""

from __future__ import annotations

import math
from collections import Counter


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(rows: list, stat, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of `stat(rows)` over resamples of rows."""
    import numpy as np

    if not rows:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    vals = sorted(stat([rows[i] for i in rng.integers(0, len(rows), len(rows))]) for _ in range(n_boot))
    return (float(vals[int(0.025 * n_boot)]), float(vals[int(0.975 * n_boot) - 1]))


def rotation(n: int) -> list[int]:
    """Sample i takes the volume of sample (i + n//2) mod n: a derangement for n >= 2."""
    return [(i + n // 2) % n for i in range(n)]


def mean_of_types(rows: list[dict], rule: str) -> float:
    """The benchmark's closed-VQA figure: accuracy per question type, averaged over types."""
    from med3dvlm.eval.vqa import by_type

    groups = by_type(rows)
    return sum(sum(int(r[rule]) for r in sel) / len(sel) for sel in groups.values()) / max(len(groups), 1)


def majority_closed(rows: list[dict]) -> dict:
    """Answering every question of a type with that type's most frequent answer letter (on these same questions)."""
    from med3dvlm.eval.vqa import by_type

    per = {}
    for name, sel in by_type(rows).items():
        letter, count = Counter(r["answer_choice"] for r in sel).most_common(1)[0]
        per[name] = {"letter": letter, "accuracy": count / len(sel)}
    return {"per_type": per, "mean": sum(v["accuracy"] for v in per.values()) / max(len(per), 1)}


def closed_baselines(rows: list[dict]) -> dict:
    """Chance, majority and intervals of both rules' mean-of-types accuracy."""
    return {"chance": 0.25, "majority": majority_closed(rows),
            "interval": {rule: bootstrap(rows, lambda s, r=rule: mean_of_types(s, r)) for rule in ("lenient", "strict")}}


def retrieval_chance(reports: list[str]) -> float:
    """R@1 of a uniform pick among the distinct reports present."""
    return 1 / max(len(set(reports)), 1)


def most_common(texts: list[str]) -> str:
    return Counter(t.strip() for t in texts if t and t.strip()).most_common(1)[0][0] if texts else ""


def mean_intervals(rows: list[dict], metrics: list[str]) -> dict:
    """Bootstrap intervals of each metric's mean over the rows."""
    return {m: bootstrap(rows, lambda s, m=m: sum(float(r[m]) for r in s) / len(s)) for m in metrics}


def report_baselines(rows: list[dict], train_reports: list[str], metrics: list[str]) -> dict:
    """Intervals of the mean scores, and the scores of always answering the most common training report."""
    from med3dvlm.eval.text import text_scores

    common = most_common(train_reports)
    scored = [text_scores(common, r["reference"]) for r in rows]
    return {"interval": mean_intervals(rows, metrics),
            "most_common_report": {"text": common, **{m: sum(s[m] for s in scored) / max(len(scored), 1)
                                                      for m in ("bleu", "rouge1", "meteor")}}}
