"""The three training stages on Ray Train + DeepSpeed ZeRO (2 CPU workers, gloo), resume, export, bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from med3dvlm.config import load_config
from pipelines.common import UserError
from pipelines.train import train

from conftest import FAST, cfg_for


def _ds_module_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_and_its_loss_falls(chain, stage):
    r = chain[stage]
    h = r["history"]
    assert len(h) == h[-1]["step"] + 1 and h[0]["step"] == 0
    assert r["figures"]["loss_last"] < r["figures"]["loss_first"]
    assert all(k in h[0] for k in ("lr", "samples_per_s", "data_wait_s", "compute_s"))
    if stage == 1:
        assert "t" in h[0] and "b" in h[0] and h[-1]["b"] != h[0]["b"]
    run = json.loads((Path(r["export"]) / "run.json").read_text())
    assert run["figures"]["steps"] == len(h) and (Path(r["export"]) / "curves.png").stat().st_size > 0


def test_export_equals_the_trained_weights_and_reloads(chain):
    from safetensors.torch import load_file

    from med3dvlm.models.clip import CLIPModel
    from med3dvlm.models.vlm import VLM

    cfg, r1, _, r3 = chain
    for r, cls in ((r1, CLIPModel), (r3, VLM)):
        exported = load_file(Path(r["export"]) / "model.safetensors")
        trained = _ds_module_state(r["checkpoint"])
        assert set(trained) <= set(exported)
        assert all(torch.equal(trained[k].float(), exported[k].float()) for k in trained)
        model = cls.from_pretrained(r["export"])
        assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    # the stage-3 export carries its LoRA adapters and generates
    vlm = VLM.from_pretrained(r3["export"]).eval()
    assert vlm.lora and vlm.generate(torch.rand(1, 1, *cfg.data.shape), [" Which organ?"], max_new_tokens=3)[0] is not None


def test_stage1_under_zero3(shards, tmp_path):
    r = train(cfg_for("train.zero_stage=3"), 1, str(shards[0]), str(tmp_path), log=lambda *_: None)
    assert r["figures"]["loss_last"] < r["figures"]["loss_first"]
    from med3dvlm.models.clip import CLIPModel

    m = CLIPModel.from_pretrained(r["export"])
    assert all(v.numel() > 0 for v in m.state_dict().values())  # gathered, not ZeRO-3 placeholders


def test_worker_failure_resumes_from_the_last_checkpoint(shards, tmp_path):
    cfg = cfg_for("train.fail_at_step=4", "train.checkpoint_every=2", "train.max_failures=1", "train.stage1.epochs=3")
    r = train(cfg, 1, str(shards[0]), str(tmp_path), log=lambda *_: None)
    h = r["history"]
    # the restarted worker began after the last checkpoint (step 3 saved at step index 3) and finished every step
    assert r["figures"]["restored_from_checkpoint"] and h[0]["step"] == 4
    total = json.loads((Path(r["export"]) / "run.json").read_text())["figures"]["last_step"] + 1
    assert h[-1]["step"] == total - 1 and total >= 6


def test_bad_input_fails_before_any_worker_starts(shards, tmp_path, chain):
    cfg = cfg_for()
    s = str(shards[0])
    cases = [
        (lambda: train(cfg, 1, str(tmp_path / "nothing"), str(tmp_path)), "no shards there"),
        (lambda: train(cfg, 2, s, str(tmp_path)), "pass --init"),
        (lambda: train(cfg, 3, s, str(tmp_path), chain[1]["export"]), "needs the export of stage 2"),
        (lambda: train(cfg, 2, s, str(tmp_path), str(tmp_path)), "not an exported model directory"),
        (lambda: train(load_config("tiny", ["data.shape=[16,64,64]"]), 1, s, str(tmp_path)), "shape"),
        (lambda: train(cfg_for("train.num_workers=64"), 1, s, str(tmp_path)), "CPUs"),
        (lambda: train(cfg_for("model.text_encoder=/no/such/model"), 1, s, str(tmp_path)), "does not exist"),
    ]
    for fn, words in cases:
        t = time.time()
        with pytest.raises(UserError, match=words):
            fn()
        assert time.time() - t < 10


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_ray_job_submit_runs_stage1(shards, tmp_path):
    """`ray start --head`, then `ray job submit ... -- python -m pipelines.train --stage 1` and its logs."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # the test session's own Ray holds the default agent ports: give this head free ones
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    temp = Path(f"/tmp/rj{os.getpid()}")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", *ports, "--num-cpus=4", "--object-store-memory=500000000",
                             f"--temp-dir={temp}", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{dash}"
        for _ in range(60):
            if subprocess.run([ray_bin, "job", "list", "--address", url], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        repo = Path(__file__).resolve().parents[1]
        out = tmp_path / "job"
        cmd = [ray_bin, "job", "submit", "--address", url, "--working-dir", str(repo),
               "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "out", "bench/results"],
                                                 "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}}),
               "--", sys.executable, "-m", "pipelines.train", "--stage", "1", "--config", "tiny",
               "--shards", str(shards[0]), "--out", str(out), *FAST]
        for _ in range(10):  # the head's job agent comes up a little after the dashboard answers
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "[train] stage 1 done" in job.stdout and "succeeded" in job.stdout
        assert (out / "stage1" / "model.safetensors").is_file()
    finally:
        import signal

        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)
