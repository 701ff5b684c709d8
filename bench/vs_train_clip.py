"""Stage 1 end to end beside Med3DVLM's own `train_clip` path: the data feed, both towers and the SigLIP loss, on the
same PNG series, on this machine.

The reference side runs mirthAI/Med3DVLM's own code, extracted from a copy of the repository into a temporary folder
(never into this project): its preprocessing script (`src/utils/m3d_cap_data_prepare_128.py`, float32 `.nii.gz` at
128x256x256), its `CLIPDataset` (SimpleITK reads a `.nii.gz` per sample per epoch, MONAI augments it in float32, the
report is tokenised to `max_length` 512) in a torch `DataLoader`, and its `DEC_CLIP` model (DCFormer-small, a
ClinicalBERT-shaped text tower, its sigmoid loss). What the harness writes itself: the batch collation (the three
`torch.cat`s of its `DataCollator`, which lives in `train_clip.py` beside a `wandb` import) and the step loop in place
of the Hugging Face `Trainer`'s, in two forms (`--their-engine`): `deepspeed` is what `scripts/train_clip.sh` runs, the
Trainer's default optimizer (lr 1e-4, weight decay 0.1, its decay groups) in DeepSpeed ZeRO-2 from the copy's own
`scripts/zero2.json`, its "auto"s filled by transformers' `HfTrainerDeepSpeedConfig` (one process, gloo); `plain` is a
bare torch AdamW loop (no DeepSpeed, no fp32 master weights under bf16). The text tower on both sides is one random
DistilBERT-base (ClinicalBERT's architecture: 6 layers, width 768; no network here) saved with `save_pretrained`, with
the packaged MiniLM's uncased WordPiece vocabulary.

Our side is the whole stage-1 command, `python -m pipelines.train --stage 1 --config paper` on a local Ray (one CPU
worker, ZeRO-2 on gloo), on shards that `pipelines.preprocess --config paper` made from the same series. Both sides
are timed per step (data wait included) after warm-up steps; samples/s is the median. Needs `unidecode` and
`SimpleITK` for the reference (`pip install --target DIR unidecode SimpleITK`, then `--ref-path DIR`).

    .venv/bin/python bench/vs_train_clip.py --med3dvlm MIRROR --ref-path DIR [--series 16] [--batch 2] [--steps 8]
        [--their-engine deepspeed plain] [--bf16] [--rounds 2]
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

REPORT = ("The liver is normal in size with a small hypodense lesion in the right lobe. The spleen, pancreas and "
          "kidneys are unremarkable. No free fluid. ") * 6  # ~170 tokens: both sides pad to 512

ENGINES = {"deepspeed": "its recipe: HF Trainer's AdamW in DeepSpeed ZeRO-2, zero2.json",
           "plain": "a bare torch AdamW loop"}

THEIR_LOOP = r'''
import json, statistics, sys, time
from types import SimpleNamespace
import torch
from transformers import AutoTokenizer
from src.dataset.clip_dataset import CLIPDataset
from src.model.CLIP import DEC_CLIP, DEC_CLIPConfig

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a["text"])
data = CLIPDataset(SimpleNamespace(data_root=a["data_root"], cap_data_path=a["cap"], max_length=512), tok, "train")
model = DEC_CLIP(DEC_CLIPConfig(language_model_name_or_path=a["text"], input_size=tuple(a["input_size"]),
                                hidden_size=768, loss_type="sigmoid", vision_encoder="dcformer")).train()
dtype = torch.bfloat16 if a["bf16"] else torch.float32
model = model.to(dtype)  # --bf16: its recipe's DeepSpeed bf16 (module and images in bf16); float32 also casts the
# two float64 scalars (t_prime, bias) it makes from numpy, which ZeRO would otherwise flatten with every weight


def deepspeed_engine(model):
    """What `scripts/train_clip.sh` runs: HF Trainer fills the "auto"s of its `zero2.json` and builds its default
    optimizer with weight-decay groups, and DeepSpeed wraps both (one process, gloo, as ours on a CPU worker)."""
    import importlib, os
    import deepspeed
    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a["port"]), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    args = TrainingArguments(a["out"], per_device_train_batch_size=a["batch"], learning_rate=1e-4, weight_decay=0.1,
                             bf16=a["bf16"], use_cpu=True, report_to=[])
    hf = HfTrainerDeepSpeedConfig(json.loads(a["zero2"]))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model, a["steps"])
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if (n in decay) == d and p.requires_grad],
               "weight_decay": args.weight_decay if d else 0.0} for d in (True, False)]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build on CPU (as ours)
    deepspeed.init_distributed("gloo")
    # One process: rank 0's start-up broadcast to itself moves nothing, and this DeepSpeed's `view(uint8)` refuses
    # the 0-dim float64 t_prime and bias its DEC_CLIP makes from numpy scalars.
    deepspeed.runtime.engine.DeepSpeedEngine._broadcast_model = lambda self: None
    engine, *_ = deepspeed.initialize(model=model, optimizer=cls(groups, **kwargs), config=hf.config)
    return engine


if a["engine"] == "deepspeed":
    engine = deepspeed_engine(model)
    forward, backward, step = engine, engine.backward, engine.step
else:  # a plain loop: module and images in bf16 under --bf16, torch AdamW on the module's parameters
    forward = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    backward = lambda loss: loss.backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

def collate(batch):  # what its DataCollator does on one process
    cat = lambda k: torch.cat([b[k].unsqueeze(0) for b in batch])
    return {"images": cat("image").to(dtype), "input_ids": cat("input_id"), "attention_mask": cat("attention_mask"),
            "labels": torch.arange(len(batch))}

loader = torch.utils.data.DataLoader(data, batch_size=a["batch"], shuffle=True, num_workers=a["workers"],
                                     collate_fn=collate, drop_last=True, persistent_workers=True)
times, t = [], time.perf_counter()
while len(times) < a["steps"]:
    for b in loader:
        backward(forward(**b)["loss"])
        step()
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if len(times) >= a["steps"]:
            break
print("STEP_SECONDS", json.dumps(times))
'''


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_tree(raw: Path, n: int) -> None:
    """The bench's PNG series, each case with the report both sides train on, all listed as training data."""
    train = []
    for folder in load_bench("preprocess").make_series(raw, n):
        (folder.parent / "text.txt").write_text(f"study_findings: {REPORT}\n")
        rel = folder.relative_to(raw / "M3D_Cap")
        train.append({"image": f"M3D_Cap_npy/{rel}.npy", "text": f"M3D_Cap_npy/{rel.parent}/text.txt"})
    (raw / "M3D_Cap.json").write_text(json.dumps({"train": train}))


def text_tower(out: Path) -> None:
    """A random DistilBERT-base (ClinicalBERT's architecture) with the packaged uncased WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from med3dvlm.models.clip import minilm_path

    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig()).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)


def reference_data(a, vs, raw: Path, work: Path) -> tuple[Path, Path]:
    """Their preprocessing of the series, then the caption list their `CLIPDataset` reads."""
    vs.run_reference(argparse.Namespace(med3dvlm=a.med3dvlm, workers=a.threads, ref_python=sys.executable,
                                        ref_path=a.ref_path), "paper", raw, work)
    data_root = work / "data"
    train = []
    for f in sorted((data_root / "M3D_Cap_npy" / "ct_case").glob("*/*.nii.gz")):
        (f.parent / "report.txt").write_text(REPORT)
        train.append({"image": str(f.relative_to(data_root)),
                      "text": str((f.parent / "report.txt").relative_to(data_root))})
    cap = data_root / "cap.json"
    cap.write_text(json.dumps({"train": train, "validation": train[:1]}))
    return data_root, cap


def reference_code(a, vs, code: Path) -> Path:
    """The reference files the loop imports, extracted from the copy of the repository, with the timm stand-in."""
    (code / "timm").mkdir(parents=True)
    (code / "timm" / "__init__.py").write_text("")
    (code / "timm" / "layers.py").write_text(vs.TIMM_STANDIN)
    for rel in ("src/dataset/clip_dataset.py", "src/model/CLIP.py", "src/model/encoder/dcformer.py",
                "src/model/encoder/vit.py", "src/model/projector/mlp.py"):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(vs.read_from(a.med3dvlm, rel))
    return code


def run_theirs(a, vs, engine: str, code: Path, data_root: Path, cap: Path, text: Path) -> list[float]:
    d, h, w = a.shape
    args = {"threads": a.threads, "text": str(text), "data_root": str(data_root), "cap": str(cap), "batch": a.batch,
            "workers": a.threads, "steps": a.steps, "input_size": [h, w, d], "bf16": a.bf16, "engine": engine,
            "zero2": vs.read_from(a.med3dvlm, "scripts/zero2.json"), "port": load_bench("serve").free_port(),
            "out": str(code / "trainer-out")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), a.ref_path]))}
    r = subprocess.run([sys.executable, "-c", THEIR_LOOP, json.dumps(args)], cwd=code, env=env, capture_output=True,
                       text=True, check=False)
    if r.returncode:
        sys.exit(f"error: the reference's train_clip path failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.rsplit("STEP_SECONDS", 1)[1])


def run_ours(a, raw: Path, work: Path, text: Path) -> list[float]:
    shards, out = work / "shards", work / "ckpt"
    for cmd in (["pipelines.preprocess", "--config", "paper", "--raw", str(raw), "--out", str(shards),
                 f"data.shape={list(a.shape)}"],
                ["pipelines.train", "--stage", "1", "--config", "paper", "--shards", str(shards), "--out", str(out),
                 "train.use_gpu=false", "train.num_workers=1", f"train.cpus_per_worker={a.threads}",
                 f"train.stage1.batch_size={a.batch}", f"train.stage1.max_steps={a.steps}", "train.eval_every=0",
                 f"model.text_encoder={text}", f"data.shape={list(a.shape)}", f"train.bf16_cpu={a.bf16}"]):
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode:
            sys.exit(f"error: {cmd[0]} failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
    history = json.loads((out / "stage1" / "history.json").read_text())
    return [a.batch / h["samples_per_s"] for h in history]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--med3dvlm", type=Path, required=True, help="a copy of mirthAI/Med3DVLM (work tree or git mirror)")
    ap.add_argument("--ref-path", help="extra import path for the reference (unidecode, SimpleITK)")
    ap.add_argument("--series", type=int, default=16, help="PNG series (120 slices of 512x512): one epoch of steps")
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="D H W (both sides)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--their-engine", nargs="+", choices=ENGINES, default=list(ENGINES),
                    help="how the reference steps: `deepspeed` as its scripts/train_clip.sh (HF Trainer's optimizer "
                    "in DeepSpeed ZeRO-2 from its zero2.json), `plain` a bare torch AdamW loop")
    ap.add_argument("--bf16", action="store_true", help="both sides in bf16: theirs as its recipe's `--bf16 True` "
                    "(DeepSpeed bf16: module and images in bf16), ours with train.bf16_cpu=true (autocast)")
    a = ap.parse_args()
    from med3dvlm.runtime import apply_env_defaults

    apply_env_defaults()
    vs = load_bench("vs_reference")
    runs = {**{f"reference_{e}": [] for e in a.their_engine}, "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tree(tmp / "raw", a.series)
        text_tower(tmp / "text")
        data_root, cap = reference_data(a, vs, tmp / "raw", tmp / "ref")
        code = reference_code(a, vs, tmp / "ref-code")
        for r in range(a.rounds):  # each round: both sides afresh (their loop, our whole command)
            for e in a.their_engine:
                runs[f"reference_{e}"].append(run_theirs(a, vs, e, code, data_root, cap, tmp / "text"))
            runs["ours"].append(run_ours(a, tmp / "raw", tmp / f"ours-{r}", tmp / "text"))
            print(f"round {r + 1}: " + ", ".join(f"{k} {a.batch / statistics.median(v[-1][a.warmup:]):.3f} samples/s"
                                                 for k, v in runs.items()), flush=True)
    rate = {k: a.batch / statistics.median([s for run in v for s in run[a.warmup:]]) for k, v in runs.items()}
    print(f"\nstage 1 end to end, {'bf16' if a.bf16 else 'float32'}, DCFormer-small + DistilBERT-base (random), "
          f"{'x'.join(map(str, a.shape))}, batch {a.batch}, {a.threads} threads, median step after {a.warmup} "
          f"warm-up steps, {a.rounds} round(s)")
    print("| | samples/s |\n|---|--:|")
    for e in a.their_engine:
        print(f"| Med3DVLM's train_clip path (CLIPDataset + DEC_CLIP, {ENGINES[e]}) | {rate[f'reference_{e}']:.3f} |")
    print(f"| ours (pipelines.train --stage 1 --config paper, 1 CPU worker, ZeRO-2) | {rate['ours']:.3f} |")
    ratio = {e: rate["ours"] / rate[f"reference_{e}"] for e in a.their_engine}
    for e, r in ratio.items():
        print(f"| ours / reference ({e}) | {r:.2f}x |")
    out = ROOT / "bench" / "results" / "vs_reference.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    key = "stage1_end_to_end" + ("_bf16" if a.bf16 else "")
    from record import provenance
    from vs_reference import write_report

    result[key] = {**provenance(), "shape": list(a.shape), "batch": a.batch, "step_seconds": runs,
                   "samples_per_s": rate, "ratio": ratio}
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out} and {write_report(result)}")


if __name__ == "__main__":
    main()
