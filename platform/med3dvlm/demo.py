"""The whole pipeline on a local Ray at the `tiny` config: synthetic M3D data -> preprocessing -> stages 1, 2, 3
(2 workers, DeepSpeed ZeRO-2, CPU) -> a held-out check -> a summary table. `make demo` runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from med3dvlm.runtime import init_ray, write_run_json


def heldout(shards: str, stage1: str, stage3: str, out: Path) -> dict:
    """Evaluation on the leak-free validation+test cases: retrieval (stage 1), closed VQA and reports (stage 3)."""
    from med3dvlm.eval.runner import EvalConfig, evaluate

    common = {"shards": shards, "split": "validation,test", "split_field": "case_split"}
    quiet = lambda *_: None  # noqa: E731
    return {task: evaluate(EvalConfig(task=task, model=model, out=str(out / task), **common, **extra), quiet)
            for task, model, extra in (("retrieval", stage1, {}), ("vqa-closed", stage3, {"max_new_tokens": 16}),
                                       ("report", stage3, {"max_new_tokens": 96}))}


def table(check: dict) -> tuple[list[tuple], bool]:
    """The summary rows (name, value, chance, target) and whether both targets are met."""
    ret, vqa, rep = check["retrieval"], check["vqa-closed"]["metrics"], check["report"]["metrics"]
    n = ret["n"]
    r = next(iter(ret["metrics"].values()))
    rows = [
        ("image-to-text retrieval R@1", r["image_to_text_R@1"], 1 / n, 3 / n),
        ("text-to-image retrieval R@1", r["text_to_image_R@1"], 1 / n, None),
        ("closed VQA accuracy (lenient, mean of types)", vqa["lenient"]["mean"], 0.25, 0.45),
        ("closed VQA accuracy (strict first choice)", vqa["strict"]["mean"], 0.25, None),
        ("report METEOR", rep["meteor"], None, None),
        ("report ROUGE-1", rep["rouge1"], None, None),
    ]
    return rows, bool(r["image_to_text_R@1"] >= 3 / n and vqa["lenient"]["mean"] >= 0.45)


def print_table(check: dict, rows: list[tuple], seconds: float, log) -> None:
    vqa = check["vqa-closed"]["metrics"]
    log(f"\n[demo] held-out check (pipelines.evaluate) on {check['retrieval']['n']} volumes of unseen cases "
        f"({vqa['n']} closed questions), {seconds:.0f} s")
    log(f"| {'metric':<46} | value | chance | target |\n|{'-' * 48}|------:|-------:|-------:|")
    for name, v, chance, target in rows:
        log(f"| {name:<46} | {100 * v:5.1f} | {'' if chance is None else f'{100 * chance:.1f}':>6} | "
            f"{'' if target is None else f'>= {100 * target:.0f}':>6} |")
    log("\nper question type (lenient): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in vqa["lenient"]["per_type"].items()))


def run_demo(cfg, out: str | Path = "out/demo", cases: int = 100, shuffle_choices: bool = False, log=print) -> dict:
    from med3dvlm.data.preprocess import preprocess, summary
    from med3dvlm.data.synthetic import write_m3d_tree
    from med3dvlm.train.driver import train

    started, out = time.time(), Path(out)
    counts = write_m3d_tree(out / "raw", cases=cases, seed=0, bad=True, shuffle_choices=shuffle_choices)
    log(f"[demo] synthetic M3D tree: {counts['volumes']} volumes of {counts['cases']} cases, {counts['qa']} questions, "
        f"{counts['planted_bad']} planted bad inputs ({time.time() - started:.0f} s)")
    init_ray()
    log("\n".join(summary(preprocess(cfg, out / "raw", out / "shards", log)).splitlines()[:4]))
    exports, figures = {}, {}
    for stage in (1, 2, 3):
        r = train(cfg, stage, str(out / "shards"), str(out / "ckpt"), exports.get(stage - 1), log)
        exports[stage], figures[f"stage{stage}"] = r["export"], r["figures"]
    t = time.time()
    check = heldout(str(out / "shards"), exports[1], exports[3], out / "eval")
    rows, passed = table(check)
    print_table(check, rows, time.time() - t, log)
    for stage in (1, 2, 3):
        f = figures[f"stage{stage}"]
        log(f"[demo] stage {stage}: loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}, {f['samples_per_s']:.1f} "
            f"samples/s, data wait {100 * f['data_wait_fraction']:.0f}%  -> {exports[stage]}")
    result = {"heldout": check, "train": figures, "exports": exports, "shards": str(out / "shards"), "passed": passed,
              "evaluation": {k: v["out"] for k, v in check.items()}}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    write_run_json(out, cfg, {"cases": cases}, {"r1": rows[0][1], "closed_vqa": rows[2][1], "n": check["retrieval"]["n"]},
                   started)
    log(f"[demo] done in {time.time() - started:.0f} s; summary {out / 'summary.json'}; "
        f"{'learned: both targets met' if passed else 'targets NOT met'}")
    return result
