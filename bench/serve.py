"""Serving latency and throughput at the tiny config: p50/p95 and requests/s for /v1/retrieve and /v1/report with 1
and 2 Encoder+Generator replicas, time to first token of streamed reports beside their whole latency, and a stepped
load on an autoscaled app (Generator replicas over time, throughput vs 1 fixed replica), beside the encoder's bare
forward time (in-process, batch 1).

Uses the demo's models (run `make demo` first) or --model/--clip/--index. Load: --clients threads, --requests each;
the stepped load holds each of --steps client counts for --step-s seconds.

    .venv/bin/python bench/serve.py [--clients 8] [--requests 48] [--new-tokens 32] [--steps 1,8,16] [--step-s 30]
"""

import argparse
import concurrent.futures as cf
import socket
import statistics
import sys
import time
from pathlib import Path

import requests
import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_results  # noqa: E402

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


def first_token(base: str, vid: str, new_tokens: int):
    """A streamed report: (status, seconds to its first piece, seconds to its end)."""
    t = time.perf_counter()
    with requests.post(base + "/v1/report", data={"volume_id": vid, "max_new_tokens": new_tokens, "stream": "true"},
                       stream=True, timeout=300) as r:
        ttft = None
        for line in r.iter_lines():
            if ttft is None and line.startswith(b"data: "):
                ttft = time.perf_counter() - t
    return r.status_code, ttft, time.perf_counter() - t


def load_stream(base: str, vid: str, new_tokens: int, n: int, clients: int) -> dict:
    with cf.ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(lambda _: first_token(base, vid, new_tokens), range(n)))
    ttft, whole = [x[1] for x in res if x[1] is not None], [x[2] for x in res]
    return {"ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p95_ms": 1000 * statistics.quantiles(ttft, n=20)[18],
            "whole_p50_ms": 1000 * statistics.median(whole), "non_200": sum(x[0] != 200 for x in res)}


def running(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["Generator"].replica_states
    return sum(n for st, n in states.items() if str(getattr(st, "value", st)).upper() == "RUNNING")


def stepped(base: str, vid: str, new_tokens: int, steps: list[int], step_s: float, app: str) -> dict:
    """Hold each client count for `step_s` seconds; every second, the Generator's running replicas and completions."""
    import threading

    done, timeline, t0 = [], [], time.perf_counter()

    def client(stop):
        while not stop.is_set():
            r = requests.post(base + "/v1/report", data={"volume_id": vid, "max_new_tokens": new_tokens}, timeout=300)
            done.append(r.status_code)

    for n in steps:
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(stop,)) for _ in range(n)]
        for t in threads:
            t.start()
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:
            time.sleep(1)
            timeline.append({"t_s": round(time.perf_counter() - t0, 1), "clients": n, "generator_replicas": running(app),
                             "completed": len(done)})
        stop.set()
        for t in threads:
            t.join()
    return {"timeline": timeline, "non_200": sum(c != 200 for c in done)}


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


def upload(base: str) -> str:
    """The benchmark's volume, uploaded once: its id."""
    from uploads import nifti_bytes, volume

    return requests.post(base + "/v1/upload", files={"file": ("s.nii.gz", nifti_bytes(volume((40, 96, 96))))},
                         timeout=120).json()["volume_id"]


def fixed(base: str, a, replicas: int, app_args: dict) -> list[dict]:
    """Rows for /v1/retrieve, /v1/report and the streamed report at a fixed number of Encoder+Generator replicas."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({**app_args, "replicas": replicas}), name="bench", route_prefix="/")
    vid = upload(base)
    retrieve = load(lambda i: requests.post(base + "/v1/retrieve", data={"text": f"lesion in the liver {i}", "k": 5},
                                            timeout=300), a.requests, a.clients)
    report = load(lambda i: requests.post(base + "/v1/report", data={"volume_id": vid, "max_new_tokens": a.new_tokens},
                                          timeout=300), a.requests, a.clients)
    streamed = load_stream(base, vid, a.new_tokens, a.requests, a.clients)
    serve.delete("bench")
    return [{"endpoint": "/v1/retrieve", "replicas": replicas, **retrieve},
            {"endpoint": "/v1/report", "replicas": replicas, **report},
            {"endpoint": "/v1/report stream=true", "replicas": replicas, **streamed}]


def autoscaled(base: str, a, app_args: dict) -> dict:
    """The stepped load on an autoscaled app (short delays), then idle until the Generator is back to 1 replica."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({**app_args, "upscale_delay_s": 2, "downscale_delay_s": 10}), name="auto", route_prefix="/")
    res = stepped(base, upload(base), a.new_tokens, [int(x) for x in a.steps.split(",")], a.step_s, "auto")
    t0 = time.perf_counter()
    while running("auto") > 1 and time.perf_counter() - t0 < 120:
        time.sleep(1)
    res["back_to_1_after_s"] = round(time.perf_counter() - t0, 1) if running("auto") == 1 else None
    per_step = {}
    for n in dict.fromkeys(r["clients"] for r in res["timeline"]):
        pts = [r for r in res["timeline"] if r["clients"] == n]
        per_step[n] = {"req_per_s": (pts[-1]["completed"] - pts[0]["completed"]) / max(pts[-1]["t_s"] - pts[0]["t_s"], 1e-9),
                       "max_generator_replicas": max(r["generator_replicas"] for r in pts)}
    res["per_step"] = per_step
    serve.delete("auto")
    return res


def tables(a, enc_ms: float, rows: list[dict], auto: dict) -> list[str]:
    out = [f"Serving, tiny config (the demo's models), {a.clients} concurrent clients x {a.requests} requests, report "
           f"max_new_tokens={a.new_tokens}; the encoder's bare forward (batch 1, 1 thread): {enc_ms:.1f} ms. CPU, "
           f"tiny-config figures.", "",
           "| endpoint | Encoder+Generator replicas | p50 ms | p95 ms | req/s | vs 1 replica | non-200 |",
           "|---|--:|--:|--:|--:|--:|--:|"]
    for r in (r for r in rows if "req_per_s" in r):
        base_r = next(x for x in rows if x["endpoint"] == r["endpoint"] and x["replicas"] == 1)
        out.append(f"| {r['endpoint']} | {r['replicas']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                   f"{r['req_per_s']:.2f} | {r['req_per_s'] / base_r['req_per_s']:.2f}x | {r['non_200']} |")
    out += ["", "| streamed report | replicas | first token p50 ms | p95 ms | whole answer p50 ms | non-200 |",
            "|---|--:|--:|--:|--:|--:|"]
    out += [f"| {a.new_tokens} new tokens | {r['replicas']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
            f"{r['whole_p50_ms']:.0f} | {r['non_200']} |" for r in rows if "ttft_p50_ms" in r]
    one = next(r for r in rows if r["endpoint"] == "/v1/report" and r["replicas"] == 1)["req_per_s"]
    out += ["", f"Autoscaled (upscale 2 s, downscale 10 s), /v1/report, {a.step_s:g} s per step; the ratio's baseline: "
            f"1 fixed replica at {a.clients} clients ({one:.2f} req/s).", "",
            "| clients | req/s | Generator replicas (max) | vs 1 fixed replica |", "|--:|--:|--:|--:|"]
    out += [f"| {n} | {st['req_per_s']:.2f} | {st['max_generator_replicas']} | {st['req_per_s'] / one:.2f}x |"
            for n, st in auto["per_step"].items()]
    out += ["", f"Back to 1 Generator replica {auto['back_to_1_after_s']} s after the load stopped; non-200: "
            f"{auto['non_200']}."]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "out/demo/ckpt/stage3"))
    p.add_argument("--clip", default=str(ROOT / "out/demo/ckpt/stage1"))
    p.add_argument("--index", default=str(ROOT / "out/demo/shards"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", default="1,8,16", help="client counts of the stepped load, in order")
    p.add_argument("--step-s", type=float, default=30)
    a = p.parse_args()
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT / "tests"))
    from med3dvlm.runtime import init_ray

    enc_ms = bare_encoder(a.model)
    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base, app_args = f"http://127.0.0.1:{port}", {"model": a.model, "clip": a.clip, "index": a.index, "replica_cpus": 0.5}
    rows = fixed(base, a, 1, app_args) + fixed(base, a, 2, app_args)
    auto = autoscaled(base, a, app_args)
    serve.shutdown()
    ray.shutdown()
    lines = tables(a, enc_ms, rows, auto)
    print("\n".join(lines))
    data = {"args": vars(a), "encoder_bare_ms": enc_ms, "rows": rows, "autoscaled": auto}
    print(f"written {write_results('serve', 'Serving latency, throughput and autoscaling', lines, data)}")


if __name__ == "__main__":
    main()
