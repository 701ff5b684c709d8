"""Write synthetic data in the exact M3D layout (PNG slice folders, text.txt, M3D_Cap.json, VQA CSVs).

    python -m pipelines.make_synthetic --out /tmp/m3d --cases 40 [--bad] [--seed 0] [--shape 40 48 64]
"""

from __future__ import annotations

import argparse
import sys

from med3dvlm.data.synthetic import BAD_INPUTS, write_m3d_tree
from med3dvlm.runtime import UserError, package_version, run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=package_version())
    p.add_argument("--out", required=True, help="folder to write the M3D-layout tree into")
    p.add_argument("--cases", type=int, default=40, help="patients (each with one or more series)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same tree)")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 48, 64), metavar=("Z", "Y", "X"),
                   help="canonical body grid; axial series have Z slices of YxX")
    p.add_argument("--bad", action="store_true", help=f"also plant bad inputs: {', '.join(BAD_INPUTS)}")
    args = p.parse_args(argv)
    if args.cases < 1:
        raise UserError(f"--cases {args.cases}: at least 1")
    if min(args.shape) < 8 or max(args.shape) > 1024:
        raise UserError(f"--shape {' '.join(map(str, args.shape))}: each side 8-1024")
    try:
        counts = write_m3d_tree(args.out, cases=args.cases, seed=args.seed, shape=tuple(args.shape), bad=args.bad)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {counts['volumes']} volumes of {counts['cases']} cases, {counts['qa']} questions"
          f"{', ' + str(counts['planted_bad']) + ' bad inputs' if args.bad else ''} -> {args.out}")
    return counts


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
