"""Inference speed of the DCFormer with BatchNorm folded into its convolutions (what the Serve Encoder runs).

DCFormer-small, eval mode, forward only at batch 1, the unfolded and the folded model timed in interleaved rounds
(median); also the largest relative difference of their tokens.

    .venv/bin/python bench/fold_bn.py [--shape 128 256 256] [--threads 2] [--rounds 4]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from med3dvlm.models.dcformer import build_dcformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plain = build_dcformer("small").eval()
    folded = copy.deepcopy(plain).fold_batchnorm()
    x = torch.rand(1, 1, *a.shape)
    times = {"unfolded": [], "folded": []}
    with torch.no_grad():
        plain(x), folded(x)
        for _ in range(a.rounds):
            for name, m in (("unfolded", plain), ("folded", folded)):
                t = time.perf_counter()
                out = m(x)
                times[name].append(time.perf_counter() - t)
                if name == "unfolded":
                    ref = out
        diff = max(((u - v).abs().max() / u.abs().max()).item() for u, v in zip(ref, out))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DCFormer-small forward, 1x{'x'.join(map(str, a.shape))}, {a.threads} threads, median of {a.rounds}: "
          f"unfolded {med['unfolded']:.3f} s, folded {med['folded']:.3f} s: {med['unfolded'] / med['folded']:.2f}x; "
          f"tokens within {diff:.1e} relative")


if __name__ == "__main__":
    main()
