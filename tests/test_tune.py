"""The SigLIP init sweep on Ray Tune: ASHA stops a planted bad region early, the best config trains, resume works."""

import csv
import json
import math

import pytest

from med3dvlm.config import load_config
from med3dvlm.runtime import UserError
from tuning.siglip_sweep import parse_args, sweep

BUDGET = ["--steps", "8", "--eval-every", "2", "--search", "grid", "--learn-t", "false", "--learn-b", "false",
          "--grace", "1", "--metric", "val_loss"]
# validation on the training split: the 16-case fixture has too few validation volumes for a readable R@1
CFG = ["train.num_workers=1", "train.stage1.batch_size=8", "train.validation_split=train", "train.augment=false",
       "train.stage1.lr=2e-3", "model.layer_scale_init=1.0", "train.stage1.warmup_ratio=0"]


def _args(shards, out, *extra):
    # t' in {log 10, -7} x 2, b fixed at -10: at t ~ 0.001 the logits ignore the features and the loss cannot fall.
    # The objective is the validation loss here: R@1 does not move in an 8-step budget at this size.
    return parse_args(["--config", "tiny", "--shards", str(shards), "--out", str(out), "--trials", "4",
                       f"--t-init=-7,{math.log(10)}", "--b-init=-10,-10", *BUDGET, *extra, *CFG])


def test_sweep_asha_best_config_and_resume(shards, tmp_path):
    s = sweep(_args(shards[0], tmp_path), log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert len(rows) == 4 and s["errors"] == 0
    planted = [r for r in rows if float(r["t_init"]) < -6]
    good = [r for r in rows if float(r["t_init"]) > 0]
    assert s["best"]["t_init"] > 0  # the learnable region wins
    assert s["stopped_early"] >= 1 and any(r["stopped_early"] == "True" for r in planted)
    assert max(float(r["best"]) for r in good) < min(float(r["best"]) for r in planted)  # val_loss: lower is better
    progress = next((tmp_path / "siglip-sweep").glob("run_trial_*/progress.csv")).read_text().splitlines()[0]
    assert {"val_loss", "val_image_to_text_R@1", "val_text_to_image_R@1", "val_R@1", "t", "b"} <= set(progress.split(","))
    assert (tmp_path / "sweep.png").stat().st_size > 1000 and "stopped early" in (tmp_path / "trials.md").read_text()
    # the best config is a config file pipelines.train accepts, with the winning initialisation
    best = load_config(str(tmp_path / "best.yaml"))
    assert best.model.loss.t_init == pytest.approx(s["best"]["t_init"])
    assert best.train.eval_every == load_config("tiny").train.eval_every  # the user's setting, not the trials'
    # best-stage1 is the best trial's export: it trained from the winning initialisation
    assert (tmp_path / "best-stage1" / "model.safetensors").is_file()
    history = json.loads((tmp_path / "best-stage1" / "history.json").read_text())
    assert history[0]["t"] == pytest.approx(math.exp(s["best"]["t_init"]), rel=1e-4)
    # resume: a finished sweep restores without re-running any trial
    def reports():  # trial -> reports it has written
        return {p.parent.name: len(p.read_text().splitlines())
                for p in (tmp_path / "siglip-sweep").glob("run_trial_*/result.json")}

    before = reports()
    s2 = sweep(_args(shards[0], tmp_path, "--resume"), log=lambda *_: None)
    assert s2["best"] == s["best"] and reports() == before and len(before) == 4


def test_sweep_refuses_bad_input(shards, tmp_path):
    with pytest.raises(UserError, match="inverted"):
        parse_args(["--shards", "x", "--b-init=0,-15"])
    with pytest.raises(UserError, match="exceeds"):
        parse_args(["--shards", "x", "--trials", "50", "--steps", "100", "--max-steps-total", "1000"])
    with pytest.raises(UserError, match="validation split"):
        sweep(parse_args(["--shards", str(shards[0]), "--out", str(tmp_path), "train.validation_split=holdout"]))
    with pytest.raises(UserError, match="no shards"):
        sweep(parse_args(["--shards", str(tmp_path), "--out", str(tmp_path)]))
