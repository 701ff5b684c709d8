"""The feature cache: stage 2 from the frozen tower's cached features trains exactly as from the volumes, and a stale,
foreign, cut or half-built cache is refused or finished, never read silently."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cfg_for

SAME = ["model.trainable=paper", "train.preserve_order=true", "train.augment=false"]


@pytest.fixture(scope="module")
def both(chain, shards, tmp_path_factory):
    """Stage 2 from stage 1's export twice on a copy of the shards: from the volumes, and from the cache."""
    from med3dvlm.train.driver import train

    root = tmp_path_factory.mktemp("features")
    copy = root / "shards"
    shutil.copytree(shards[0], copy)
    lines = []
    runs = {mode: train(cfg_for(*SAME, f"train.feature_cache={mode}"), 2, str(copy), str(root / mode),
                        chain[1]["export"], log=lines.append) for mode in ("off", "on")}
    return copy, runs, lines


def test_stage2_from_the_cache_trains_as_from_the_volumes(both, chain):
    from med3dvlm.data.shards import read_table, volumes_from_table
    from med3dvlm.models.vlm import VLM

    copy, runs, lines = both
    cache = json.loads((Path(runs["on"]["export"]) / "run.json").read_text())["inputs"][
        "feature_cache"]
    assert cache and cache.startswith(str(copy / "features"))
    assert any("feature cache: encoding" in x and "eval mode" in x for x in lines)
    assert any(x.startswith("[train] feature cache: ") and "read instead of the volumes" in x for x in lines)
    off, on = ([h["loss"] for h in runs[m]["history"]] for m in ("off", "on"))
    assert len(off) == len(on) > 1 and on == pytest.approx(off, rel=1e-4, abs=1e-5)
    # the same model after training: its greedy answers (its weights agree to Adam's amplification of float noise:
    # a gradient near 0 moves a weight by up to the learning rate, whichever its sign)
    a, b = VLM.from_pretrained(runs["off"]["export"]), VLM.from_pretrained(runs["on"]["export"])
    t = read_table(str(copy), ["volume_id", "volume"], split="test", split_field="case_split").slice(0, 2)
    vol = torch.as_tensor(volumes_from_table(t)).float().div(255).unsqueeze(1)
    prompts = ["Describe the findings of this CT scan.", "Which organ is abnormal?"]
    for v in vol:
        assert a.generate(v[None].expand(2, -1, -1, -1, -1), prompts, max_new_tokens=12) == \
            b.generate(v[None].expand(2, -1, -1, -1, -1), prompts, max_new_tokens=12)


def test_the_cache_is_refused_where_it_cannot_stand_for_the_volumes(both, chain):
    from med3dvlm.data import features
    from med3dvlm.runtime import UserError
    from med3dvlm.train.stages import get_stage

    copy, _, _ = both
    manifest = json.loads((copy / "manifest.json").read_text())
    for extra, reason in [("train.augment=true", "train.augment=true"),
                          ("model.trainable=released_code", "train mode"),
                          ("train.feature_cache=maybe", "expected auto, on or off")]:
        cfg = cfg_for(*SAME, "train.feature_cache=on", extra)
        with pytest.raises(UserError, match=reason):
            features.prepare(cfg, get_stage(2), str(copy), manifest, chain[1]["export"], log=lambda *_: None)
    lines = []
    cfg = cfg_for(*SAME, "train.augment=true")  # auto: the volumes, and one line saying why
    assert features.prepare(cfg, get_stage(2), str(copy), manifest, chain[1]["export"], log=lines.append) is None
    assert lines == ["[train] feature cache: not used (train.augment=true draws new volumes every epoch)"]
    # another encoder: another key, so another folder; auto finds none there and says so
    lines = []
    assert features.prepare(cfg_for(*SAME), get_stage(3), str(copy), manifest, chain[3]["export"],
                            log=lines.append) is None
    assert "none for this key" in lines[0]


def test_a_stale_cut_or_half_built_cache(both, chain):
    from med3dvlm.data import features
    from med3dvlm.runtime import UserError

    copy, runs, _ = both
    cfg = cfg_for(*SAME, "train.feature_cache=on")
    manifest = json.loads((copy / "manifest.json").read_text())
    parts = features.key_parts(cfg, manifest, chain[1]["export"])
    loc = Path(features.location(str(copy), parts))
    good = json.loads((loc / "manifest.json").read_text())
    files = sorted(loc.glob("part-*.parquet"))
    digests = {f.name: f.read_bytes() for f in files}
    assert set(good["files"]) == {f.name for f in files} == {f.name for f in (copy / "volumes").glob("part-*.parquet")}

    stale = {**parts, "encoder": "0" * 64}
    with pytest.raises(UserError, match="built for another encoder"):
        features.check(str(loc), stale)
    cut = files[0]
    cut.write_bytes(digests[cut.name][:-100])
    with pytest.raises(UserError, match=f"{cut.name}: {len(digests[cut.name]) - 100} bytes"):
        features.check(str(loc), parts)
    # a killed build: no manifest, one file missing, one cut (as a kill leaves only whole files, the cut one is
    # removed by the user as the message says); the re-run writes the same bytes
    (loc / "manifest.json").unlink()
    cut.unlink()
    files[-1].unlink()
    features.build(cfg, str(copy), chain[1]["export"], parts, str(loc), log=lambda *_: None)
    assert {f.name: f.read_bytes() for f in sorted(loc.glob("part-*.parquet"))} == digests
    assert not list(loc.glob(".*")) and features.check(str(loc), parts)["files"] == good["files"]
