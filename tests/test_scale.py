"""The data path's behaviour at scale, shown at small size: stable shard assignment (adding cases touches only new
shards, removing one only its shard), a driver killed mid-run resumes to a byte-identical result, the training
augmentation keeps its transforms and probabilities (the ZeRO-3 export: test_train)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from med3dvlm.config import load_config
from med3dvlm.data.manifest import Item
from med3dvlm.data.plan import assign_cases, plan_shards

ROOT = Path(__file__).resolve().parents[1]


def _items(cases: list[str], per_case: int = 2) -> list[Item]:
    return [Item(f"{c}-{k}", c, f"S{k}", "train", f"/x/{c}/{k}", f"{c}/{k}") for c in cases for k in range(per_case)]


def test_adding_cases_touches_only_new_shards_and_removing_one_only_its_shard():
    cfg = load_config("tiny", ["data.rows_per_shard=8"])
    cases = [f"case{i:04d}" for i in range(400)]
    specs, assignment = plan_shards(_items(cases), cfg, "/out")
    assert sum(len(s["items"]) for s in specs) == 800 and all(len(s["items"]) <= 8 for s in specs)
    before = {s["index"]: s["spec_hash"] for s in specs}
    # +1% cases: only new shards, every old one identical
    specs2, assignment2 = plan_shards(_items(cases + [f"new{i}" for i in range(4)]), cfg, "/out", assignment)
    after = {s["index"]: s["spec_hash"] for s in specs2}
    changed = [i for i in after if before.get(i) != after[i]]
    assert changed and all(i not in before for i in changed) and len(changed) / len(after) <= 0.03
    # a case removed: its shard alone is re-planned
    gone = cases[123]
    specs3, _ = plan_shards(_items([c for c in cases if c != gone]), cfg, "/out", assignment)
    after3 = {s["index"]: s["spec_hash"] for s in specs3}
    assert [i for i in before if before[i] != after3.get(i)] == [assignment[gone]]
    # no change: the same plan
    assert {s["index"]: s["spec_hash"] for s in plan_shards(_items(cases), cfg, "/out", assignment)[0]} == before


def test_a_case_is_never_split_and_assignment_is_stable_without_history():
    sizes = {f"c{i}": 1 + i % 3 for i in range(50)}
    a = assign_cases(sizes, {}, 5)
    assert a == assign_cases(dict(reversed(list(sizes.items()))), {}, 5)  # order of discovery does not matter
    per_shard = {}
    for c, s in a.items():
        per_shard[s] = per_shard.get(s, 0) + sizes[c]
    assert max(per_shard.values()) <= 5


def _run_preprocess(raw, out, env):
    return subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", "--config", "tiny", "--raw", str(raw),
                             "--out", str(out), "data.rows_per_shard=2"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_killed_driver_resumes_to_the_uninterrupted_result(ray_session, synthetic_m3d, tmp_path):
    from med3dvlm.data.preprocess import preprocess

    raw, _ = synthetic_m3d
    cfg = load_config("tiny", ["data.rows_per_shard=2"])
    whole = preprocess(cfg, raw, tmp_path / "whole", log=lambda *_: None)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    p = _run_preprocess(raw, tmp_path / "killed", env)
    t = time.time()
    while not list((tmp_path / "killed" / "_state").glob("part-*.json")) and time.time() - t < 240:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done_before = len(list((tmp_path / "killed" / "_state").glob("part-*.json")))
    assert 1 <= done_before < whole["counts"]["shards"]
    resumed = preprocess(cfg, raw, tmp_path / "killed", log=lambda *_: None)
    assert resumed["figures"]["skipped_shards"] >= done_before
    assert resumed["figures"]["processed_shards"] == whole["counts"]["shards"] - resumed["figures"]["skipped_shards"]
    for f in sorted((tmp_path / "whole" / "volumes").glob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "killed" / "volumes" / f.name).read_bytes(), f.name
    assert (tmp_path / "whole" / "manifest.json").read_bytes() == (tmp_path / "killed" / "manifest.json").read_bytes()


def _reference_augment(vol: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The reference transforms, written with numpy: rot90 in H-W, flips, then x * scale + shift."""
    v = vol.astype(np.float32) / 255.0
    if p[0]:
        v = np.rot90(v, k=int(p[0]), axes=(1, 2))
    for axis in range(3):
        if p[1 + axis]:
            v = np.flip(v, axis=axis)
    return v * p[4] + p[5]


def test_augmentation_keeps_the_reference_transforms_and_probabilities():
    from med3dvlm.train.augment import apply_augment, augment_params

    ids = [f"v{i}" for i in range(4000)]
    p = augment_params({"volume_id": ids}, seed=3)["augment"]
    assert abs((p[:, 0] > 0).mean() - 0.5) < 0.03 and set(np.unique(p[:, 0])) == {0, 1, 2, 3}
    for axis in (1, 2, 3):
        assert abs(p[:, axis].mean() - 0.1) < 0.02
    assert abs((p[:, 4] != 1).mean() - 0.5) < 0.03 and np.abs(p[:, 4] - 1).max() <= 0.1
    assert abs((p[:, 5] != 0).mean() - 0.5) < 0.03 and np.abs(p[:, 5]).max() <= 0.1
    rng = np.random.default_rng(0)
    vols = rng.integers(0, 255, (6, 4, 8, 8), dtype=np.uint8)
    got = apply_augment(torch.from_numpy(vols), torch.from_numpy(p[:6]))
    assert got.shape == (6, 1, 4, 8, 8) and got.dtype == torch.float32
    for i in range(6):
        np.testing.assert_allclose(got[i, 0].numpy(), _reference_augment(vols[i], p[i]), atol=1e-6)
    assert torch.equal(apply_augment(torch.from_numpy(vols), None)[:, 0], torch.from_numpy(vols).float() / 255)
