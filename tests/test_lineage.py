"""Lineage: every export names the shards and cases it trained on through its parents, and the evaluation refuses to
score a model on a case it (or a parent) trained on (M3D issue #38 was such a leak)."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from conftest import one_line_exit_2


def _cases(shards, field, splits):
    """Case ids of the rows whose `field` is in `splits`, read with pyarrow from the shard files themselves."""
    t = pq.read_table(sorted(str(p) for p in (shards / "volumes").glob("part-*.parquet")), columns=["case_id", field])
    return {c for c, s in zip(t.column(0).to_pylist(), t.column(1).to_pylist()) if s in splits}


def test_every_export_records_its_shards_cases_and_parents(chain, shards):
    from med3dvlm.runtime import sha256_json

    cfg = chain[0]
    stage3 = json.loads((Path(chain[3]["export"]) / "lineage.json").read_text())
    levels = []
    r = stage3
    while r:
        levels.append(r)
        r = r["parent"]
    assert [x["stage"] for x in levels] == [3, 2, 1]
    assert [x["parent_export"] for x in levels] == [chain[2]["export"], chain[1]["export"], None]
    manifest = json.loads((shards[0] / "manifest.json").read_text())
    train_cases = _cases(shards[0], cfg.train.split_field, {"train"})
    for x in levels:
        assert x["shards_manifest"] == sha256_json(manifest)
        assert set(x["case_ids"]) == train_cases and x["cases"] == len(train_cases)
        assert x["case_ids_sha256"] == hashlib.sha256("\n".join(sorted(train_cases)).encode()).hexdigest()
    run = json.loads((Path(chain[3]["export"]) / "run.json").read_text())
    assert [x["stage"] for x in run["inputs"]["lineage"]] == [3, 2, 1]
    assert "case_ids" not in run["inputs"]["lineage"][0]


def test_evaluation_refuses_a_case_the_model_trained_on(chain, shards, tmp_path, capsys):
    from pipelines.evaluate import main

    # the chain trained on case_split's training cases; the official split puts some of their volumes in test
    leaked = _cases(shards[0], "split", {"test"}) & _cases(shards[0], "case_split", {"train"})
    assert leaked
    args = ["--task", "vqa-closed", "--model", chain[3]["export"], "--shards", str(shards[0]), "--out", str(tmp_path)]
    err = one_line_exit_2(capsys, lambda: main(args))
    case = err.split("(e.g. case ")[1].split(")")[0]
    assert case in leaked and f"{len(leaked)} of the" in err and "--allow-overlap" in err


def test_overlap_allowed_is_written_beside_the_scores(chain, shards, tmp_path):
    from med3dvlm.eval.runner import evaluate
    from pipelines.evaluate import parse_args

    common = ["--model", chain[1]["export"], "--shards", str(shards[0]), "--n", "4"]
    res = evaluate(parse_args(["--task", "retrieval", *common, "--out", str(tmp_path / "a"), "--allow-overlap"]),
                   log=lambda *_: None)
    leaked = _cases(shards[0], "split", {"test"}) & _cases(shards[0], "case_split", {"train"})
    assert res["overlap"] == len(leaked) and res["warning"].startswith("NOT held out")
    assert (tmp_path / "a" / "results.md").read_text().startswith("**Warning: NOT held out")
    assert json.loads((tmp_path / "a" / "results.json").read_text())["lineage"][0]["stage"] == 1
    # the leak-free split: nothing shared, no warning
    res = evaluate(parse_args(["--task", "retrieval", *common, "--out", str(tmp_path / "b"), "--split-field",
                               "case_split"]), log=lambda *_: None)
    assert res["overlap"] == 0 and res["warning"] is None
    # an export without lineage (an import of the released weights): scored, with that said
    bare = tmp_path / "bare"
    shutil.copytree(chain[1]["export"], bare)
    (bare / "lineage.json").unlink()
    res = evaluate(parse_args(["--task", "retrieval", "--model", str(bare), "--shards", str(shards[0]), "--n", "4",
                               "--out", str(tmp_path / "c"), "--split-field", "case_split"]), log=lambda *_: None)
    assert "records no lineage" in res["warning"] and res["overlap"] is None
