"""A cluster user's first hour: the commands they type with a wrong folder, model or bucket stop with one line and
exit 2 before anything starts (no Ray, no worker), never a traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import one_line_exit_2

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: the refusal must come before it."""
    def refuse(*_, **__):
        raise AssertionError("Ray was started before the input was checked")

    for module in ("med3dvlm.train.driver", "med3dvlm.eval.runner"):
        monkeypatch.setattr(f"{module}.init_ray", refuse)


def test_evaluate_with_a_missing_bertscore_model(tmp_path, capsys, no_ray):
    from pipelines.evaluate import main

    err = one_line_exit_2(capsys, lambda: main(["--task", "report", "--model", str(tmp_path), "--shards", str(tmp_path),
                                                "--bertscore-model", str(tmp_path / "roberta-large")]))
    assert "--bertscore-model" in err and "roberta-large" in err


def test_training_from_an_unreachable_bucket(tmp_path, capsys, no_ray):
    from pipelines.train import main

    bucket = "s3://no-bucket/shards?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens there
    t = time.time()
    err = one_line_exit_2(capsys, lambda: main(["--stage", "1", "--shards", bucket, "--out", str(tmp_path)]))
    assert "s3://no-bucket/shards" in err and "cannot be read" in err
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


# ------------------------------------------------------------------------------------------------ token auth
def _readme_job_script(dashboard: str, modules: int = 99) -> str:
    """The README's job-submission block as a script: its exports and `J=` as written (the head's address put in
    for HEAD), each `$J python -m MODULE ...` line once per module (the first `modules`), `--help` for its arguments."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in text.split("```bash")[1:] if "export RAY_AUTH_MODE=token" in b).split("```")[0]
    lines, seen = [], set()
    for line in block.strip().splitlines():
        if line.startswith(("export ", "J=")):
            lines.append(line.replace("HEAD:8265", dashboard))
        elif line.startswith("$J python -m "):
            module = line.split()[3]
            if module not in seen:
                seen.add(module)
                lines += [f"$J python -m {module} --help"] if len(seen) <= modules else []
    assert len(seen) >= 4 and any("RAY_AUTH_TOKEN" in x for x in lines), lines
    return "set -e\n" + "\n".join(lines) + "\n"


def _head(tmp_path, name: str, auth: bool):
    """A local Ray head (`ray start --head --block`) in a home of its own with a token in ~/.ray/auth_token (as any
    local `ray.init()` leaves one); with `auth`, RAY_AUTH_MODE=token as the cluster configs start it, else Ray's
    defaults (which, with that file there, ask for the token too)."""
    from conftest import free_port

    home = tmp_path / name
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    dash = free_port()
    ports = [f"--{k}={free_port()}" for k in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                             "object-manager-port")]
    head_env = {**env, "RAY_AUTH_MODE": "token"} if auth else env
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--dashboard-port={dash}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--temp-dir=/tmp/rtok{os.getpid()}{name}",
                             "--disable-usage-stats", "--object-store-memory=200000000", *ports],
                            env=head_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, token = f"http://127.0.0.1:{dash}", (home / ".ray" / "auth_token").read_text().strip()
    client = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # answered by a head with or without auth
    for _ in range(90):
        if subprocess.run(["ray", "job", "list", "--address", url], env=client, capture_output=True).returncode == 0:
            break
        time.sleep(1)
    return proc, env, f"127.0.0.1:{dash}"


@pytest.mark.ray
@pytest.mark.own_ray
def test_the_readme_job_lines_reach_a_head_with_token_auth_and_one_with_rays_defaults(tmp_path):
    """The README's exports and `J=` as written, and its `$J python -m ...` lines with `--help`, through a head with
    token auth and a head started with Ray's defaults."""
    import shutil
    import signal

    for name, auth in (("token", True), ("defaults", False)):
        proc, env, dash = _head(tmp_path, name, auth)
        try:
            # both heads ask for the token: without the README's exports a submission is refused
            r = subprocess.run(["ray", "job", "submit", "--address", f"http://{dash}", "--", "true"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower(), (name, r.stderr[-1500:])
            n = 4 if auth else 1  # every module's line through the token head, one through the defaults head
            r = subprocess.run(["bash", "-c", _readme_job_script(dash, n)], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, (name, (r.stdout + r.stderr)[-3000:])
            assert r.stdout.count("succeeded") == n and "usage: " in r.stdout, r.stdout[-2000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            shutil.rmtree(f"/tmp/rtok{os.getpid()}{name}", ignore_errors=True)
