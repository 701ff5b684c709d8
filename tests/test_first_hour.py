"""A cluster user's first hour: the commands they type with a wrong folder, model or bucket stop with one line and
exit 2 before anything starts (no Ray, no worker), never a traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.common import run_main

ROOT = Path(__file__).resolve().parents[1]


def one_line_exit_2(capsys, fn) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(fn)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_to_released_from_a_missing_or_foreign_folder(tmp_path, capsys):
    from pipelines.import_released import main

    err = one_line_exit_2(capsys, lambda: main(["--to-released", "--checkpoint", str(tmp_path / "nope"),
                                                "--out", str(tmp_path / "o")]))
    assert str(tmp_path / "nope") in err and "no config.json" in err
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"kind": "med3dvlm-clip", "model": {}}')
    err = one_line_exit_2(capsys, lambda: main(["--to-released", "--checkpoint", str(tmp_path / "clip"),
                                                "--out", str(tmp_path / "o")]))
    assert "stage-2/3 export" in err
    assert not (tmp_path / "o").exists()


def test_evaluate_with_a_missing_bertscore_model(tmp_path, capsys):
    import ray

    from pipelines.evaluate import main

    err = one_line_exit_2(capsys, lambda: main(["--task", "report", "--model", str(tmp_path), "--shards", str(tmp_path),
                                                "--bertscore-model", str(tmp_path / "roberta-large")]))
    assert "--bertscore-model" in err and "roberta-large" in err and not ray.is_initialized()


def test_training_from_an_unreachable_bucket(tmp_path, capsys):
    import ray

    from pipelines.train import main

    bucket = "s3://no-bucket/shards?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens there
    t = time.time()
    err = one_line_exit_2(capsys, lambda: main(["--stage", "1", "--shards", bucket, "--out", str(tmp_path)]))
    assert "s3://no-bucket/shards" in err and "cannot be read" in err and not ray.is_initialized()
    assert time.time() - t < 60
    err = one_line_exit_2(capsys, lambda: main(["--stage", "1", "--shards", "s3://b/x?colour=red", "--out", str(tmp_path)]))
    assert "s3://b/x" in err and "colour" in err


def test_serve_run_with_a_missing_model_folder(tmp_path):
    """`serve run` calls the builder before it starts Ray: its refusal is one line and exit 2."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'platform'}", "RAY_ADDRESS": ""}
    serve_cli = Path(sys.executable).parent / "serve"
    r = subprocess.run([str(serve_cli), "run", "serve.app:build_app", f"model={tmp_path / 'nope'}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0] and "no config.json" in lines[0], r.stderr[-2000:]
