"""The README's serving quick start, run as written: its own `serve run` command line, in a fresh local Ray on this
machine's cores (2 on the project's CI box), must come up and answer."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def readme_serve_command() -> list[str]:
    """The first `serve run med3dvlm.serve.app:build_app ...` line of the README's Serving section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):]
    line = re.search(r"^serve run med3dvlm\.serve\.app:build_app .*$", section, re.M).group(0)
    return shlex.split(line.split("#")[0])


def test_readme_serving_command_comes_up(chain, shards, tmp_path):
    cmd = readme_serve_command()
    # the README's relative paths, as `make demo` leaves them, point at this session's trained chain
    links = {"out/demo/ckpt/stage3": chain[3]["export"], "out/demo/ckpt/stage1": chain[1]["export"],
             "out/demo/shards": str(shards[0])}
    for rel, target in links.items():
        assert rel in " ".join(cmd), f"the README's command no longer names {rel}; update this test"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_TMPDIR"}
    for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the app must apply its own defaults
        env.pop(k, None)
    env["HOME"] = str(tmp_path / "home")  # nothing may be written into the user's home (Ray's auth token file)
    serve_bin = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen([str(serve_bin)] + cmd[1:], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started, up = time.monotonic(), None
    try:
        while time.monotonic() - started < 240 and proc.poll() is None:
            try:
                h = requests.get("http://127.0.0.1:8000/healthz", timeout=5)
                if h.status_code == 200:
                    up = time.monotonic() - started
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        assert up is not None, f"not up after {time.monotonic() - started:.0f} s; exit {proc.poll()}" + (
            "" if proc.poll() is None else ": " + proc.stdout.read()[-3000:])
        assert h.json()["retrieval"] is True
        r = requests.post("http://127.0.0.1:8000/v1/retrieve", data={"text": "liver lesion", "k": "2"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        print(f"README serving command up in {up:.0f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
    assert "Resources required for each replica" not in out, out[-3000:]
    assert not (tmp_path / "home" / ".ray").exists() or not any((tmp_path / "home" / ".ray").rglob("*token*"))
