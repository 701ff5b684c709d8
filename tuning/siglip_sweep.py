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
import math
import sys

from med3dvlm.runtime import package_version, run_cli
from med3dvlm.sweep import check_args, sweep  # noqa: F401  (sweep: this command's library call)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("--config", default="tiny", help="preset (tiny, m3d, paper) or a YAML file: each trial's base")
    p.add_argument("--shards", required=True, help="preprocessed shards (path or URI) with a validation split")
    p.add_argument("--out", default="out/sweep", help="where trials, best.yaml and the plots go (path or URI)")
    p.add_argument("--trials", type=int, default=8, help="number of trials")
    p.add_argument("--search", default="random", choices=["random", "grid", "optuna"], help="search algorithm")
    p.add_argument("--t-init", default=f"0,{math.log(100):.4f}", help="range of t' = log t")
    p.add_argument("--b-init", default="-15,0", help="range of the bias b")
    p.add_argument("--learn-t", default="both", choices=["both", "true", "false"], help="t learned, fixed or both")
    p.add_argument("--learn-b", default="both", choices=["both", "true", "false"], help="b learned, fixed or both")
    p.add_argument("--steps", type=int, default=60, help="training steps per trial")
    p.add_argument("--eval-every", type=int, default=10, help="steps between validation reports (ASHA's rungs)")
    p.add_argument("--subset", type=int, default=0, help="train each trial on the first N training volumes (0: all)")
    p.add_argument("--metric", default="val_R@1", choices=["val_R@1", "val_loss"])
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period, in validation reports")
    p.add_argument("--max-steps-total", type=int, default=0, help="refuse sweeps over this many steps in all (0: no cap)")
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep in --out; finished trials stay")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every trial")
    return check_args(p.parse_args(argv))


def main(argv=None):
    return sweep(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_cli(main)
