"""The whole pipeline on a local Ray at the `tiny` config: synthetic M3D data -> preprocessing -> stages 1, 2, 3
(2 workers, DeepSpeed ZeRO-2, CPU) -> a held-out check -> a summary table. `make demo` runs it.

    python -m pipelines.demo [--out out/demo] [--cases 100] [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipelines.common import config_from_args, init_ray, parser, run_main, write_run_json


def heldout(shards: str, stage1: str, stage3: str, out: Path) -> dict:
    """`pipelines.evaluate` on the leak-free validation+test cases: retrieval (stage 1), closed VQA and reports (stage 3)."""
    from pipelines.evaluate import evaluate, parse_args

    common = ["--shards", shards, "--split", "validation,test", "--split-field", "case_split"]
    quiet = lambda *_: None  # noqa: E731
    res = {task: evaluate(parse_args(["--task", task, "--model", model, "--out", str(out / task), *common, *extra]), quiet)
           for task, model, extra in (("retrieval", stage1, []), ("vqa-closed", stage3, ["--max-new-tokens", "16"]),
                                      ("report", stage3, ["--max-new-tokens", "96"]))}
    return res


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--shuffle-choices", action="store_true",
                   help="shuffle closed-VQA choices as M3D does (default: a fixed order per question type)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    started = time.time()
    out = Path(args.out)
    from med3dvlm.data.synthetic import write_m3d_tree
    from pipelines.preprocess import preprocess, summary
    from pipelines.train import train

    t = time.time()
    counts = write_m3d_tree(out / "raw", cases=args.cases, seed=0, bad=True, shuffle_choices=args.shuffle_choices)
    print(f"[demo] synthetic M3D tree: {counts['volumes']} volumes of {counts['cases']} cases, {counts['qa']} questions, "
          f"{counts['planted_bad']} planted bad inputs ({time.time() - t:.0f} s)")
    init_ray()
    manifest = preprocess(cfg, out / "raw", out / "shards")
    print(summary(manifest).split("\n  quarantined:")[0])
    exports, figures = {}, {}
    for stage in (1, 2, 3):
        r = train(cfg, stage, str(out / "shards"), str(out / "ckpt"), exports.get(stage - 1))
        exports[stage], figures[f"stage{stage}"] = r["export"], r["figures"]
    t = time.time()
    check = heldout(str(out / "shards"), exports[1], exports[3], out / "eval")
    ret = check["retrieval"]
    n = ret["n"]
    r = next(iter(ret["metrics"].values()))
    r1 = r["image_to_text_R@1"]
    vqa = check["vqa-closed"]["metrics"]
    rep = check["report"]["metrics"]
    rows = [
        ("image-to-text retrieval R@1", r1, 1 / n, 3 / n),
        ("text-to-image retrieval R@1", r["text_to_image_R@1"], 1 / n, None),
        ("closed VQA accuracy (lenient, mean of types)", vqa["lenient"]["mean"], 0.25, 0.45),
        ("closed VQA accuracy (strict first choice)", vqa["strict"]["mean"], 0.25, None),
        ("report METEOR", rep["meteor"], None, None),
        ("report ROUGE-1", rep["rouge1"], None, None),
    ]
    print(f"\n[demo] held-out check (pipelines.evaluate) on {n} volumes of unseen cases ({vqa['n']} closed questions), "
          f"{time.time() - t:.0f} s")
    print(f"| {'metric':<46} | value | chance | target |\n|{'-' * 48}|------:|-------:|-------:|")
    for name, v, chance, target in rows:
        print(f"| {name:<46} | {100 * v:5.1f} | {'' if chance is None else f'{100 * chance:.1f}':>6} | "
              f"{'' if target is None else f'>= {100 * target:.0f}':>6} |")
    print("\nper question type (lenient): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in vqa["lenient"]["per_type"].items()))
    for stage in (1, 2, 3):
        f = figures[f"stage{stage}"]
        print(f"[demo] stage {stage}: loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}, {f['samples_per_s']:.1f} samples/s, "
              f"data wait {100 * f['data_wait_fraction']:.0f}%  -> {exports[stage]}")
    result = {"heldout": check, "train": figures, "exports": exports, "shards": str(out / "shards"),
              "passed": bool(r1 >= 3 / n and vqa["lenient"]["mean"] >= 0.45),
              "evaluation": {k: v["out"] for k, v in check.items()}}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    write_run_json(out, cfg, {"cases": args.cases}, {"r1": r1, "closed_vqa": vqa["lenient"]["mean"], "n": n}, started)
    print(f"[demo] done in {time.time() - started:.0f} s; summary {out / 'summary.json'}; "
          f"{'learned: both targets met' if result['passed'] else 'targets NOT met'}")
    return result


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
