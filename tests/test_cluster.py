"""Cluster configs are checked, not just shipped: they parse, name entry points, flags and config keys that exist,
and ask for resources the cluster they target can give."""

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from med3dvlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "platform" / "cluster"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_entrypoint(cmd: str) -> dict:
    """`python -m MODULE args`: the module exists and its own parser accepts the args; config + overrides load."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    mod = importlib.import_module(argv[2])
    args = argv[3:]
    if hasattr(mod, "arg_parser") and hasattr(mod, "parse_args"):  # evaluate: its EvalConfig, validated as built
        return {"module": argv[2], "cfg": None, "ns": mod.parse_args(args)}
    ns = mod.arg_parser().parse_args(args) if hasattr(mod, "arg_parser") else mod.parse_args(args)
    if hasattr(ns, "overrides"):
        cfg = load_config(ns.config, ns.overrides)  # unknown keys or presets raise here
        return {"module": argv[2], "cfg": cfg, "ns": ns}
    return {"module": argv[2], "cfg": None, "ns": ns}


def test_every_cluster_file_parses():
    files = list(CLUSTER.rglob("*.yaml")) + [ROOT / "serve" / "config.yaml"]
    assert len(files) >= 6
    for f in files:
        assert _docs(f), f


def test_rayjobs_name_real_entry_points_and_fit_the_raycluster():
    cluster = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["maxReplicas"] for g in cluster["spec"]["workerGroupSpecs"])
    jobs = _docs(CLUSTER / "kuberay" / "jobs.yaml")
    modules = set()
    for job in jobs:
        assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        r = _check_entrypoint(job["spec"]["entrypoint"])
        modules.add(r["module"])
        if r["cfg"] is not None and r["cfg"].train.use_gpu:
            assert r["cfg"].train.num_workers <= gpus, job["metadata"]["name"]
        ns = r["ns"]
        if getattr(ns, "gpus_per_replica", 0):
            assert ns.replicas * ns.gpus_per_replica <= gpus
    assert {"pipelines.preprocess", "pipelines.train", "pipelines.evaluate", "tuning.siglip_sweep"} <= modules


def _check_serve_app(app: dict, gpus: float) -> None:
    mod, fn = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(mod), fn))
    from serve.app import Api, Encoder, Generator, Preprocessor, Retriever

    names = {d.name for d in (Api, Encoder, Generator, Preprocessor, Retriever)}
    need = 0.0
    for d in app["deployments"]:
        assert d["name"] in names, d["name"]
        auto = d.get("autoscaling_config")
        if auto:
            assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
            if "max_ongoing_requests" in d:  # batches can only fill when enough requests may be in flight
                assert d["max_ongoing_requests"] >= 8
        need += d.get("ray_actor_options", {}).get("num_gpus", 0) * (auto or {}).get("min_replicas", 1)
    assert need <= gpus
    from serve.app import APP_ARGS

    assert set(app["args"]) <= APP_ARGS, set(app["args"]) - APP_ARGS  # every argument is one build_app takes
    if "config" in app["args"]:  # optional: an export records its own preprocessing settings
        assert load_config(app["args"]["config"])


def test_serve_configs_reference_real_deployments_and_fit():
    cfg = _docs(ROOT / "serve" / "config.yaml")[0]
    assert cfg["http_options"]["host"] == "127.0.0.1"  # localhost unless configured
    for app in cfg["applications"]:
        _check_serve_app(app, gpus=8)
    svc = _docs(CLUSTER / "kuberay" / "rayservice.yaml")[0]
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["minReplicas"] for g in groups)
    for app in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]:
        _check_serve_app(app, gpus)


def test_launcher_and_runtime_env():
    c = _docs(CLUSTER / "cluster.yaml")[0]
    assert c["head_node_type"] in c["available_node_types"]
    gpu_total = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in c["available_node_types"].values())
    assert gpu_total >= load_config("paper").train.num_workers
    assert any("requirements.txt" in cmd for cmd in c["setup_commands"])
    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    for excluded in (".venv/", "out/"):
        assert excluded in env["excludes"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and "NCCL_SOCKET_IFNAME" in env["env_vars"]


def test_a_bad_override_in_a_job_would_be_caught():
    with pytest.raises(ValueError):
        _check_entrypoint("python -m pipelines.train --stage 1 --config paper --shards /s --out /o train.num_wrkers=8")


def test_every_cluster_config_turns_on_rays_token_auth():
    for f in ("raycluster.yaml", "rayservice.yaml"):
        spec = _docs(CLUSTER / "kuberay" / f)[0]["spec"]
        spec = spec.get("rayClusterConfig", spec)
        assert spec["authOptions"] == {"mode": "token"}, f
    c = _docs(CLUSTER / "cluster.yaml")[0]
    starts = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)
    assert any(k.endswith(".ray/auth_token") for k in c["file_mounts"])  # the same token on every node


def test_the_launcher_marks_each_placeholder():
    lines = (CLUSTER / "cluster.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "ami-0abcdef" in line or "fs-12345678" in line:
            assert "PLACEHOLDER" in line or "PLACEHOLDER" in lines[i - 1], line


def test_the_container_recipe_agrees_with_the_pins_and_the_manifests():
    """Ray and Python versions, the install path, the image name and the shared volume agree across the Dockerfile,
    pyproject.toml and the KubeRay manifests; hadolint passes it (it is linted here, not built)."""
    import re
    import shutil
    import subprocess
    import sys
    import tomllib

    docker = (CLUSTER / "Dockerfile").read_text()
    arg = lambda name: re.search(rf"^ARG {name}=(\S*)", docker, re.M).group(1)  # noqa: E731
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f"=={arg('RAY_VERSION')}")
    assert arg("PYTHON") == f"py{sys.version_info.major}{sys.version_info.minor}"  # the Python the suite runs on
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}${VARIANT}" in docker and "torch==2.13.0" in docker
    nltk = re.search(r"NLTK_DATA=(\S+)", docker).group(1)
    assert "COPY --chown=1000:100 . /app" in docker and f"nltk_data {nltk}" in docker
    jobs = _docs(CLUSTER / "kuberay" / "jobs.yaml")
    for job in jobs:
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == "/app" and env["env_vars"]["NLTK_DATA"] == nltk
    svc = _docs(CLUSTER / "kuberay" / "rayservice.yaml")[0]
    assert all(a["runtime_env"]["working_dir"] == "/app" for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"])
    manifests = [(CLUSTER / "kuberay" / f).read_text() for f in ("raycluster.yaml", "rayservice.yaml")]
    images = set(re.findall(r"image: (\S+)", "\n".join(manifests)))
    assert images == {f"REGISTRY/med3dvlm:{project['version']}-gpu"}
    claims = set(re.findall(r"claimName: (\S+?)\}", "\n".join(manifests)))
    pvc = _docs(CLUSTER / "kuberay" / "shared.yaml")[0]
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, str(CLUSTER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
