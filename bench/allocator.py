"""A training step under glibc's default allocator and under the one Ray Train's workers get
(`med3dvlm.runtime.KEEP_FREED_MEMORY`: one arena, no mmap for large blocks, no trim).

Each side is a fresh process running DCFormer-small forward+backward and an AdamW step at the paper's shape (batch 2,
128x256x256 by default) in a thread, as Ray Train runs the loop; the baseline is the same process with glibc's
defaults. Prints seconds per step (median after a warm-up step), page faults and kernel time per step, peak RSS, and
the ratio.

    .venv/bin/python bench/allocator.py [--shape 128 256 256] [--batch 2] [--steps 3] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

STEP = r"""
import json, resource, statistics, sys, threading, time
import torch
sys.path.insert(0, sys.argv[2])
from med3dvlm.models.dcformer import build_dcformer

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
out = {}

def run():
    torch.manual_seed(0)
    model = build_dcformer("small").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(a["batch"], 1, *a["shape"])

    def step():
        model(x)[-1].float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(a["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(step_s=statistics.median(times), faults=(r1.ru_minflt - r0.ru_minflt) / a["steps"],
               sys_s=(r1.ru_stime - r0.ru_stime) / a["steps"], peak_rss_mb=r1.ru_maxrss / 1024)

t = threading.Thread(target=run)
t.start()
t.join()
print("RESULT", json.dumps(out))
"""


def measure(args: dict, malloc: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", STEP, json.dumps(args), str(ROOT / "platform")], env={**env, **malloc},
                       capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"error: the step failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.rsplit("RESULT", 1)[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="D H W")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="default bench/results/allocator.md")
    a = ap.parse_args()
    from med3dvlm.runtime import KEEP_FREED_MEMORY

    args = {"shape": a.shape, "batch": a.batch, "steps": a.steps, "threads": a.threads}
    ours = "the workers' settings (KEEP_FREED_MEMORY)"
    rows = {"glibc defaults": measure(args, {}), ours: measure(args, KEEP_FREED_MEMORY)}
    lines = [f"DCFormer-small fwd+bwd + AdamW, batch {a.batch}, {'x'.join(map(str, a.shape))}, {a.threads} threads, "
             f"in a thread; median of {a.steps} steps.", "",
             "| allocator | s/step | page faults/step | kernel s/step | peak RSS (MB) |", "|---|--:|--:|--:|--:|"]
    lines += [f"| {name} | {r['step_s']:.2f} | {r['faults']:,.0f} | {r['sys_s']:.2f} | {r['peak_rss_mb']:,.0f} |"
              for name, r in rows.items()]
    lines += ["", f"Speed-up against glibc's defaults (the baseline): "
              f"{rows['glibc defaults']['step_s'] / rows[ours]['step_s']:.2f}x."]
    print("\n".join(lines))
    sys.path.insert(0, str(Path(__file__).parent))
    from record import write_markdown

    print(f"-> {write_markdown('allocator', 'The train workers allocator settings', chr(10).join(lines), Path(a.results) if a.results else None)}")


if __name__ == "__main__":
    main()
