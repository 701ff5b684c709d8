"""Faults under load, injected for real: a Ray Train worker process SIGKILLed mid-epoch, and a killed driver whose
command is run again. Each run resumes from its last checkpoint and ends with the weights of an uninterrupted run
(`train.preserve_order`, no augmentation: the `tiny` preset's)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST, cfg_for

ROOT = Path(__file__).resolve().parents[1]
# precise BatchNorm off: it re-estimates the statistics from the last N batches a worker saw, and a restarted worker
# has seen only those since its restart (the checkpoint does not carry them)
SAME = ["train.precise_bn_batches=0", "train.checkpoint_every=2"]
STAGE1 = ["train.stage1.batch_size=2", *SAME]  # several steps an epoch, a checkpoint every 2


def _same_weights(a: str, b: str) -> None:
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    from med3dvlm.train.driver import train

    r = train(cfg_for(*STAGE1), 1, str(shards[0]), str(tmp_path_factory.mktemp("whole")), log=lambda *_: None)
    per_epoch = sum(h["epoch"] == 0 for h in r["history"])
    assert per_epoch >= 4 and len(r["history"]) >= 2 * per_epoch
    return r, per_epoch


def test_a_worker_killed_mid_epoch_resumes_to_the_same_weights_stage1_zero2(shards, uninterrupted, tmp_path):
    from med3dvlm.train.driver import train

    whole, per_epoch = uninterrupted
    kill = per_epoch + 3  # in the second epoch; the last checkpoint before it: after step per_epoch + 1 (even)
    r = train(cfg_for(*STAGE1, f"train.fail_at_step={kill}", "train.max_failures=1"), 1, str(shards[0]),
              str(tmp_path), log=lambda *_: None)
    h = r["history"]
    assert r["figures"]["restored_from_checkpoint"] and h[0]["step"] <= kill and h[0]["step"] % 2 == 0
    assert h[0]["step"] > per_epoch  # resumed mid-epoch: the epoch's consumed batches skipped
    assert [x["loss"] for x in h] == [x["loss"] for x in whole["history"][h[0]["step"]:]]
    _same_weights(r["export"], whole["export"])


def test_a_worker_killed_in_stage3_under_zero3_resumes_to_the_same_weights(chain, shards, tmp_path):
    from med3dvlm.train.driver import train

    base = ["train.zero_stage=3", "train.stage3.max_steps=8", "train.stage3.batch_size=2", *SAME]
    whole = train(cfg_for(*base), 3, str(shards[0]), str(tmp_path / "whole"), chain[2]["export"], log=lambda *_: None)
    r = train(cfg_for(*base, "train.fail_at_step=5", "train.max_failures=1"), 3, str(shards[0]),
              str(tmp_path / "killed"), chain[2]["export"], log=lambda *_: None)
    start = r["history"][0]["step"]  # after the last checkpoint registered before the kill: 4, or 2 if it lagged
    assert r["figures"]["restored_from_checkpoint"] and start in (2, 4)
    assert [x["loss"] for x in r["history"]] == [x["loss"] for x in whole["history"][start:]]
    _same_weights(r["export"], whole["export"])


def test_a_killed_driver_resumes_when_its_command_runs_again(ray_session, shards, uninterrupted, tmp_path):
    """`python -m pipelines.train` attached to this session's Ray, SIGKILLed once its run has a checkpoint; the
    same command again resumes that run and exports the uninterrupted run's weights."""
    whole, _ = uninterrupted
    cmd = [sys.executable, "-m", "pipelines.train", "--stage", "1", "--shards", str(shards[0]), "--out",
           str(tmp_path), *FAST, *STAGE1]
    # attached to this session's local Ray as to a cluster; without the preemption watcher a cluster run starts (a
    # local Ray has no node to drain: test_train's test_a_local_ray_starts_no_preemption_watcher)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while not list((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json")) and time.time() < deadline:
        assert first.poll() is None, "the first run ended before its first checkpoint"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from its last checkpoint" in again.stdout
    runs = [p for p in (tmp_path / "ray").iterdir() if p.is_dir()]
    assert len(runs) == 1  # the same run, not a second one beside it
    h = json.loads((tmp_path / "stage1" / "history.json").read_text())
    assert h[0]["step"] > 0
    _same_weights(str(tmp_path / "stage1"), whole["export"])


def _flip_a_volume_byte(path: Path, row_group: int = 0) -> None:
    """One bit of a stored volume changed in place, in the middle of its column chunk (as a disk might)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    c = meta.row_group(row_group).column(names.index("volume"))
    b = bytearray(path.read_bytes())
    b[(c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size // 2] ^= 0x10
    path.write_bytes(bytes(b))


def test_a_damaged_shard_stops_training_and_evaluation_with_one_line(chain, shards, tmp_path, capsys):
    from conftest import one_line_exit_2
    from pipelines.evaluate import main as evaluate
    from pipelines.train import main as train

    copy = tmp_path / "shards"
    shutil.copytree(shards[0], copy)
    flipped = sorted((copy / "volumes").glob("part-*.parquet"))[1]
    _flip_a_volume_byte(flipped)
    t = time.time()
    err = one_line_exit_2(capsys, lambda: train(["--stage", "1", "--shards", str(copy), "--out", str(tmp_path / "o"),
                                                 *FAST, "train.max_failures=0"]))
    assert f"{flipped}: row group 0" in err and "damaged" in err and time.time() - t < 120
    err = one_line_exit_2(capsys, lambda: evaluate(["--task", "retrieval", "--model", chain[1]["export"], "--shards",
                                                    str(copy), "--split", "train,validation,test", "--n", "4",
                                                    "--split-field", "case_split", "--allow-overlap",
                                                    "--out", str(tmp_path / "e")]))
    assert f"{flipped}: row group 0" in err
    # cut short: its footer is gone, met before any worker starts
    cut = sorted((copy / "volumes").glob("part-*.parquet"))[0]
    cut.write_bytes(cut.read_bytes()[:-3000])
    err = one_line_exit_2(capsys, lambda: train(["--stage", "1", "--shards", str(copy), "--out", str(tmp_path / "o"),
                                                 *FAST]))
    assert f"{cut}: its footer" in err


def test_serving_loses_no_answer_when_a_replica_of_each_deployment_is_killed(chain, shards):
    """bench/faults.py's harness, shorter: mixed requests from 8 clients while one Encoder, one Generator and one
    ingress replica are killed (`ray.kill`); a client that retries gets every answer, each the one the same request
    got before the faults, and every deployment is back to its count within a minute."""
    from ray import serve

    from conftest import free_port
    from med3dvlm.serve.app import build_app

    sys.path.insert(0, str(ROOT / "bench"))
    from faults import run_faults, upload_volumes

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    try:
        serve.run(build_app({"model": chain[3]["export"], "clip": chain[1]["export"], "index": str(shards[0]),
                             "ingress_replicas": 2, "replica_cpus": 0.1}), name="faults", route_prefix="/faults")
        base = f"http://127.0.0.1:{port}/faults"
        res = run_faults(base, "faults", upload_volumes(base, str(shards[0]), 2), True, n=60, kill_at=(2, 10, 18))
    finally:
        serve.shutdown()
    assert res["lost"] == 0 and res["wrong_answer"] == 0, res
    assert [k["deployment"] for k in res["kills"]] == ["Encoder", "Generator", "Api"]
    assert all(k["recovered"] and k["recovered_s"] < 60 for k in res["kills"]), res["kills"]
    assert res["requests"] >= 60 and res["latency_s"]["during"]["n"] > 0


def _complete(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError):
        return not path.exists()  # renamed away between the listing and the read


def test_a_killed_preprocessing_driver_leaves_no_partial_shard_and_its_rerun_is_byte_identical(
        ray_session, synthetic_m3d, tmp_path):
    """The driver SIGKILLed at three seeded random moments; a watcher reads every file under a final name while it
    runs (a partial one has no footer); each re-run ends with the uninterrupted run's bytes."""
    import random

    raw, _ = synthetic_m3d
    cmd = [sys.executable, "-m", "pipelines.preprocess", "--raw", str(raw), "--out", str(tmp_path / "out"),
           "data.rows_per_shard=16"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    rng, partial = random.Random(42), []
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + rng.uniform(2, 8)  # the whole command takes about 8 s here
        while time.time() < deadline and proc.poll() is None:
            partial += [p for p in (tmp_path / "out" / "volumes").glob("part-*.parquet") if not _complete(p)]
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not partial
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    whole = [*cmd[:-2], str(tmp_path / "whole"), cmd[-1]]  # the same command, uninterrupted, into a fresh folder
    subprocess.run(whole, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    want = sorted((tmp_path / "whole" / "volumes").glob("part-*.parquet"))
    got = sorted((tmp_path / "out" / "volumes").glob("part-*.parquet"))
    assert [p.name for p in got] == [p.name for p in want]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, want))


def test_a_full_disk_stops_preprocessing_with_one_line_and_keeps_the_manifest(ray_session, synthetic_m3d, shards,
                                                                              tmp_path, capsys):
    """Shards on a filesystem with no room for a rewrite (a tmpfs of the shards' size): one line, every file under a
    final name whole, manifest.json as it was."""
    from conftest import one_line_exit_2
    from pipelines.preprocess import main

    raw, _ = synthetic_m3d
    small = tmp_path / "small"
    small.mkdir()
    size = sum(p.stat().st_size for p in shards[0].rglob("*") if p.is_file()) + (256 << 10)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a small filesystem here (needs CAP_SYS_ADMIN)")
    try:
        shutil.copytree(shards[0], small / "out")
        before = (small / "out" / "manifest.json").read_bytes()
        err = one_line_exit_2(capsys, lambda: main(["--raw", str(raw), "--out", str(small / "out"),
                                                    "data.rows_per_shard=16", "data.window=[-100,200]"]))
        assert "cannot write: " in err and "No space left on device" in err and "part-" in err
        assert (small / "out" / "manifest.json").read_bytes() == before
        assert all(_complete(p) for p in (small / "out" / "volumes").glob("part-*.parquet"))
        assert not [p for p in (small / "out" / "volumes").iterdir() if not p.name.startswith("part-")]
    finally:
        subprocess.run(["umount", str(small)])
