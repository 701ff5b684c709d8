import math
import re

import pytest

from med3dvlm.config import load_config, save_config


def test_presets_hold_the_paper_and_tiny_settings():
    paper = load_config("paper")
    assert paper.data.shape == (128, 256, 256) and paper.model.encoder == "small"
    assert (paper.train.stage1.batch_size, paper.train.stage2.batch_size, paper.train.stage3.batch_size) == (64, 16, 8)
    assert (paper.train.stage1.lr, paper.train.stage3.lr) == (1e-4, 5e-5)
    assert math.isclose(paper.model.loss.t_init, math.log(1 / 0.07)) and paper.model.loss.b_init == 0.0
    assert load_config("m3d").data.shape == (32, 256, 256)
    tiny = load_config("tiny")
    assert tiny.model.encoder == "nano" and not tiny.train.use_gpu


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["model.encoder=small", "train.stage1.lr=3e-4", "data.shape=[16,32,32]", "model.loss.learn_b=false"])
    assert cfg.model.encoder == "small" and cfg.train.stage1.lr == 3e-4
    assert cfg.data.shape == (16, 32, 32) and cfg.model.loss.learn_b is False


@pytest.mark.parametrize("bad", ["model.nope=1", "train.stage1.batch_size=abc", "data.shape=[1,2]", "noequals"])
def test_bad_overrides_name_the_key(bad):
    with pytest.raises(ValueError) as e:
        load_config("tiny", [bad])
    assert bad.split("=")[0].split(".")[-1] in str(e.value) or "key=value" in str(e.value)


@pytest.mark.parametrize("overrides,words", [
    (["train.stage1.lr=["], "train.stage1.lr=[': the value is not valid YAML"),  # PyYAML's parser refuses it
    (["train.stage1.lr=\x07"], "not valid YAML"),  # a control character YAML does not allow
    (["train=1", "train.stage1.lr=2"], "sets a key inside 'train'"),
    (["train=[1]", "train.seed=2"], "sets a key inside 'train'"),
])
def test_overrides_that_are_not_yaml_or_collide_are_refused_on_one_line(overrides, words):
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        load_config("tiny", overrides)
    assert "\n" not in str(e.value)


def test_config_files_that_are_not_yaml_or_name_no_preset_are_refused_on_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: [\n")
    (tmp_path / "b.yaml").write_text("base: {paper: 1}\n")
    for name, words in (("a.yaml", "not valid YAML"), ("b.yaml", "unknown base preset")):
        with pytest.raises(ValueError, match=words) as e:
            load_config(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_evaluation_settings_that_are_not_yaml_are_refused_on_one_line(tmp_path):
    from med3dvlm.runtime import UserError
    from pipelines.evaluate import parse_args

    (tmp_path / "e.yaml").write_text("limit: [\n")
    base = ["--task", "report", "--model", "m", "--shards", "s", "--out", "o"]
    for extra, words in ((["limit=["], "override 'limit=[': the value is not valid YAML"),
                         (["--config", str(tmp_path / "e.yaml")], "cannot read")):
        with pytest.raises(UserError, match=re.escape(words)) as e:
            parse_args(base + extra)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "0"], "--batch-size is 0; it must be at least 1"),
    (["--replicas", "-1"], "--replicas is -1"), (["--cpus-per-replica", "nan"], "--cpus-per-replica is nan"),
    (["--top-p", "1.5"], "at most 1"), (["--repetition-penalty", "inf"], "--repetition-penalty is inf"),
    (["--limit", "0"], "--limit is 0"), (["--n", "100,-5"], "--n is (100, -5)"),
    (["batch_size=abc"], "--batch-size expects a whole number, got 'abc'"),
    (["limit=2.5"], "--limit expects a whole number, got 2.5"), (["replicas=true"], "--replicas expects a whole number"),
    (["--max-new-tokens", "5000"], "at most 4096"), (["limitt=3"], "unknown setting 'limitt'; did you mean 'limit'?"),
])
def test_evaluation_numbers_out_of_range_or_of_the_wrong_type_are_refused(extra, words):
    from med3dvlm.runtime import UserError
    from pipelines.evaluate import parse_args

    with pytest.raises(UserError, match=re.escape(words)):
        parse_args(["--task", "report", "--model", "m", "--shards", "s", "--out", "o", *extra])


@pytest.mark.parametrize("override,words", [
    ("train.stage1.batch_size=0", "'train.stage1.batch_size' is 0; it must be at least 1"),
    ("train.num_workers=0", "'train.num_workers' is 0"), ("data.shape=[0,64,64]", "'data.shape' is (0, 64, 64)"),
    ("train.stage2.lr=-1e-4", "'train.stage2.lr' is -0.0001; it must be above 0"),
    ("train.stage1.lr=.nan", "'train.stage1.lr' is nan"), ("train.zero_stage=4", "at least 0 and at most 3"),
    ("train.stage3.warmup_ratio=1.5", "'train.stage3.warmup_ratio'"), ("train.cpus_per_worker=0", "above 0"),
    ("train.stage1=5", "'train.stage1' is a group of settings; it expects a mapping, got 5"),  # found by bench/fuzz.py
    ("tra\nin.seed=1", "unknown config key 'tra\\nin'"),  # a key with a line break is shown on one line
])
def test_numbers_a_run_cannot_start_with_are_refused_naming_the_key(override, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config("tiny", [override])


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config("tiny", ["model.embed_dim=32"])
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    (tmp_path / "d.yaml").write_text("base: tiny\nmodel:\n  encoder: small\n")
    assert load_config(str(tmp_path / "d.yaml")).model.encoder == "small"
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_console_script_dispatches_to_the_pipelines(tmp_path):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    main(["make-synthetic", "--out", str(tmp_path / "m3d"), "--cases", "2"])
    assert (tmp_path / "m3d" / "M3D_Cap.json").is_file()


def test_an_unknown_key_gets_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'train.stage1.lr'"):
        load_config("tiny", ["train.lr=1e-4"])
    with pytest.raises(ValueError, match="did you mean 'model.encoder'"):
        load_config("tiny", ["model.encodr=nano"])


def test_entry_points_show_defaults_print_the_config_and_a_version(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "(default: tiny)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "1", "--shards", "s", "--out", "o", "--print-config", "model.encoder=small"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "encoder: small" in out and "name: tiny" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("med3dvlm ")


def test_every_entry_point_help_lists_defaults(capsys):
    from pipelines.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0 and "(default:" in out, name
        with pytest.raises(SystemExit) as e:
            main([name, "--version"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith("med3dvlm "), name
        if name != "make-synthetic":  # writes test data: there is no pipeline config to give it
            assert "--config" in out, f"{name} takes no --config"


def test_every_key_has_its_help_and_the_reference_is_current():
    """The configuration reference is generated from the fields (`python -m pipelines.config_reference`): a key added
    without a line of help, or a reference not regenerated after a change, fails here."""
    from pathlib import Path

    import dataclasses

    from med3dvlm.config import fields_of
    from med3dvlm.eval.runner import EvalConfig
    from med3dvlm.sweep import SweepConfig
    from pipelines.config_reference import reference_text
    from serve.app import AppSettings

    assert all(f.metadata.get("help") for _, _, f in fields_of())
    assert all(f.metadata.get("help") for cls in (EvalConfig, AppSettings, SweepConfig)
               for f in dataclasses.fields(cls) if f.init)
    reference = Path(__file__).resolve().parents[1] / "platform" / "config.md"
    assert reference.read_text() == reference_text(), "run: python -m pipelines.config_reference"
    text = reference.read_text()
    assert "`train.stage3.lr` | float | `5e-05` | `5e-05` | `0.001` | above 0 |" in text  # value per preset, bounds
    assert "| `max_new_tokens` | int | `256` | at least 1 and at most 4096 |" in text  # evaluation's
    assert "| `replicas` | int or None | `null` | at least 1 |" in text  # the Serve app's
    assert "| `dtype` | str or None | `null` | float32, bfloat16, float16 |" in text  # choices beside their field
    assert "| `search` | str | `\"random\"` | random, grid, optuna |" in text  # the sweep's


def test_the_bounds_sit_beside_their_fields_and_are_checked():
    from med3dvlm.config import bounds

    b = bounds()
    assert b["train.zero_stage"] == (0, 3, False) and b["train.stage2.lr"] == (0, None, True)
    assert len([k for k in b if k.startswith("train.stage")]) == 24
    with pytest.raises(ValueError, match="'train.stage2.warmup_ratio' is 1.5; it must be at least 0 and at most 1"):
        load_config("tiny", ["train.stage2.warmup_ratio=1.5"])
