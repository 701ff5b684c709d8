"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, separate temp dirs and
resources): preprocessing and stage-1 training submitted with `ray job submit`, training workers placed on both nodes,
then one node stopped mid-training: the run resumes from its checkpoint on the remaining node and finishes.
Shards, checkpoints and the export live in a bucket (an S3-compatible server on localhost), as on a cluster whose
nodes share no disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, free_port
from med3dvlm import storage

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")



def _ports() -> list[str]:  # the test session's own Ray holds the default agent ports
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temps = [Path(f"/tmp/rn{os.getpid()}{i}") for i in ("h", "w")]
    common = ["--block", "--object-store-memory=400000000", "--disable-usage-stats"]
    head = subprocess.Popen([RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=3", '--resources={"node_head": 1}',
                             f"--temp-dir={temps[0]}", *_ports(), *common], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    for _ in range(60):
        if subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(1)
    worker = subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                               '--resources={"node_worker": 1}', f"--temp-dir={temps[1]}", *_ports(), *common],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield {"url": url, "env": env, "worker": worker, "gcs": gcs}
    for p in (worker, head):
        _stop(p)
    for t in temps:
        shutil.rmtree(t, ignore_errors=True)


def _stop(p: subprocess.Popen) -> None:
    """`ray start --block`'s whole process group (GCS, raylet, dashboard, workers, job drivers), killed: a graceful
    stop of a test cluster took 10-35 s of the suite, and its temp dirs are removed after."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(30)


def _ask(c, expr: str):
    """One figure from the cluster's state, asked by a short-lived driver (`expr` in terms of `ray`)."""
    code = f"import ray, json; ray.init(address='auto', logging_level='ERROR'); print(json.dumps({expr}))"
    r = subprocess.run([sys.executable, "-c", code], env={**c["env"], "RAY_ADDRESS": f"127.0.0.1:{c['gcs']}"},
                       capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def _alive_nodes(c) -> int:
    n = _ask(c, "sum(n['Alive'] for n in ray.nodes())")
    return -1 if n is None else n


def _wait_idle(c, timeout: float = 120) -> None:
    """Until every CPU of both nodes is free in the cluster's own view. SPREAD is a preference that Ray meets with
    the resources it believes free: right after a job, a node's report of released CPUs can lag, and both training
    workers then land on the other node (seen once in a full run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _ask(c, "ray.available_resources().get('CPU', 0) >= ray.cluster_resources().get('CPU', 0) == 5"):
            return
        time.sleep(1)
    raise AssertionError("the cluster did not come back to 5 free CPUs after preprocessing")


def _submit(c, args: list[str], wait: bool = True) -> str:
    sid = f"t{time.time_ns()}"
    cmd = [RAY, "job", "submit", "--address", c["url"], "--submission-id", sid, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "out", "bench/results"],
                                             "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", sys.executable, "-m", *args]
    for _ in range(10):  # the job agent comes up a little after the dashboard answers
        r = subprocess.run(cmd, env=c["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return sid


def _job(c, what: str, sid: str) -> str:
    out = subprocess.run([RAY, "job", what, "--address", c["url"], sid], env=c["env"], capture_output=True, text=True,
                         timeout=120).stdout
    return out.lower() if what == "status" else out


def _checkpoints(root: str) -> list[str]:
    """Checkpoints Ray Train has registered (its checkpoint-manager snapshot under <root>/<run>/), not merely begun
    uploading: a checkpoint_* folder appears in a bucket with its first object."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    out = []
    for r in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        snap = storage.join(root, r.base_name, "checkpoint_manager_snapshot.json")
        if r.type == pafs.FileType.Directory and storage.is_file(snap):
            latest = storage.read_json(snap).get("latest_checkpoint_result")
            if latest:
                out.append(str(latest))
    return out


def test_two_node_preprocess_train_and_survive_a_node_loss(cluster, synthetic_m3d, bucket):
    c = cluster
    for _ in range(60):
        if _alive_nodes(c) == 2:
            break
        time.sleep(1)
    assert _alive_nodes(c) == 2
    raw, _ = synthetic_m3d
    shards, out = bucket + "/shards", bucket + "/ckpt"
    sid = _submit(c, ["pipelines.preprocess", "--config", "tiny", "--raw", str(raw), "--out", shards,
                      "data.rows_per_shard=8"])
    assert "succeeded" in _job(c, "status", sid)
    assert storage.read_json(shards + "/manifest.json")["counts"]["rows"] > 0
    _wait_idle(c)
    overrides = [o for o in FAST if not o.startswith(("train.stage1.epochs", "train.max_failures"))]
    sid = _submit(c, ["pipelines.train", "--stage", "1", "--config", "tiny", "--shards", shards, "--out", out,
                      *overrides, "train.stage1.epochs=6", "train.checkpoint_every=2", "train.max_failures=3",
                      "train.placement_strategy=SPREAD", "train.cpus_per_worker=1"], wait=False)
    placement = out + "/stage1/placement.json"
    deadline = time.time() + 1200  # a bound on waiting, not a speed target: a busy 2-core CI machine is slow
    while time.time() < deadline and not _checkpoints(out + "/ray"):
        assert " failed" not in _job(c, "status", sid), _job(c, "logs", sid)[-3000:]
        time.sleep(1)
    first = storage.read_json(placement)[0]
    assert len(set(first["nodes"])) == 2, first  # one training worker on each node
    os.killpg(c["worker"].pid, signal.SIGKILL)  # stop the worker node mid-training
    while time.time() < deadline and "succeeded" not in (status := _job(c, "status", sid)):
        assert " failed" not in status and "stopped" not in status, _job(c, "logs", sid)  # whole: a rare failure's cause
        time.sleep(2)
    logs = _job(c, "logs", sid)
    assert "succeeded" in _job(c, "status", sid) and "[train] stage 1 done" in logs
    runs = storage.read_json(placement)
    assert len(runs) >= 2 and runs[-1]["start_step"] > 0  # restarted from a checkpoint, not from step 0
    assert len(set(runs[-1]["nodes"])) == 1 and runs[-1]["nodes"][0] in first["nodes"]  # on the remaining node
    history = storage.read_json(out + "/stage1/history.json")
    total = storage.read_json(out + "/stage1/run.json")["figures"]["last_step"] + 1
    assert history[-1]["step"] == total - 1 and storage.is_file(out + "/stage1/model.safetensors")
    assert _alive_nodes(c) == 1
