"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment
whose dependencies are the same pinned wheels (this environment's, offline), must run its console script; and its
declared pins, resolved by pip from the package index into an empty environment, must resolve together."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def build_wheel(tmp_path: Path) -> tuple[Path, dict]:
    """The wheel of this checkout's tracked files, and its pins (Requires-Dist name -> version)."""
    import shutil

    src = tmp_path / "src"  # the checkout's tracked files only: a stale build/ folder would leak into the wheel
    for f in run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.splitlines():
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
             str(src)])
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("med3dvlm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"med3dvlm/serve/config.yaml", "med3dvlm/ray_data_logging.yaml"} <= set(names)  # package data travels
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"med3dvlm"}  # one top-level import package
    for top, inside in (("platform/med3dvlm", "med3dvlm"), ("pipelines", "med3dvlm/pipelines"),
                        ("serve", "med3dvlm/serve"), ("tuning", "med3dvlm/tuning")):
        missing = [str(f) for f in (ROOT / top).rglob("*.py") if f"{inside}/{f.relative_to(ROOT / top)}" not in names]
        assert not missing, missing  # every module of the checkout is in the wheel
    requires = dict(re.findall(r"^Requires-Dist: ([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)\s*$", meta, re.M))
    assert {"torch", "ray", "transformers", "deepspeed", "fastapi"} <= set(requires), meta[:2000]
    return wheel, requires


def test_the_pins_resolve_together_from_the_index(tmp_path):
    """`pip install --dry-run --report` of the wheel into an empty virtual environment, dependencies included, from
    the index pip is configured with (here the machine's local registry; on a stock machine PyPI): every pin is
    resolved at its pinned version, with everything it needs, or pip refuses (the conflict is the failure)."""
    import json

    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    wheel, requires = build_wheel(tmp_path)
    venv = tmp_path / "empty"
    assert run([sys._base_executable, "-m", "venv", str(venv)]).returncode == 0
    r = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
             "--report", str(tmp_path / "report.json"), str(wheel)])
    assert r.returncode == 0, r.stderr[-3000:]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    off = {k: (v, got.get(canonicalize_name(k))) for k, v in requires.items()
           if got.get(canonicalize_name(k)) not in SpecifierSet(f"=={v}")}
    assert not off, off  # name -> (pinned, resolved)
    assert len(got) > len(requires)  # their own dependencies came too: nothing borrowed from this environment


def test_wheel_installs_into_a_fresh_venv_and_its_console_script_runs(tmp_path):
    import sysconfig

    wheel, requires = build_wheel(tmp_path)

    venv = tmp_path / "venv"
    assert run([sys._base_executable, "-m", "venv", str(venv)]).returncode == 0
    py = venv / "bin" / "python"
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the dependencies: this environment's installed (pinned) distributions, on the path; its editable install of
    # this checkout is not (a plain path line does not run the .pth files inside it)
    Path(site, "pinned-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
             str(wheel)])
    assert r.returncode == 0, r.stderr[-2000:]
    check = ("import importlib.metadata as m, json, sys; req = json.loads(sys.argv[1]); "
             "print(json.dumps({k: m.version(k) for k in req}))")
    import json

    from packaging.specifiers import SpecifierSet

    got = json.loads(run([str(py), "-c", check, json.dumps(requires)], cwd=tmp_path).stdout)
    off = {k: v for k, v in got.items() if v not in SpecifierSet(f"=={requires[k]}")}  # 2.13.0+cpu is ==2.13.0
    assert set(got) == set(requires) and not off, off

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NLTK_DATA")}
    where = run([str(py), "-c", "import med3dvlm; print(med3dvlm.__file__)"], cwd=tmp_path, env=env).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout
    r = run([str(py), "-c", "import med3dvlm.serve.app, med3dvlm.tuning.siglip_sweep"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]  # the Serve app's import path in the wheel: med3dvlm.serve.app
    for args in (["--help"], ["--version"], ["train", "--help"], ["sweep", "--help"]):
        r = run([str(venv / "bin" / "med3dvlm"), *args], cwd=tmp_path, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    out = run([str(venv / "bin" / "med3dvlm"), "train", "--help"], cwd=tmp_path, env=env).stdout
    assert "(default: tiny)" in " ".join(out.split())
