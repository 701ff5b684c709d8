"""The released Med3DVLM layout, built from facts measured on the reference code (../shared/reference/): every key
and shape of the six DCFormer variants and of the paper-config projector, and a reference DCFormer-nano with its
outputs for one input."""

import json
from pathlib import Path

import pytest
import torch

from med3dvlm.models.convert import from_released, load_released, to_released
from med3dvlm.models.dcformer import VARIANTS, build_dcformer
from med3dvlm.models.projector import DualStreamProjector, projector_config_for

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
KEYS = REFERENCE / "med3dvlm_reference_keys.json"
NANO = REFERENCE / "dcformer_nano_reference.safetensors"



def needs(path: Path):
    """Skip a test that reads a file of the measured reference facts where that file is missing (a clone without
    ../shared); the other tests here build their inputs themselves and run everywhere."""
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} (measured on the reference code) is missing")


@pytest.fixture(scope="module")
def reference():
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} (measured on the reference code) is missing")
    return json.loads(KEYS.read_text())


def _random_state(entry: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in entry["state_dict"].items():
        out[entry["prefix_in_released_checkpoint"] + k] = (
            torch.randint(0, 100, shape, generator=g) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g))
    return out


def test_the_six_reference_variants_are_ours():
    assert set(VARIANTS) == {"nano", "naive", "tiny", "small", "base", "large"}


@pytest.mark.parametrize("variant", ["nano", "naive", "tiny", "small", "base", "large"])
def test_every_variant_imports_strictly_and_exports_the_identical_layout(reference, variant):
    entry = reference[f"dcformer_{variant}"]
    released = _random_state(entry)
    ours = {k[len("vision."):]: v for k, v in from_released(released).items()}
    model = build_dcformer(variant)
    assert model.num_params() == entry["params"]
    res = model.load_state_dict(ours, strict=True)  # strict: a missing or extra key raises
    assert not res.missing_keys and not res.unexpected_keys
    back = to_released({f"vision.{k}": v for k, v in model.state_dict().items()})
    assert {k: list(v.shape) for k, v in back.items()} == {k: list(v.shape) for k, v in released.items()}
    for k, v in released.items():
        assert torch.equal(back[k].to(v.dtype), v), k


@needs(NANO)
def test_reference_nano_weights_reproduce_the_reference_outputs():
    from safetensors.torch import load_file

    fx = load_file(str(NANO))
    released = {k: v for k, v in fx.items() if k.startswith("model.")}
    model = build_dcformer("nano").eval()
    model.load_state_dict({k[len("vision."):]: v for k, v in from_released(released).items()}, strict=True)
    with torch.no_grad():
        outs = model(fx["input"])
    n = len([k for k in fx if k.startswith("output.")])
    assert n == 5
    for i in range(n):
        want = fx[f"output.{i}"]
        assert outs[i].shape == want.shape
        rel = (outs[i] - want).norm() / want.norm()
        assert rel < 1e-5, (i, float(rel))


def test_paper_projector_imports_strictly(reference):
    entry = reference["projector_paper"]
    cfg = projector_config_for(build_dcformer("small"), (128, 256, 256), entry["config"]["hidden_size"],
                               entry["config"]["image_tokens"], entry["config"]["depth"])
    proj = DualStreamProjector(cfg)
    assert sum(p.numel() for p in proj.parameters()) == entry["params"] == 47_221_248
    ours = {k[len("projector."):]: v for k, v in from_released(_random_state(entry)).items()}
    proj.load_state_dict(ours, strict=True)
    back = to_released({f"projector.{k}": v for k, v in proj.state_dict().items()})
    assert set(back) == {entry["prefix_in_released_checkpoint"] + k for k in entry["state_dict"]}


def test_load_released_is_strict_and_names_the_key():
    from dataclasses import replace

    from med3dvlm.config import load_config
    from med3dvlm.models.vlm import VLM

    tiny = load_config("tiny")
    cfg = replace(tiny.model, splice="m3d_legacy")
    a, b = VLM.from_config(cfg, tiny.data.shape).eval(), VLM.from_config(cfg, tiny.data.shape).eval()
    released = to_released(a.state_dict())
    load_released(b, released)
    x = torch.rand(1, 1, *tiny.data.shape)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    with pytest.raises(KeyError, match="s9.extra"):
        from_released({**released, "model.vision_tower.vision_tower.encoder.s9.extra": torch.zeros(1)})
    del released["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_released(b, released)


# ------------------------------------------------------------------------------------------------ checkpoint folders
def _released_folder(vlm, folder: Path) -> None:
    """A checkpoint folder in the released layout, built as the authors' merge script writes one (not by our
    exporter): the LLM saved by `save_pretrained` in several shards with an index, the vision tower and projector
    under their released prefixes in one more shard, the reference's vision fields in config.json."""
    from safetensors.torch import save_file

    from med3dvlm.models.released import released_config

    vlm.llm.save_pretrained(folder, max_shard_size="400KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # really sharded
    vision = to_released({k: v for k, v in vlm.state_dict().items() if k.startswith(("vision.", "projector."))})
    save_file({k: v.contiguous() for k, v in vision.items()}, str(folder / "model-vision.safetensors"))
    index["weight_map"].update({k: "model-vision.safetensors" for k in vision})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(released_config(vlm)))
    vlm.tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from dataclasses import replace

    from med3dvlm.config import load_config
    from med3dvlm.models.vlm import VLM

    torch.manual_seed(0)
    tiny = load_config("tiny")
    vlm = VLM.from_config(replace(tiny.model, splice="m3d_legacy"), tiny.data.shape).eval()
    folder = tmp_path_factory.mktemp("released")
    _released_folder(vlm, folder)
    return vlm, folder


def _greedy(vlm, seed=1):
    x = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(seed))
    return vlm.generate(x, [" Describe the findings.", " Which organ?"], max_new_tokens=8)


def test_import_gives_the_saved_models_greedy_answers_and_exports_back(released, tmp_path, monkeypatch):
    from med3dvlm.models.vlm import VLM
    from pipelines.import_released import main

    vlm, folder = released
    res = main(["--checkpoint", str(folder), "--out", str(tmp_path / "ours"), "--config", "tiny"])
    assert res["encoder"] == "nano" and len(res["shards"]) >= 3 and all(len(h) == 64 for h in res["sha256"].values())
    run = json.loads((tmp_path / "ours" / "run.json").read_text())
    assert run["inputs"]["checkpoint"] == str(folder) and run["inputs"]["sha256"] == res["sha256"]
    ours = VLM.from_pretrained(tmp_path / "ours").eval()
    assert ours.cfg.splice == "m3d_legacy"
    assert _greedy(ours) == _greedy(vlm)
    with monkeypatch.context() as m:  # the file mapped a few tensors at a time: the same weights
        m.setattr("med3dvlm.models.export.MAPPED_BYTES", 4096)
        small = VLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), ours.state_dict().values()))
    # the parts the Serve app loads, and evaluation's kind check
    assert VLM.from_pretrained(tmp_path / "ours", parts=("vision",)).llm is None
    assert VLM.from_pretrained(tmp_path / "ours", parts=("llm",)).vision is None
    main(["--to-released", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")])
    main(["--checkpoint", str(tmp_path / "back"), "--out", str(tmp_path / "again")])  # its med3dvlm.json's settings
    assert _greedy(VLM.from_pretrained(tmp_path / "again").eval()) == _greedy(vlm)


def test_exported_lora_model_is_merged_into_the_released_layout(released, tmp_path):
    from dataclasses import replace

    from med3dvlm.config import load_config
    from med3dvlm.models.released import export_released, import_released
    from med3dvlm.models.vlm import VLM

    tiny = load_config("tiny")
    vlm = VLM.from_config(replace(tiny.model, splice="m3d_legacy", trainable="paper"), tiny.data.shape)
    vlm.set_stage(3)
    for n, p in vlm.llm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a LoRA that changes the answers
    vlm.eval().save_pretrained(tmp_path / "lora")
    export_released(str(tmp_path / "lora"), str(tmp_path / "rel"), max_shard_bytes=300_000, log=lambda *_: None)
    keys = json.loads((tmp_path / "rel" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("lora" in k for k in keys)
    import_released(str(tmp_path / "rel"), str(tmp_path / "back"), tiny, log=lambda *_: None, explicit=False)
    assert _greedy(VLM.from_pretrained(tmp_path / "back").eval()) == _greedy(VLM.from_pretrained(tmp_path / "lora").eval())


@pytest.mark.parametrize("damage,words", [
    ("no_config", "no config.json"), ("no_weights", "not a released checkpoint folder"),
    ("missing_shard", "are missing"), ("wrong_variant", "DCFormer-nano"), ("wrong_shape", "trained at"),
])
def test_import_refuses_with_one_line(released, tmp_path, capsys, damage, words):
    import shutil

    from pipelines.common import run_main
    from pipelines.import_released import main

    _, folder = released
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    extra = ["--config", "tiny"]
    if damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "no_weights":
        for f in bad.glob("model*.safetensors*"):
            f.unlink()
    elif damage == "missing_shard":
        (bad / "model-vision.safetensors").unlink()
    elif damage == "wrong_variant":
        extra.append("model.encoder=small")
    elif damage == "wrong_shape":
        extra.append("data.shape=[16,64,64]")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(["--checkpoint", str(bad), "--out", str(tmp_path / "o"), *extra]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


# ------------------------------------------------------------------------------------------------ the round trip
PROMPTS = [" Describe the findings of this CT scan.", " Write a radiology report for this image.",
           " Which organ is abnormal?", " Which organ is abnormal? Choices: A. liver B. spleen C. kidney D. lung",
           " Is there a lesion? Choices: A. yes B. no"]


def _first_logits(vlm, volume):
    batch = vlm.collate([vlm.encode_example(p, None) for p in PROMPTS], left_pad=True)
    return vlm(volume, batch["input_ids"], batch["attention_mask"]).logits[:, -1]


def test_a_trained_export_comes_back_from_the_released_layout_unchanged(chain, tmp_path, capsys):
    """Issue 44's round trip on a trained stage-3 export (exact splice, LoRA on a trained tower): every tensor equal to
    the LoRA-merged original, the same settings and tokenizer, the same next-token logits and greedy answers."""
    from dataclasses import replace

    from med3dvlm.models.vlm import VLM
    from pipelines.import_released import main

    export = chain[3]["export"]
    main(["--to-released", "--checkpoint", export, "--out", str(tmp_path / "rel")])
    assert "m3d_legacy way" in capsys.readouterr().out  # the reference code would splice it differently: said
    main(["--checkpoint", str(tmp_path / "rel"), "--out", str(tmp_path / "back"), "--config", "tiny"])
    warned = capsys.readouterr().out
    assert "warning: model.trainable" in warned  # the chain trained released_code; tiny says full: a run setting
    a, b = VLM.from_pretrained(export).eval(), VLM.from_pretrained(tmp_path / "back").eval()
    assert a.lora and not b.lora and json.loads((tmp_path / "back" / "config.json").read_text())["source"]["lora_merged"]
    assert (a.cfg.splice, a.cfg.stem_act, a.data, a.input_shape) == (b.cfg.splice, b.cfg.stem_act, b.data, b.input_shape)
    assert replace(a.cfg, trainable="full") == b.cfg
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert (a.tokenizer.eos_token_id, a.tokenizer.pad_token_id) == (b.tokenizer.eos_token_id, b.tokenizer.pad_token_id)
    assert [a.encode_example(p, " A. liver") for p in PROMPTS] == [b.encode_example(p, " A. liver") for p in PROMPTS]
    volume = torch.rand(len(PROMPTS), 1, *a.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _first_logits(a, volume)
        a.llm = a.llm.merge_and_unload()
        a.lora = False
        merged, back = a.state_dict(), b.state_dict()
        assert merged.keys() == back.keys()
        assert all(torch.equal(merged[k], back[k]) for k in merged), [k for k in merged if not torch.equal(merged[k], back[k])][:3]
        got = _first_logits(b, volume)
        b.cfg.splice = "m3d_legacy"  # the settings matter: the released layout's own splice would change the logits
        assert not torch.allclose(_first_logits(b, volume), got, atol=1e-3)
        b.cfg.splice = "exact"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # LoRA merged: the same sums, rounded otherwise
    a_answers = VLM.from_pretrained(export).eval().generate(volume, PROMPTS, max_new_tokens=12)
    assert b.generate(volume, PROMPTS, max_new_tokens=12) == a_answers


@pytest.mark.parametrize("override", ["model.splice=exact", "data.window=[1500,-600]"])
def test_a_config_that_would_change_the_answers_is_refused_naming_the_key(released, tmp_path, capsys, override):
    from med3dvlm.config import load_config
    from med3dvlm.models.export import data_info
    from pipelines.common import run_main
    from pipelines.import_released import main

    vlm, _ = released
    vlm.data = data_info(load_config("tiny").data)
    try:
        vlm.save_pretrained(tmp_path / "ours")
    finally:
        vlm.data = None
    main(["--to-released", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "rel")])
    (tmp_path / "ours").rename(tmp_path / "gone")  # the settings travel in the folder, not by reference
    main(["--checkpoint", str(tmp_path / "rel"), "--out", str(tmp_path / "ok"), "--config", "tiny",
          "model.splice=m3d_legacy"])  # agrees with the folder: imported
    capsys.readouterr()
    args = ["--checkpoint", str(tmp_path / "rel"), "--out", str(tmp_path / "o"), "--config", "tiny"]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(args + (["model.splice=m3d_legacy"] if "window" in override else []) + [override]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and override.split("=")[0] + ": the config" in err, err
    assert not (tmp_path / "o").exists()


def test_a_released_folder_without_our_settings_says_which_came_from_the_config(released, tmp_path, capsys):
    from pipelines.import_released import main

    _, folder = released
    main(["--checkpoint", str(folder), "--out", str(tmp_path / "o"), "--config", "tiny"])
    line = [l for l in capsys.readouterr().out.splitlines() if "no med3dvlm.json" in l]
    assert len(line) == 1 and "model.splice=m3d_legacy" in line[0] and "model.stem_act=false" in line[0], line
