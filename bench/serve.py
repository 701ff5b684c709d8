"""Serving latency and throughput at the tiny config: p50/p95 and requests/s for /v1/retrieve and /v1/report with 1
and 2 Encoder+Generator replicas, beside the encoder's bare forward time (in-process, batch 1).

Uses the demo's models (run `make demo` first) or --model/--clip/--index. Load: --clients threads, --requests each.

    .venv/bin/python bench/serve.py [--clients 8] [--requests 48] [--new-tokens 32]
"""

import argparse
import concurrent.futures as cf
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(fn, n: int, clients: int) -> dict:
    lat = []

    def one(i):
        t = time.perf_counter()
        r = fn(i)
        lat.append(time.perf_counter() - t)
        return r.status_code

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        codes = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t
    q = statistics.quantiles(lat, n=20)
    return {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * q[18], "req_per_s": n / wall,
            "non_200": sum(c != 200 for c in codes)}


def bare_encoder(model: str, reps: int = 10) -> float:
    import torch

    from med3dvlm.models.vlm import VLM

    torch.set_num_threads(1)
    vlm = VLM.from_pretrained(model).eval()
    x = torch.rand(1, 1, *vlm.input_shape)
    with torch.no_grad():
        vlm.encode_images(x)
        t = time.perf_counter()
        for _ in range(reps):
            vlm.encode_images(x)
    return 1000 * (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "out/demo/ckpt/stage3"))
    p.add_argument("--clip", default=str(ROOT / "out/demo/ckpt/stage1"))
    p.add_argument("--index", default=str(ROOT / "out/demo/shards"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT / "tests"))
    from med3dvlm.runtime import init_ray
    from serve.app import build_app
    from uploads import nifti_bytes, volume

    enc_ms = bare_encoder(a.model)
    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    rows = []
    for replicas in (1, 2):
        serve.run(build_app({"model": a.model, "clip": a.clip, "index": a.index, "replicas": replicas,
                             "replica_cpus": 0.5}), name="bench", route_prefix="/")
        vid = requests.post(base + "/v1/upload", files={"file": ("s.nii.gz", nifti_bytes(volume((40, 96, 96))))},
                            timeout=120).json()["volume_id"]
        retrieve = load(lambda i: requests.post(base + "/v1/retrieve", data={"text": f"lesion in the liver {i}", "k": 5},
                                                timeout=300), a.requests, a.clients)
        report = load(lambda i: requests.post(base + "/v1/report", data={"volume_id": vid, "max_new_tokens": a.new_tokens},
                                              timeout=300), a.requests, a.clients)
        rows += [{"endpoint": "/v1/retrieve", "replicas": replicas, **retrieve},
                 {"endpoint": "/v1/report", "replicas": replicas, **report}]
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    print(f"\nServing, tiny config, {a.clients} concurrent clients x {a.requests} requests, report "
          f"max_new_tokens={a.new_tokens}; encoder bare forward (batch 1, 1 thread): {enc_ms:.1f} ms")
    print("| endpoint | Encoder+Generator replicas | p50 ms | p95 ms | req/s | vs 1 replica | non-200 |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        base_r = next(x for x in rows if x["endpoint"] == r["endpoint"] and x["replicas"] == 1)
        print(f"| {r['endpoint']} | {r['replicas']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['req_per_s']:.2f} | "
              f"{r['req_per_s'] / base_r['req_per_s']:.2f}x | {r['non_200']} |")
    out = ROOT / "bench" / "results" / "serve.json"
    out.write_text(json.dumps({"args": vars(a), "encoder_bare_ms": enc_ms, "rows": rows}, indent=1))
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
