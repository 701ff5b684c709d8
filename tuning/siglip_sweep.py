"""Ray Tune sweep of the SigLIP temperature and bias initialisation (and whether each is learned) for stage 1.

    python -m tuning.siglip_sweep --config tiny --shards DIR --out DIR --trials 8 [--search random|grid|optuna]
        [--t-init LO,HI] [--b-init LO,HI] [--learn-t both|true|false] [--learn-b both|true|false]
        [--steps 60] [--eval-every 10] [--subset 0] [--metric val_R@1] [--resume] [key=value ...]

The sweep itself is `med3dvlm.sweep`. Each trial is a Tune function trainable that runs `med3dvlm.train.driver.train(stage=1)` (the same TorchTrainer, DeepSpeed
and Ray Data path as `pipelines.train --stage 1`) on a fixed step budget, reporting validation loss and retrieval R@1
(both directions; `val_R@1` is their mean) every `--eval-every` steps, so ASHA stops weak trials early.
`--t-init` is the range of t' = log t (default log 1 .. log 100, around SigLIP's log 10); `--b-init` the bias range.
Trials run concurrently as far as the cluster's CPUs/GPUs allow. Outputs in --out (a path, or a URI such as
s3://bucket/sweep on a cluster): `best.yaml` (a config `pipelines.train --config` takes), `trials.csv` and `trials.md`,
`sweep.png`, `best-stage1/` (the best trial's export); Tune's state in `siglip-sweep/`, each trial's run in `runs/`.
"""

from __future__ import annotations

import argparse
import sys

from med3dvlm.runtime import package_version, run_cli
from med3dvlm.settings import add_flags
from med3dvlm.sweep import SweepConfig, sweep, sweep_config


def parse_args(argv) -> SweepConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("overrides", nargs="*", help="key=value training config overrides for every trial")
    add_flags(p, SweepConfig, skip=("overrides",))  # one flag per setting, with its help and default (med3dvlm.sweep)
    return sweep_config(vars(p.parse_args(argv)))


def main(argv=None):
    return sweep(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_cli(main)
