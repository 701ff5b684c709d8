"""Our DCFormer against the reference code itself (mirthAI/Med3DVLM's `src/model/encoder/dcformer.py`), side by side.

The harness takes the location of a copy of the reference repository (a work tree or a bare git mirror), extracts
the file it runs into a temporary folder and imports it from there; it is never copied into this project. The
reference imports three names from `timm` (whose own import needs a torchvision built for this torch): the harness
gives it a small stand-in for `DropPath`, `to_3tuple` and `trunc_normal_` instead of installing torchvision.

Rows: DCFormer-small forward+backward at batch 1, 1x32x256x256 (M3D's input), float32 on this CPU, the reference's
model and ours timed in interleaved rounds (median), then ours under bf16 autocast (reported separately). The ratio
names its baseline: the reference code.

    .venv/bin/python bench/vs_reference.py --med3dvlm /path/to/Med3DVLM [--threads 2] [--rounds 4] [--steps 2]

The preprocessing comparison of issue 19 (M3D's and Med3DVLM's data-prepare scripts) is not in this harness yet.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
from med3dvlm.models.convert import from_released  # noqa: E402
from med3dvlm.models.dcformer import build_dcformer  # noqa: E402

TIMM_STANDIN = '''"""Stand-in for the three timm names the reference DCFormer imports (written for this harness)."""
import torch
import torch.nn as nn

trunc_normal_ = torch.nn.init.trunc_normal_


def to_3tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x, x)


class DropPath(nn.Module):
    """Stochastic depth per sample; identity when drop_prob is 0 or in eval mode."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep
'''


def read_from(repo: Path, rel: str) -> str:
    """A file of the reference repository: from a work tree, else from a (bare) git mirror's HEAD."""
    if (repo / rel).is_file():
        return (repo / rel).read_text()
    r = subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{rel}"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {repo}: no {rel} (give a copy of mirthAI/Med3DVLM: a work tree or a git mirror)")
    return r.stdout


def reference_dcformer(repo: Path, tmp: Path):
    (tmp / "timm").mkdir()
    (tmp / "timm" / "__init__.py").write_text("")
    (tmp / "timm" / "layers.py").write_text(TIMM_STANDIN)
    (tmp / "ref_dcformer.py").write_text(read_from(repo, "src/model/encoder/dcformer.py"))
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("ref_dcformer", tmp / "ref_dcformer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def same_math(ref, ours, x: torch.Tensor) -> float:
    """Largest |difference| of the last stage's tokens with the reference's weights loaded into ours (train mode).

    The reference takes (B, 1, D, H, W) as ours does and permutes it to (H, W, D) inside; its tokens come out in
    (D, H, W) order, as ours do. The key mapping is `models.convert` (released checkpoints use it too)."""
    state = ref.state_dict()  # `encoder.s0...`, as in pretrained_ViT.bin
    ours.load_state_dict({k[len("vision."):]: v for k, v in from_released(state).items()})
    with torch.no_grad():
        a = ref(x)[-1]
        b = ours(x)[-1]
    return (a - b).abs().max().item()


def step_time(model, x, steps: int, bf16: bool = False) -> float:
    """Seconds per forward+backward (mean of `steps` after one warm-up)."""
    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--med3dvlm", required=True, type=Path, help="a copy of mirthAI/Med3DVLM (work tree or git mirror)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (the median is reported)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 256, 256), help="input D H W")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ref_mod = reference_dcformer(a.med3dvlm, Path(tmp))
        d, h, w = a.shape
        ref = ref_mod.decomp_small(input_size=(h, w, d)).train()  # the reference's (H, W, D) layout
        ours = build_dcformer("small").train()
        x = torch.rand(1, 1, *a.shape)
        diff = same_math(ref, ours, x)
        n_ref, n_ours = (sum(p.numel() for p in m.parameters()) for m in (ref, ours))
        times = {"reference": [], "ours": [], "ours_bf16": []}
        for _ in range(a.rounds):
            times["reference"].append(step_time(ref, x, a.steps))
            times["ours"].append(step_time(ours, x, a.steps))
            times["ours_bf16"].append(step_time(ours, x, a.steps, bf16=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [("reference (mirthAI/Med3DVLM dcformer.py), float32", n_ref, med["reference"]),
            ("ours (med3dvlm.models.dcformer), float32", n_ours, med["ours"]),
            ("ours, bf16 autocast", n_ours, med["ours_bf16"])]
    print(f"DCFormer-small forward+backward, batch 1, 1x{'x'.join(map(str, a.shape))}, {a.threads} threads, "
          f"torch {torch.__version__}, median of {a.rounds} interleaved rounds x {a.steps} steps; the reference's "
          f"weights loaded into ours give the same tokens within {diff:.1e} (float32)")
    print("| model | params (M) | samples/s | x reference |\n|---|--:|--:|--:|")
    for name, n, s in rows:
        print(f"| {name} | {n / 1e6:.3f} | {1 / s:.3f} | {med['reference'] / s:.2f} |")
    out = ROOT / "bench" / "results" / "vs_reference.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": "this project's 2-core / 24 GiB CPU box",
                               "command": "python bench/vs_reference.py --med3dvlm MIRROR", "threads": a.threads,
                               "shape": list(a.shape), "max_abs_diff_same_weights": diff, "seconds_per_step": times,
                               "samples_per_s": {k: 1 / v for k, v in med.items()},
                               "ratio_vs_reference": {k: med["reference"] / v for k, v in med.items()}}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
