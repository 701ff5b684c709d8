"""Ray Tune sweep of the SigLIP temperature and bias initialisation (and whether each is learned) for stage 1: its
settings (`SweepConfig`) and the sweep itself, the library side of `tuning.siglip_sweep` (a thin command line).

Each trial is a Tune function trainable that runs `med3dvlm.train.driver.train(stage=1)` (the same TorchTrainer,
DeepSpeed and Ray Data path as `pipelines.train --stage 1`) on a fixed step budget, reporting validation loss and
retrieval R@1 (both directions; `val_R@1` is their mean) every `eval_every` steps, so ASHA stops weak trials early.
Outputs in `out` (a path, or a URI): `best.yaml` (a config `pipelines.train --config` takes), `trials.csv` and
`trials.md`, `sweep.png`, `best-stage1/` (the best trial's export); Tune's state in `siglip-sweep/`, each trial's run in
`runs/`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from med3dvlm import storage
from med3dvlm.runtime import UserError, init_ray, user_config
from med3dvlm.settings import FLAGS, load_settings, required, setting

SWEEP_NAME = "siglip-sweep"


def parse_range(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected LO,HI") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UserError(f"--{what} {text!r}: empty or inverted range (need LO <= HI)")
    return lo, hi


@dataclass
class SweepConfig:
    """One sweep, each setting with its help and bounds or choices beside it (`settings.setting`), loaded by the one
    settings loader from the command line's flags (`tuning.siglip_sweep`)."""

    shards: str = required("preprocessed shards (path or URI) with a validation split")
    config: str = setting("tiny", "preset (tiny, m3d, paper) or a YAML file: each trial's base")
    out: str = setting("out/sweep", "where trials, best.yaml and the plots go (path or URI)")
    trials: int = setting(8, "number of trials", 1)
    search: str = setting("random", "search algorithm", choices=("random", "grid", "optuna"))
    t_init: str = setting(f"0,{math.log(100):.4f}", "range LO,HI of t' = log t")
    b_init: str = setting("-15,0", "range LO,HI of the bias b")
    learn_t: str = setting("both", "t learned, fixed or both", choices=("both", "true", "false"))
    learn_b: str = setting("both", "b learned, fixed or both", choices=("both", "true", "false"))
    steps: int = setting(60, "training steps per trial", 1)
    eval_every: int = setting(10, "steps between validation reports (ASHA's rungs)", 1)
    subset: int = setting(0, "train each trial on the first N training volumes (0: all)", 0)
    metric: str = setting("val_R@1", "what ASHA and the best trial go by", choices=("val_R@1", "val_loss"))
    grace: int = setting(1, "ASHA grace period, in validation reports", 1)
    max_steps_total: int = setting(0, "refuse sweeps over this many steps in all (0: no cap)", 0)
    resume: bool = setting(False, "restore an interrupted sweep in out; finished trials stay")
    overrides: tuple[str, ...] = setting((), "key=value training config overrides for every trial")

    def __post_init__(self):
        self.t_range, self.b_range = parse_range(self.t_init, "t-init"), parse_range(self.b_init, "b-init")
        if self.eval_every > self.steps:
            raise UserError(f"--eval-every {self.eval_every} > --steps {self.steps}: no trial would report a "
                            f"validation figure")
        if self.max_steps_total and self.trials * self.steps > self.max_steps_total:
            raise UserError(f"{self.trials} trials x {self.steps} steps = {self.trials * self.steps} exceeds "
                            f"--max-steps-total {self.max_steps_total}")


def sweep_config(given: dict) -> SweepConfig:
    """The command line's flags (those given) and trailing overrides as a SweepConfig; UserError naming the setting."""
    try:
        return load_settings(SweepConfig, given, FLAGS)
    except ValueError as e:
        raise UserError(str(e)) from None


def _bools(choice: str) -> list[bool]:
    return {"both": [True, False], "true": [True], "false": [False]}[choice]


def search_space(a) -> dict:
    from ray import tune

    if a.search == "grid":  # points per axis so that the grid has about --trials points
        lt, lb = _bools(a.learn_t), _bools(a.learn_b)
        k = max(1, round((a.trials / (len(lt) * len(lb))) ** 0.5))
        pts = lambda lo, hi: [hi - (hi - lo) * i / (k - 1) for i in range(k)] if k > 1 else [(lo + hi) / 2]  # noqa: E731
        # high t' first: with ASHA the first trials to reach a rung set the bar the later ones must clear
        return {"t_init": tune.grid_search(pts(*a.t_range)), "b_init": tune.grid_search(pts(*a.b_range)),
                "learn_t": tune.grid_search(lt), "learn_b": tune.grid_search(lb)}
    return {"t_init": tune.uniform(*a.t_range), "b_init": tune.uniform(*a.b_range),
            "learn_t": tune.choice(_bools(a.learn_t)), "learn_b": tune.choice(_bools(a.learn_b))}


def with_loss_init(cfg, params: dict):
    """`cfg` with a trial's SigLIP initialisation (t' and b, each learned or fixed)."""
    loss = cfg.model.loss
    loss.t_init, loss.b_init = float(params["t_init"]), float(params["b_init"])
    loss.learn_t, loss.learn_b = bool(params["learn_t"]), bool(params["learn_b"])
    return cfg


def trial_config(base: dict, params: dict, steps: int, eval_every: int, subset: int):
    from med3dvlm.config import config_from_dict

    cfg = with_loss_init(config_from_dict(base), params)
    st = cfg.train.stage1
    st.max_steps, st.epochs = steps, max(st.epochs, 10_000)  # the step budget decides
    cfg.train.eval_every, cfg.train.max_train_volumes = eval_every, subset
    cfg.train.checkpoint_every = steps  # one checkpoint per trial (its export is what is kept)
    cfg.train.max_failures = 0
    return cfg


def run_trial(config: dict) -> None:
    """The Tune function trainable: one short stage-1 training; Train forwards its reports to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from med3dvlm.train.driver import train

    s = config["sweep"]
    cfg = trial_config(s["base"], config, s["steps"], s["eval_every"], s["subset"])
    # the trial's training run and export live in the sweep's storage (a path or URI), not on the trial's node
    out = storage.join(s["out"], "runs", os.path.basename(ray.tune.get_context().get_trial_dir()))
    train(cfg, 1, s["shards"], out, log=lambda *_: None, callbacks=[TuneReportCallback()], name="train")


def max_concurrent(cfg, cluster: dict) -> int:
    """Trials that fit at once: each holds its Train workers plus one CPU for its Ray Data tasks (no deadlock)."""
    per_trial_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker + 1
    n = int(cluster.get("CPU", 0) // per_trial_cpu)
    if cfg.train.use_gpu:
        n = min(n, int(cluster.get("GPU", 0) // cfg.train.num_workers))
    if n < 1:
        need = f"{per_trial_cpu:g} CPUs" + (f" and {cfg.train.num_workers} GPUs" if cfg.train.use_gpu else "")
        raise UserError(f"one trial needs {need}; the cluster has {cluster.get('CPU', 0):g} CPUs, "
                        f"{cluster.get('GPU', 0):g} GPUs")
    return n


def check_shards(cfg, shards: str) -> None:
    from med3dvlm.train.datasets import count_validation
    from med3dvlm.train.driver import check_shards as check_training_shards

    check_training_shards(cfg, shards)
    if count_validation(cfg, shards) < 2:
        raise UserError(f"--shards {shards}: fewer than 2 '{cfg.train.validation_split}' rows in field "
                        f"'{cfg.train.split_field}': the sweep needs a validation split to score trials")


def sweep(a: SweepConfig, log=print) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    started = time.time()
    cfg = user_config(a.config, list(a.overrides))
    check_shards(cfg, a.shards)
    out = storage.absolute(a.out)
    init_ray()
    import ray

    conc = max_concurrent(cfg, ray.cluster_resources())
    mode = "max" if a.metric == "val_R@1" else "min"
    space = {**search_space(a), "sweep": {"base": cfg.to_dict(), "shards": storage.absolute(a.shards), "out": out,
                                          "steps": a.steps, "eval_every": a.eval_every, "subset": a.subset}}
    n_reports = math.ceil(a.steps / a.eval_every)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=n_reports, grace_period=min(a.grace, n_reports),
                              reduction_factor=2)
    algo = None
    if a.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("--search optuna needs the `optuna` package (not in requirements.txt)") from None
        algo = OptunaSearch()
    trainable = tune.with_resources(run_trial, {"CPU": 0.1})  # the driver only waits; Train's workers hold the CPUs
    path = storage.join(out, SWEEP_NAME)
    if a.resume:
        if not tune.Tuner.can_restore(path):
            raise UserError(f"--resume: no sweep to restore in {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        for old in (path, storage.join(out, "runs")):
            storage.delete(old)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=a.metric, mode=mode, scheduler=scheduler, search_alg=algo,
                                        num_samples=1 if a.search == "grid" else a.trials,
                                        max_concurrent_trials=conc),
            run_config=tune.RunConfig(name=SWEEP_NAME, storage_path=out))
    log(f"[sweep] {a.trials if a.search != 'grid' else 'grid of'} trials, {a.steps} steps each, {conc} at a time, "
        f"ASHA on {a.metric} every {a.eval_every} steps -> {out}")
    results = tuner.fit()
    with storage.staged(out) as d:  # the tables and the plot are written locally, then uploaded to a URI
        return summarize(a, cfg, results, out, Path(d), started, log)


def summarize(a, cfg, results, out: str, local: Path, started: float, log) -> dict:
    """Tables, plot, best.yaml and summary.json into `local` (a staging folder for `out`); best-stage1 into `out`."""
    from med3dvlm.config import save_config
    from med3dvlm.plots import plot_sweep

    mode = "max" if a.metric == "val_R@1" else "min"
    rows = []
    for r in results:
        if r.config is None:
            continue
        hist = r.metrics_dataframe
        vals = [] if hist is None or a.metric not in hist else [v for v in hist[a.metric].tolist() if v == v]
        m = r.metrics or {}
        rows.append({
            "trial": Path(r.path).name, "t_init": r.config["t_init"], "b_init": r.config["b_init"],
            "learn_t": r.config["learn_t"], "learn_b": r.config["learn_b"],
            "reports": len(vals), "stopped_early": len(vals) < math.ceil(a.steps / a.eval_every),
            "final": vals[-1] if vals else None, "best": (max(vals) if mode == "max" else min(vals)) if vals else None,
            "final_val_loss": m.get("val_loss"), "final_t": m.get("t"), "final_b": m.get("b"),
            "error": str(r.error).splitlines()[0][:200] if r.error else "", "path": r.path})
    scored = [r for r in rows if r["best"] is not None and not r["error"]]
    if not scored:
        raise UserError(f"no trial reported {a.metric}; see {storage.join(out, SWEEP_NAME)}")
    # a tie (trials of one configuration reach the same figure) goes to the first trial by name: a resume agrees
    best = min(scored, key=lambda r: (-r["best"] if mode == "max" else r["best"], r["trial"]))
    save_config(with_loss_init(cfg, best), local / "best.yaml")  # the user's training settings, the best initialisation
    export = storage.join(out, "runs", best["trial"], "stage1")
    has_export = storage.is_file(storage.join(export, "config.json"))
    if has_export:
        storage.copy_dir(export, storage.join(out, "best-stage1"))
    with open(local / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [f"| trial | t' init (t) | b init | learn t | learn b | reports | stopped early | final {a.metric} | "
          f"best {a.metric} | final t | final b |", "|---|--:|--:|:-:|:-:|--:|:-:|--:|--:|--:|--:|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: -(r["best"] or -1e9) if mode == "max" else (r["best"] or 1e9)):
        md.append(f"| {r['trial'][-14:]} | {r['t_init']:.2f} ({math.exp(r['t_init']):.1f}) | {r['b_init']:.2f} | "
                  f"{'y' if r['learn_t'] else 'n'} | {'y' if r['learn_b'] else 'n'} | {r['reports']} | "
                  f"{'yes' if r['stopped_early'] else ''} | {fmt(r['final'])} | {fmt(r['best'])} | {fmt(r['final_t'])} | "
                  f"{fmt(r['final_b'])} |")
    (local / "trials.md").write_text("\n".join(md) + "\n")
    plot_sweep(rows, a.metric, local / "sweep.png")
    summary = {"best": {k: best[k] for k in ("t_init", "b_init", "learn_t", "learn_b", "best", "trial")},
               "metric": a.metric, "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
               "errors": sum(bool(r["error"]) for r in rows), "best_config": storage.join(out, "best.yaml"),
               "best_export": storage.join(out, "best-stage1") if has_export else None,
               "wall_s": round(time.time() - started, 1)}
    (local / "summary.json").write_text(json.dumps(summary, indent=1))
    log("\n".join(md))
    log(f"[sweep] best {a.metric} {best['best']:.3f}: t'={best['t_init']:.3f} b={best['b_init']:.3f} "
        f"learn_t={best['learn_t']} learn_b={best['learn_b']}; {summary['stopped_early']} of {len(rows)} stopped early; "
        f"config {summary['best_config']} (pipelines.train --config takes it), {time.time() - started:.0f} s")
    return summary
