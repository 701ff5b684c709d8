"""Bench scripts write their own results with what reproduces them (date, machine, commit, command): each run here at
its smallest size into a temporary file."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_feature_cache_bench_writes_its_provenance(tmp_path):
    out = tmp_path / "feature_cache.md"
    subprocess.run([sys.executable, "bench/feature_cache.py", "--tiny", "--volumes", "1", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    text = out.read_text()
    for field in ("- date: ", "- machine: ", "- commit: ", "- command: `"):
        assert field in text
    assert "--tiny" in text and "tiny-config ratio" in text
    assert "| projector parameters (LLM width 3584, 256 tokens) |" in text


def test_eval_bench_writes_its_provenance(tmp_path):
    import json

    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "bench/eval.py", "--samples", "2", "--new-tokens", "2", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert {"date", "machine", "commit", "command"} <= set(res) and "bench/eval.py" in res["command"]
    assert [r["batch"] for r in res["generation"]] == [1, 4, 16] and res["metrics"]


def provenance_fields(text: str) -> None:
    for field in ("- date: ", "- machine: ", "- commit: ", "- command: `"):
        assert field in text, field


def test_fuzz_bench_counts_every_example_by_outcome(tmp_path):
    """Three campaigns at 5 examples each: every example counted under an outcome, none a crash."""
    import re

    out = tmp_path / "fuzz.md"
    r = subprocess.run([sys.executable, "bench/fuzz.py", "--examples", "5", "--results", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    text = out.read_text()
    provenance_fields(text)
    counts = collections_by_campaign(text)
    assert set(counts) == {"uploads", "configs", "trees"} and all(sum(c.values()) >= 1 for c in counts.values())
    assert r.returncode == 0 and "crash" not in text, text
    assert re.search(r"refused on one line: \*\*0\*\*", text)


def collections_by_campaign(text: str) -> dict:
    out: dict = {}
    for campaign, _, outcome, n in (row.strip("|").split("|") for row in text.splitlines()
                                    if row.startswith("| ") and row.count("|") == 5 and "campaign" not in row):
        out.setdefault(campaign.strip(), {})[outcome.strip()] = int(n)
    return out


def test_lone_step_bench_names_its_baseline(tmp_path):
    """At a tiny shape (labelled as tiny): one fp32 row with the reference's rate read from vs_reference.json."""
    out = tmp_path / "lone_step.md"
    subprocess.run([sys.executable, "bench/lone_step.py", "--shape", "8", "32", "32", "--steps", "1", "--warmup", "0",
                    "--tokens", "16", "--precision", "fp32", "--results", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    text = out.read_text()
    provenance_fields(text)
    assert "| fp32 |" in text and "vs_train_clip.py" in text and "A tiny-config run" in text


def test_scale_bench_writes_its_rows_and_their_markdown(tmp_path):
    """The machinery at 20 series: the JSON row carries what it wrote (not what it was asked) and its provenance; the
    markdown beside it renders that row."""
    import json

    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, "bench/scale.py", "--series", "20", "--qa", "30", "--first-only", "--work",
                    str(tmp_path / "work"), "--results", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    row = json.loads(out.read_text())["at_20_series"]
    assert {"date", "machine", "commit", "command"} <= set(row) and row["qa_rows_written"] == 30
    assert row["first_run"]["volumes"] == 20
    text = out.with_suffix(".md").read_text()
    provenance_fields(text)
    assert "### 20 series, 30 VQA rows" in text and "| first run |" in text


def test_preprocess_bench_writes_its_table(tmp_path):
    out = tmp_path / "preprocess.md"
    subprocess.run([sys.executable, "bench/preprocess.py", "--volumes", "2", "--shape", "8", "32", "32", "--results",
                    str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    text = out.read_text()
    provenance_fields(text)
    assert "not the reference script" in text and "reading and decoding the slices alone" in text


def test_data_feed_bench_writes_json_and_markdown(tmp_path):
    import json

    out = tmp_path / "data_feed.json"
    subprocess.run([sys.executable, "bench/data_feed.py", "--volumes", "16", "--shape", "8", "32", "32", "--batches",
                    "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert {"date", "machine", "commit", "command"} <= set(res) and [r["stage"] for r in res["rows"]] == [1, 2]
    text = out.with_suffix(".md").read_text()
    provenance_fields(text)
    assert "| 1 |" in text and "| 2 |" in text


def test_encoder_and_allocator_benches_write_their_tables(tmp_path):
    """At a tiny shape (the figures mean nothing there; the files' fields and rows are what is checked)."""
    # the smallest shapes whose deepest DCFormer stage keeps more than one value per channel for BatchNorm
    for script, extra, row in (("encoder.py", ["--shape", "32", "128", "128", "--steps", "1", "--vit-steps", "1"],
                                "| 3D ViT (M3D-LaMed) |"),
                               ("allocator.py", ["--shape", "32", "64", "64", "--steps", "1", "--batch", "2"],
                                "| glibc defaults |")):
        out = tmp_path / script.replace(".py", ".md")
        subprocess.run([sys.executable, f"bench/{script}", *extra, "--results", str(out)], cwd=ROOT, check=True,
                       capture_output=True, timeout=300)
        text = out.read_text()
        provenance_fields(text)
        assert row in text, text


def test_train_bench_at_its_smallest(tmp_path):
    """The tiny config, one step per stage, through Ray Train and DeepSpeed as the full bench runs them."""
    import json

    out = tmp_path / "train.json"
    subprocess.run([sys.executable, "bench/train.py", "--steps", "1", "--cases", "24", "--configs", "tiny", "--out",
                    str(out)], cwd=ROOT, check=True, capture_output=True, timeout=900)
    res = json.loads(out.read_text())
    assert {"date", "machine", "commit", "command"} <= set(res) and [r["stage"] for r in res["rows"]] == [1, 2, 3]
    provenance_fields(out.with_suffix(".md").read_text())


def test_gpu_stages_smoke_run_and_its_report(tmp_path):
    """`--smoke` (tiny shapes on this CPU) writes its JSON with its date and command; `--report` renders the folder."""
    import json
    import os

    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run([sys.executable, "bench/gpu_stages.py", "--smoke"], cwd=ROOT, check=True, capture_output=True,
                   timeout=600, env=env)
    res = json.loads((tmp_path / "gpu_stages_smoke.json").read_text())
    assert {"date", "command"} <= set(res) and {r["stage"] for r in res["rows"]} == {1, 3}
    subprocess.run([sys.executable, "bench/gpu_stages.py", "--report"], cwd=ROOT, check=True, capture_output=True,
                   timeout=120, env=env)
    text = (tmp_path / "gpu.md").read_text()
    provenance_fields(text)
    assert "### gpu_stages_smoke.json" in text and "--smoke" in text
