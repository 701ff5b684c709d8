"""Our DCFormer against the reference code itself (mirthAI/Med3DVLM's `src/model/encoder/dcformer.py`), side by side.

The harness takes the location of a copy of the reference repository (a work tree or a bare git mirror), extracts
the file it runs into a temporary folder and imports it from there; it is never copied into this project. The
reference imports three names from `timm` (whose own import needs a torchvision built for this torch): the harness
gives it a small stand-in for `DropPath`, `to_3tuple` and `trunc_normal_` instead of installing torchvision.

Rows: DCFormer-small forward+backward at batch 1, 1x32x256x256 (M3D's input), float32 on this CPU, the reference's
model and ours timed in interleaved rounds (median), then ours under bf16 autocast (reported separately). The ratio
names its baseline: the reference code.

Preprocessing rows (`--m3d` and/or `--preprocess`): the same synthetic M3D tree (N series of 120 PNG slices of
512x512) goes through M3D's `Data/process/m3d_cap_data_prepare.py` (32x256x256, `.npy`) and Med3DVLM's
`src/utils/m3d_cap_data_prepare_128.py` (128x256x256, `.nii.gz`), each extracted into a temporary folder and run as a
whole command with its worker count set to this machine's cores (the only edit: `Pool(processes=32)` and
`max_workers = 64`; they are read from the relative paths the scripts expect, which the harness lays out as links),
and through ours (`python -m pipelines.preprocess --config m3d|paper`), in interleaved rounds. Each command also runs
on an empty tree: its start-up and shut-down, so N / (t_N - t_empty) is the processing phase. Output agreement is
the largest |ours - theirs| over the volumes, in 1/255. The reference scripts need `unidecode` and `SimpleITK`
(not project dependencies: `pip install --target DIR unidecode SimpleITK`, then `--ref-path DIR`; or `--ref-python`).

    .venv/bin/python bench/vs_reference.py --med3dvlm /path/to/Med3DVLM [--threads 2] [--rounds 4] [--steps 2]
    .venv/bin/python bench/vs_reference.py --med3dvlm MIRROR --m3d MIRROR --preprocess --ref-path DIR [--series 24]
"""

import argparse
import importlib.util
import json
import os
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
    r = subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{rel}"], capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"error: {repo}: no {rel} (give a copy of that repository: a work tree or a git mirror)")
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


def step_flops(model, x) -> float:
    """Work of one forward+backward: 3x the forward's floating-point operations as torch's FlopCounterMode counts
    them (convolutions and matmuls; the usual estimate, the backward costing two forwards). Its count of the backward
    itself is not used: it ignores `groups` there, so a depthwise convolution's gradient counts as a dense one's."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return 3.0 * fc.get_total_flops()


def gemm_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """This machine's matmul rate (FLOP/s) at n x n x n in `dtype`: the ceiling a convolution-bound step can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def encoder_rows(a) -> dict:
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ref_mod = reference_dcformer(a.med3dvlm, Path(tmp))
        d, h, w = a.shape
        ref = ref_mod.decomp_small(input_size=(h, w, d)).train()  # its sizes are named (H, W, D)
        ours = build_dcformer("small").train()
        x = torch.rand(1, 1, *a.shape)
        diff = same_math(ref, ours, x)
        n_params = sum(p.numel() for p in ours.parameters())
        flops = {"reference": step_flops(ref, x), "ours": step_flops(ours, x)}
        peak = {"float32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
        compiled = torch.compile(ours)  # inductor's C++ kernels; same math (float rounding aside)
        step_time(compiled, x, 1)  # compiles forward and backward (tens of seconds), outside the timing
        times = {"reference": [], "ours": [], "ours_bf16": [], "ours_compiled": []}
        for _ in range(a.rounds):
            times["reference"].append(step_time(ref, x, a.steps))
            times["ours"].append(step_time(ours, x, a.steps))
            times["ours_bf16"].append(step_time(ours, x, a.steps, bf16=True))
            times["ours_compiled"].append(step_time(compiled, x, a.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [("reference (mirthAI/Med3DVLM dcformer.py), float32", med["reference"]),
            ("ours (med3dvlm.models.dcformer), float32", med["ours"]), ("ours, bf16 autocast", med["ours_bf16"]),
            ("ours, torch.compile, float32", med["ours_compiled"])]
    print(f"DCFormer-small ({n_params / 1e6:.3f} M parameters) forward+backward, batch 1, 1x{'x'.join(map(str, a.shape))}, "
          f"{a.threads} threads, torch {torch.__version__}, median of {a.rounds} interleaved rounds x {a.steps} steps; "
          f"the reference's weights loaded into ours give the same tokens within {diff:.1e} (float32)")
    print(f"work per step: {flops['reference'] / 1e9:.1f} GFLOP the reference, {flops['ours'] / 1e9:.1f} ours "
          f"(3x the forward's, FlopCounterMode); this machine's {4096}^3 matmul: {peak['float32'] / 1e9:.0f} GFLOP/s float32, "
          f"{peak['bf16'] / 1e9:.0f} bf16")
    print("| model | samples/s | x reference | GFLOP/s | of the matmul peak |\n|---|--:|--:|--:|--:|")
    for (name, sec), dt in zip(rows, ("float32", "float32", "bf16", "float32")):
        rate = flops["ours" if name.startswith("ours") else "reference"] / sec
        print(f"| {name} | {1 / sec:.3f} | {med['reference'] / sec:.2f} | {rate / 1e9:.0f} | {rate / peak[dt]:.0%} |")
    return {"threads": a.threads, "shape": list(a.shape), "max_abs_diff_same_weights": diff, "seconds_per_step": times,
            "flops_per_step": flops, "matmul_peak_flops": peak,
            "samples_per_s": {k: 1 / v for k, v in med.items()},
            "ratio_vs_reference": {k: med["reference"] / v for k, v in med.items()}}


# ---- preprocessing: the reference scripts as whole commands, beside ours --------------------------------------------

SCRIPTS = {  # config -> (repository flag, file, edits that set the worker count, output suffix, shape)
    "m3d": ("m3d", "Data/process/m3d_cap_data_prepare.py", [("Pool(processes=32)", "Pool(processes={n})")], ".npy"),
    "paper": ("med3dvlm", "src/utils/m3d_cap_data_prepare_128.py", [("max_workers = 64", "max_workers = {n}")],
              ".nii.gz"),
}
PEAK = ("import resource, runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__'); "
        "print('PEAK_MB', max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, "
        "resource.RUSAGE_CHILDREN)) / 1024)")


def lay_out_reference(config: str, raw: Path, work: Path) -> None:
    """A working folder where the reference script's relative input paths lead to `raw`'s ct_case series."""
    work.mkdir(parents=True)
    if config == "m3d":  # 'PATH/M3D_Cap/ct_case/' -> 'PATH/M3D_Cap_npy/ct_case/'
        (work / "PATH" / "M3D_Cap").mkdir(parents=True)
        (work / "PATH" / "M3D_Cap" / "ct_case").symlink_to(raw / "M3D_Cap" / "ct_case")
        return
    base = work / "data" / "M3D-Cap" / "M3D_Cap"  # './data/M3D-Cap/M3D_Cap/{ct_case,ct_quizze}' -> './data/M3D_Cap_npy'
    base.mkdir(parents=True)
    (base / "ct_case").symlink_to(raw / "M3D_Cap" / "ct_case")
    (base / "ct_quizze").mkdir()


def run_reference(a, config: str, raw: Path, work: Path) -> tuple[float, float]:
    """(seconds, peak MiB of its largest process) of one whole run of the reference script."""
    flag, rel, edits, _ = SCRIPTS[config]
    text = read_from(getattr(a, flag), rel)
    for old, new in edits:
        if old not in text:
            sys.exit(f"error: {rel}: '{old}' not found (the harness sets the worker count there)")
        text = text.replace(old, new.format(n=a.workers))
    lay_out_reference(config, raw, work)
    (work / "prepare.py").write_text(text)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [a.ref_path, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([a.ref_python, "-c", PEAK, "prepare.py"], cwd=work, env=env, capture_output=True, text=True,
                       check=False)
    sec = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"error: {rel} failed (does {a.ref_python} have unidecode, SimpleITK, monai?):\n{r.stderr[-2000:]}")
    return sec, float(r.stdout.rsplit("PEAK_MB", 1)[1])


def run_ours(config: str, raw: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak MiB of a preprocessing worker) of one whole `python -m pipelines.preprocess` command."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--config", config, "--raw", str(raw),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, check=False)
    sec = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"error: pipelines.preprocess failed:\n{r.stderr[-2000:]}")
    return sec, json.loads((out / "run.json").read_text())["figures"]["worker_peak_rss_mb"]


def agreement(config: str, ours_out: Path, ref_out: Path) -> float:
    """Largest |ours - reference| over all volumes, in units of 1/255."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "platform"))
    from med3dvlm.data.shards import read_table, volumes_from_table

    table = read_table(ours_out, columns=["volume", "source"])
    worst = 0.0
    for vol, source in zip(volumes_from_table(table), table.column("source").to_pylist()):
        case, series = Path(source).parts[-2:]
        f = ref_out / case / f"{series}{SCRIPTS[config][3]}"
        theirs = np.load(f)[0] if config == "m3d" else np.asarray(nib.load(f).dataobj).transpose(2, 1, 0)
        worst = max(worst, float(np.abs(vol / 255.0 - theirs).max()) * 255)
    return worst


def preprocess_rows(a) -> dict:
    """Per config: whole-command seconds on N series and on one (start-up, one volume, shut-down), interleaved."""
    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "bench" / "preprocess.py")
    bench_preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_preprocess)
    configs = [c for c in SCRIPTS if getattr(a, SCRIPTS[c][0])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_preprocess.make_series(tmp / "many", a.series)
        bench_preprocess.make_series(tmp / "one", 1)
        runs = {c: {k: [] for k in ("reference", "reference_1", "ours", "ours_1")} for c in configs}
        peaks = {c: {"reference": 0.0, "ours": 0.0} for c in configs}
        for r in range(a.rounds):
            for c in configs:
                for size in ("many", "one"):
                    tag = "" if size == "many" else "_1"
                    sec, peak = run_reference(a, c, tmp / size, tmp / f"ref-{c}-{size}-{r}")
                    runs[c]["reference" + tag].append(sec)
                    peaks[c]["reference"] = max(peaks[c]["reference"], peak)
                    sec, peak = run_ours(c, tmp / size, tmp / f"ours-{c}-{size}-{r}")
                    runs[c]["ours" + tag].append(sec)
                    peaks[c]["ours"] = max(peaks[c]["ours"], peak)
            print(f"round {r + 1}/{a.rounds}: " + "; ".join(
                f"{c}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in runs[c].items()) for c in configs), flush=True)
        return {c: summarise(a, c, runs[c], peaks[c],
                             agreement(c, tmp / f"ours-{c}-many-0", tmp / f"ref-{c}-many-0" / reference_out(c)))
                for c in configs}


def reference_out(config: str) -> str:
    return "PATH/M3D_Cap_npy/ct_case" if config == "m3d" else "data/M3D_Cap_npy/ct_case"


def summarise(a, config: str, runs: dict, peaks: dict, err: float) -> dict:
    med = {k: statistics.median(v) for k, v in runs.items()}
    phase = {w: (a.series - 1) / max(med[w] - med[w + "_1"], 1e-9) for w in ("reference", "ours")}
    d = {"m3d": 32, "paper": 128}[config]
    print(f"\n{config} ({d}x256x256), {a.series} series of 120x512x512 PNG slices, {a.workers} reference workers, "
          f"median of {a.rounds} interleaved rounds; max |ours - reference| {err:.2f}/255")
    print("| | whole command (s) | processing phase (vol/s) | peak MiB of the largest process |\n|---|--:|--:|--:|")
    for who, name in (("reference", SCRIPTS[config][1]), ("ours", f"pipelines.preprocess --config {config}")):
        print(f"| {name} | {med[who]:.1f} | {phase[who]:.2f} | {peaks[who]:.0f} |")
    ratio_whole, ratio_phase = med["reference"] / med["ours"], phase["ours"] / phase["reference"]
    print(f"| ours / reference | {ratio_whole:.2f}x | {ratio_phase:.2f}x | {peaks['ours'] / peaks['reference']:.2f} |")
    return {"series": a.series, "workers": a.workers, "seconds": runs, "processing_vol_per_s": phase,
            "peak_mb": peaks, "max_abs_diff_255": err, "ratio_whole": ratio_whole, "ratio_processing": ratio_phase}


def _when(row: dict) -> str:
    return f"{row['date']}, {row['machine']}" + (f", commit {row['commit']}" if row.get("commit") else "") + \
        f": `{row['command']}`"


def preprocess_markdown(result: dict) -> list[str]:
    out = []
    for key, r in sorted((kv for kv in result.items() if kv[0].startswith("preprocess_")),
                         key=lambda kv: (kv[1]["series"], kv[0])):
        config = key.split("_")[1]
        med = {k: statistics.median(v) for k, v in r["seconds"].items()}
        out += ["", f"### Preprocessing at {SHAPES[config]}, {r['series']} series, beside {SCRIPTS[config][1]}", "",
                _when(r), "",
                "| side | whole command (s) | one series: start-up + shut-down (s) | processing (volumes/s) | peak MiB |",
                "|---|--:|--:|--:|--:|"]
        for who, name in (("reference", f"the reference script ({r['workers']} workers)"),
                          ("ours", f"`pipelines.preprocess --config {config}`")):
            out.append(f"| {name} | {med[who]:.1f} | {med[who + '_1']:.1f} | {r['processing_vol_per_s'][who]:.2f} | "
                       f"{r['peak_mb'][who]:.0f} |")
        out.append(f"| ours / the reference | **{r['ratio_whole']:.2f}x** | | **{r['ratio_processing']:.2f}x** | |")
        out += ["", f"Medians of {len(r['seconds']['ours'])} interleaved rounds; outputs agree within "
                f"{r['max_abs_diff_255']:.2f}/255."]
    return out


def encoder_markdown(e: dict) -> list[str]:
    rate = {k: 1 / statistics.median(v) for k, v in e["seconds_per_step"].items()}
    out = ["", f"### DCFormer-small forward+backward, batch 1, 1x{'x'.join(map(str, e['shape']))}", "", _when(e), "",
           f"{e['flops_per_step']['ours'] / 1e9:.1f} GFLOP per step on both sides; the same weights give the same tokens "
           f"within {e['max_abs_diff_same_weights']:.1e}. The machine's 4096^3 matmul rate: "
           f"{e['matmul_peak_flops']['float32'] / 1e9:.0f} GFLOP/s float32, {e['matmul_peak_flops']['bf16'] / 1e9:.0f} bf16.",
           "", "| model | steps/s | x the reference | share of the matmul rate |", "|---|--:|--:|--:|"]
    for k, r in rate.items():
        peak = e["matmul_peak_flops"]["bf16" if "bf16" in k else "float32"]
        out.append(f"| {k} | {r:.3f} | {r / rate['reference']:.2f}x | {r * e['flops_per_step']['ours'] / peak:.0%} |")
    return out


def stage1_markdown(key: str, s: dict) -> list[str]:
    out = ["", f"### Stage 1 end to end{' (bf16)' if key.endswith('bf16') else ''}, batch {s['batch']}, "
           f"{'x'.join(map(str, s['shape']))} (`bench/vs_train_clip.py`)", "", _when(s), "",
           "| side | samples/s | ours x it |", "|---|--:|--:|"]
    for k, v in s["samples_per_s"].items():
        out.append(f"| {k} | {v:.3f} | {s['samples_per_s']['ours'] / v:.2f}x |")
    return out


SHAPES = {"m3d": "32x256x256", "paper": "128x256x256"}


def write_report(result: dict) -> Path:
    """bench/results/vs_reference.md from every row of vs_reference.json (each with its own date and command)."""
    from record import write_markdown

    lines = ["Our code beside the reference code itself (M3D's and Med3DVLM's scripts and models, run from copies of "
             "their repositories in a harness), on the same inputs and machine. What each side runs: the docstrings "
             "of `bench/vs_reference.py` and `bench/vs_train_clip.py`. Each table carries the run it came from."]
    lines += preprocess_markdown(result)
    if "encoder" in result:
        lines += encoder_markdown(result["encoder"])
    for key in ("stage1_end_to_end", "stage1_end_to_end_bf16"):
        if key in result:
            lines += stage1_markdown(key, result[key])
    return write_markdown("vs_reference", "Beside the reference code", "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--med3dvlm", type=Path, help="a copy of mirthAI/Med3DVLM (work tree or git mirror)")
    ap.add_argument("--m3d", type=Path, help="a copy of BAAI-DCAI/M3D (work tree or git mirror): preprocessing at 32 deep")
    ap.add_argument("--preprocess", action="store_true", help="the preprocessing rows (each repository given)")
    ap.add_argument("--skip-encoder", action="store_true", help="no DCFormer rows")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (encoder rows)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (the median is reported)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 256, 256), help="encoder input D H W")
    ap.add_argument("--series", type=int, default=24, help="series in the preprocessing tree")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="the reference scripts' worker count")
    ap.add_argument("--ref-python", default=sys.executable, help="interpreter for the reference scripts")
    ap.add_argument("--ref-path", help="extra import path for them (e.g. `pip install --target DIR unidecode SimpleITK`)")
    ap.add_argument("--report-only", action="store_true", help="only write vs_reference.md from vs_reference.json")
    a = ap.parse_args()
    out = ROOT / "bench" / "results" / "vs_reference.json"
    if a.report_only:
        return print(f"-> {write_report(json.loads(out.read_text()))}")
    if not (a.med3dvlm or a.m3d):
        ap.error("give --med3dvlm and/or --m3d (local copies of the reference repositories)")
    result = json.loads(out.read_text()) if out.is_file() else {}  # rows not re-run this time are kept
    result = {k: v for k, v in result.items() if k == "encoder" or k.startswith(("preprocess_", "stage1_end_to_end"))}
    from record import provenance

    common = {k: v for k, v in provenance().items() if k != "command"}
    if a.med3dvlm and not a.skip_encoder:
        result["encoder"] = {**common, "command": "python bench/vs_reference.py --med3dvlm MIRROR", **encoder_rows(a)}
    if a.preprocess:
        cmd = "python bench/vs_reference.py --med3dvlm MIRROR --m3d MIRROR --preprocess --skip-encoder " \
              f"--series {a.series} --rounds {a.rounds}"
        for config, row in preprocess_rows(a).items():  # one row per config and tree size
            result[f"preprocess_{config}_{a.series}"] = {**common, "command": cmd, **row}
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out} and {write_report(result)}")


if __name__ == "__main__":
    main()
