"""The README cannot drift: every shell command in its code blocks names a make target, module, flag, config key,
Serve argument, HTTP route or file that exists, and each module's `--help` runs. (The serving command is run as
written by test_quickstart.py, the cluster block submitted to real Ray heads by test_first_hour.py.)"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[list[str]]:
    """Every command line of the README's ```bash blocks, continuations joined, comments dropped, split as a shell."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "$J":
                words = words[1:]
            if words:
                out.append(words)
    return out


def module_lines() -> dict[str, list[list[str]]]:
    mods: dict[str, list[list[str]]] = {}
    for w in commands():
        if w[:2] == ["python", "-m"]:
            mods.setdefault(w[2], []).append(w[3:])
    return mods


def test_the_readme_is_short_and_names_its_commands():
    assert len(README) <= 15_000
    assert {"pipelines.preprocess", "pipelines.train", "pipelines.evaluate", "pipelines.import_released"} <= set(
        module_lines())


@pytest.mark.parametrize("module", sorted(module_lines()))
def test_each_module_runs_and_takes_the_flags_and_keys_the_readme_gives_it(module):
    from med3dvlm.config import load_config

    help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    for args in module_lines()[module]:
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in help_text.stdout, f"{module} has no {flag}"
        keys = [a for a in args if re.match(r"^[a-z_]+\.[a-z_.0-9]+=", a)]
        if keys:
            preset = args[args.index("--config") + 1] if "--config" in args else "tiny"
            load_config(preset, keys)  # an unknown key or a bad value raises


def test_make_targets_files_and_links_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for w in commands():
        if w[0] == "make":
            assert w[1] in targets, w
        for flag in ("-f", "--runtime-env"):
            if flag in w and w[0] in ("kubectl", "docker", "ray"):
                assert (ROOT / w[w.index(flag) + 1]).is_file(), w
        if w[:2] in (["serve", "deploy"], ["ray", "up"]):
            assert (ROOT / w[2]).is_file(), w
    for link in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / link).exists(), link


def test_serve_arguments_and_http_routes_exist():
    from med3dvlm.serve.app import APP_ARGS

    for w in commands():
        if w[:2] == ["serve", "run"]:
            assert w[2] == "med3dvlm.serve.app:build_app"
            assert {a.split("=")[0] for a in w[3:]} <= APP_ARGS
    named = set(re.findall(r"`([a-z_]+)=", README.split("## Serving")[1].split("##")[0]))
    assert named <= APP_ARGS, named - APP_ARGS
    # the Api class's routes as it declares them (`@api.post("/v1/report", ...)`)
    declared = re.findall(r'@api\.(?:get|post)\("([^"]+)"', (ROOT / "serve" / "api.py").read_text())
    routes = [re.sub(r"\{[^}]+\}", "[^/]+", p) for p in declared]
    for w in commands():
        if w[0] == "curl":
            path = re.sub(r"^https?://[^/]+", "", next(x for x in w if x.startswith("http")))
            assert any(re.fullmatch(r, path) for r in routes), path


def test_code_comments_hold_no_dated_measurements():
    """Comments explain, commit messages remember: dated figures live in bench/results/ or the git log."""
    dated = [f"{p.relative_to(ROOT)}:{i}" for top in ("platform/med3dvlm", "pipelines", "serve", "tuning")
             for p in (ROOT / top).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, dated
