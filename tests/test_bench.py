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
