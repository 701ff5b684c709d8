"""Peak memory of a serving replica for a paper-shaped export: each replica loads only its part.

The default measures real Ray Serve replicas: the app (`serve.app.build_app`, one Encoder and one Generator
replica) and beside it one replica that loads the whole VLM (`Whole`, defined here), each sent one request (encode a
volume; generate 16 tokens), then each replica's worker process found through Ray's state API and its peak and
current RSS read from /proc (VmHWM, VmRSS); each replica also counts the parameters it holds by part. Written to
bench/results/replica_memory.md. `--processes` measures plain processes that load the parts instead (the rows below).

The export: DCFormer-small + projector at the paper's 128x256x256 input, and a stand-in for Qwen2.5-7B: a Qwen2 LLM
with Qwen2.5-0.5B's shapes (24 layers, width 896, 14 heads, 2 KV heads, MLP 4864), random weights, the packaged
MiniLM vocabulary (30,523 + the image token), saved with `save_pretrained`. Each row is a fresh process that does
what a replica does: `VLM.from_pretrained(parts=...)`, then one request (encode one volume; generate 16 tokens) and
reports its peak RSS (VmHWM) beside the bytes of the weights it holds. Targets (issue 18): an Encoder within its
weights + 1 GiB, a Generator within its weights + 1.5 GiB. "before" rows load the way this project did until
2026-11-28 (a randomly initialised model, then a whole state dict copied in), for comparison.

    .venv/bin/python bench/replica_memory.py [--work /tmp/replica-mem] [--threads 2]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))  # serve.app
GiB = 1 << 30


def build_export(work: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.initialization import no_init_weights

    from med3dvlm.config import load_config
    from med3dvlm.models.prompt import vlm_tokenizer
    from med3dvlm.models.vlm import VLM

    export = work / "export"
    if (export / "model.safetensors").is_file():
        return export
    tok = vlm_tokenizer("tiny-qwen2")  # the packaged MiniLM vocabulary + <im_patch>
    hf = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                     tie_word_embeddings=False)
    with no_init_weights():
        llm = AutoModelForCausalLM.from_config(hf)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():
            p.normal_(0, 0.02, generator=g)
    llm.save_pretrained(work / "llm")
    tok.save_pretrained(work / "llm")
    del llm
    cfg = load_config("paper", [f"model.llm={work / 'llm'}", "model.encoder=small"])
    vlm = VLM.from_config(cfg.model, cfg.data.shape)
    vlm.data = {"shape": list(cfg.data.shape), "window": list(cfg.data.window), "window_mode": cfg.data.window_mode}
    vlm.save_pretrained(export)
    return export


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM): unlike ru_maxrss, it does not carry the parent's peak across the
    fork and exec that start a child (which had made every row read the export builder's 2.2 GiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def replica(export: str, part: str, dtype: str, how: str, threads: int) -> dict:
    """One replica's load and one request, in this (fresh) process."""
    import torch

    from med3dvlm.models.vlm import VLM

    torch.set_num_threads(threads)
    base = peak_rss()
    dt = getattr(torch, dtype)
    t = time.perf_counter()
    vlm = VLM.from_pretrained(export, parts=(part,), dtype=dt) if how == "now" else before(export, part, dt)
    load_s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in vlm.parameters())
    with torch.no_grad():
        t = time.perf_counter()
        if part == "vision":
            vlm.encode_images(torch.rand(1, 1, *vlm.input_shape, dtype=dt))
        else:
            feats = torch.randn(1, vlm.cfg.image_tokens, vlm.llm.config.hidden_size, dtype=dt)
            vlm.generate_from_features(feats, ["Describe the findings of this CT scan."], max_new_tokens=16,
                                       min_new_tokens=16)
        request_s = time.perf_counter() - t
    peak = peak_rss()
    return {"anon_rss_after_gib": status_bytes("RssAnon") / GiB, "file_rss_after_gib": status_bytes("RssFile") / GiB,
            "weights_gib": weights / GiB, "peak_rss_gib": peak / GiB, "over_weights_gib": (peak - weights) / GiB,
            "imports_rss_gib": base / GiB, "load_s": load_s, "request_s": request_s}


def before(export: str, part: str, dtype):
    """The loading this project did before: build (random init), read the whole part's state, load, cast."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from med3dvlm.config import config_from_dict
    from med3dvlm.models.export import load_state, read_meta
    from med3dvlm.models.vlm import VLM

    path = Path(export)
    meta = read_meta(path)
    cfg = config_from_dict({"model": meta["model"]}).model
    tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    llm_cfg = AutoConfig.from_pretrained(path / "llm", local_files_only=True)
    llm = AutoModelForCausalLM.from_config(llm_cfg) if part == "llm" else None
    model = VLM(cfg, llm, tok, tuple(meta["input_shape"]), meta.get("data"), with_vision=part == "vision",
                llm_width=llm_cfg.hidden_size)
    model.load_state_dict(load_state(path, ("llm.",) if part == "llm" else ("vision.", "projector.")), strict=True)
    return model.to(dtype)


ROWS = [("Encoder", "vision", "float32", "now", 1.0), ("Encoder", "vision", "float32", "before", 1.0),
        ("Generator", "llm", "float32", "now", 1.5), ("Generator", "llm", "bfloat16", "now", 1.5),
        ("Generator", "llm", "float32", "before", 1.5)]


def proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 / GiB for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS")}


def serve_rows(export: Path, threads: int) -> list[dict]:
    """One request to each real replica, then each replica's worker process measured (found by Ray's state API)."""
    import numpy as np
    from ray import serve
    from ray.util.state import list_actors

    from med3dvlm.runtime import init_ray
    from serve.app import build_app
    from serve.deployments import held

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Whole:
        """The whole VLM in one replica (what the app's split into Encoder and Generator avoids)."""

        def __init__(self, path: str):
            import torch

            from med3dvlm.models.vlm import VLM

            torch.set_num_threads(threads)
            self.vlm = VLM.from_pretrained(path).eval()

        def ask(self, volume):
            import torch

            from med3dvlm.data.transform import to_float

            with torch.no_grad():
                feats = self.vlm.encode_images(to_float(torch.from_numpy(volume[None])).unsqueeze(1))
                return self.vlm.generate_from_features(feats, [PROMPT], 16)

        def held(self):
            return held(self.vlm)

    import socket

    init_ray()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(export), "replicas": 1, "ingress_replicas": 1, "replica_cpus": 0.5}),
              name="mem", route_prefix="/mem")
    serve.run(Whole.bind(str(export)), name="whole", route_prefix="/whole")
    vol = np.random.default_rng(0).integers(0, 256, (128, 256, 256), dtype=np.uint8)
    enc, gen = (serve.get_deployment_handle(d, app_name="mem") for d in ("Encoder", "Generator"))
    tokens = enc.encode.remote(vol).result(timeout_s=600)
    gen.generate.remote({"tokens": tokens, "prompt": PROMPT, "max_new_tokens": 16, "temperature": 0.0,
                         "top_p": None}).result(timeout_s=600)
    whole = serve.get_deployment_handle("Whole", app_name="whole")
    whole.ask.remote(vol).result(timeout_s=600)
    holds = {"Encoder": enc.held.remote().result(), "Generator": gen.held.remote().result(),
             "Whole": whole.held.remote().result()}
    actors = {a.class_name.rsplit(":", 1)[-1]: a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
              if a.class_name.startswith("ServeReplica:")}
    rows = []
    for name, h in holds.items():
        assert actors[name] == h["pid"], (name, actors[name], h["pid"])  # the state API's process is the replica's
        weights = sum(h["parameters"].values()) * 4 / GiB  # float32
        st = proc_status(h["pid"])
        rows.append({"replica": name, "pid": h["pid"], "parameters": h["parameters"], "weights_gib": weights,
                     "peak_rss_gib": st["VmHWM"], "rss_gib": st["VmRSS"], "over_weights_gib": st["VmHWM"] - weights})
    serve.shutdown()
    return rows


PROMPT = "Describe the findings of this CT scan."


def serve_main(export: Path, threads: int) -> None:
    from record import write_markdown

    rows = serve_rows(export, threads)
    lines = ["Real Ray Serve replicas, float32, one request each (encode one 128x256x256 volume; generate 16 tokens); "
             "each replica's worker process found through Ray's state API (`ray.util.state.list_actors`), its memory "
             "read from /proc. The export: DCFormer-small + projector at 128x256x256 and a Qwen2 LLM with "
             "Qwen2.5-0.5B's shapes (random weights; a stand-in for Qwen2.5-7B, whose weights would add 28 GiB in "
             "float32 to the Generator and the whole-VLM replica alike).", "",
             "| replica | parameters it holds, by part | weights (GiB) | peak RSS (GiB) | RSS after (GiB) | peak over "
             "weights (GiB) |", "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        parts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sorted(r["parameters"].items()))
        lines.append(f"| {r['replica']} | {parts} | {r['weights_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['rss_gib']:.2f} | {r['over_weights_gib']:.2f} |")
    by = {r["replica"]: r for r in rows}
    split = by["Encoder"]["peak_rss_gib"] + by["Generator"]["peak_rss_gib"]
    lines += ["", f"The Encoder holds no LLM parameter and the Generator no DCFormer or projector parameter. An "
              f"Encoder replica peaks at {by['Encoder']['peak_rss_gib']:.2f} GiB against the whole VLM's "
              f"{by['Whole']['peak_rss_gib']:.2f} GiB: scaling encoders out costs "
              f"{by['Encoder']['peak_rss_gib'] / by['Whole']['peak_rss_gib']:.0%} of the memory a whole-VLM replica "
              f"would (Encoder + Generator together: {split:.2f} GiB)."]
    print("\n".join(lines))
    print(f"-> {write_markdown('replica_memory', 'Serving replicas: memory of each', chr(10).join(lines))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/replica-mem")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", action="store_true", help="plain processes that load the parts (the older rows)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(replica(*a.child, a.threads)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    export = build_export(work)
    print(f"export {export}: {(export / 'model.safetensors').stat().st_size / GiB:.2f} GiB of tensors "
          f"(built in {time.perf_counter() - t:.0f} s)")
    if not a.processes:
        return serve_main(export, a.threads)
    rows = []
    for name, part, dtype, how, allowance in ROWS:
        out = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--child", str(export), part,
                              dtype, how], capture_output=True, text=True, check=True).stdout
        r = {"replica": name, "part": part, "dtype": dtype, "loading": how, "allowance_gib": allowance,
             **json.loads(out.strip().splitlines()[-1])}
        r["within"] = r["over_weights_gib"] <= allowance
        rows.append(r)
        print(f"{name:9} {dtype:8} {how:6}: weights {r['weights_gib']:.2f} GiB, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(+{r['over_weights_gib']:.2f} over the weights; allowance {allowance} GiB: "
              f"{'within' if r['within'] else 'OVER'}), after the request anonymous {r['anon_rss_after_gib']:.2f} GiB + "
              f"file-backed {r['file_rss_after_gib']:.2f} GiB, load {r['load_s']:.1f} s, request {r['request_s']:.1f} s")
    res = {"date": time.strftime("%Y-%m-%d"), "machine": "this project's 2-core / 24 GiB CPU box",
           "command": "python bench/replica_memory.py", "export": "DCFormer-small 128x256x256 + Qwen2 (0.5B shapes, "
           "30,524-token vocabulary, untied head), random weights", "rows": rows}
    out = ROOT / "bench" / "results" / "replica_memory.json"
    out.write_text(json.dumps({**provenance(), **res}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
