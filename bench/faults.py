"""Serving under faults: a bounded mixed load over real HTTP (reports, VQA and retrieval, streamed and plain) while one
replica of the Encoder, the Generator and the ingress (`Api`) is killed in turn (`ray.kill`). A client that retries
what it is told to retry (503 with Retry-After, 408, an SSE error event; a 500 or a dropped connection from a killed
ingress replica) must get every answer, each equal to the answer the same request got before any fault (greedy
decoding: one right answer per request), and each deployment must return to its replica count by itself.

    .venv/bin/python bench/faults.py [--model out/demo/ckpt/stage3 --clip out/demo/ckpt/stage1 --index out/demo/shards]
        [--requests 240] [--concurrency 8] [--out bench/results/faults.md]

`run_faults(base, app, ...)` is the harness (the test runs a shorter version against its own app).
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RETRY_STATUS = {408, 500, 502, 503, 504}
KILLED = ("Encoder", "Generator", "Api")


def kinds(volume_ids: list[str], retrieval: bool) -> list[dict]:
    """The mixed requests, one per (kind, volume): plain and streamed reports and VQA, and retrieval by text."""
    out = []
    for v in volume_ids:
        out += [{"path": "/v1/report", "data": {"volume_id": v, "max_new_tokens": 12}},
                {"path": "/v1/report", "data": {"volume_id": v, "max_new_tokens": 12, "stream": "true"}},
                {"path": "/v1/vqa", "data": {"volume_id": v, "question": "Which organ is abnormal?", "max_new_tokens": 8,
                                             "choice_a": "liver", "choice_b": "kidney", "choice_c": "spleen"}},
                {"path": "/v1/vqa", "data": {"volume_id": v, "question": "Which plane is this?", "max_new_tokens": 8,
                                             "stream": "true"}}]
    if retrieval:
        out += [{"path": "/v1/retrieve", "data": {"text": t, "k": 3}} for t in ("liver lesion", "kidney", "normal")]
    return out


def answer_of(r: requests.Response, streamed: bool):
    """(answer, retryable error or None) of one response."""
    if r.status_code != 200:
        return None, f"http {r.status_code}"
    if not streamed:
        body = r.json()
        return json.dumps({k: body.get(k) for k in ("report", "answer", "hits")}, sort_keys=True), None
    event, done = None, None
    for line in r.text.splitlines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event in ("done", "error"):
            data = json.loads(line[6:])
            if event == "error":
                return None, "sse error"
            done = data
    if done is None:
        return None, "stream cut"
    return json.dumps({k: done.get(k) for k in ("report", "answer")}, sort_keys=True), None


def one(base: str, req: dict, timeout: float, attempts: int = 8) -> dict:
    """A client that retries: the statuses it met, its answer, its latency from the first try."""
    t0, seen = time.perf_counter(), []
    for _ in range(attempts):
        try:
            r = requests.post(base + req["path"], data=req["data"], timeout=timeout)
            ans, err = answer_of(r, "stream" in req["data"])
            seen.append(r.status_code if err is None or err.startswith("http") else err)
            if err is None:
                return {"answer": ans, "seen": seen, "latency": time.perf_counter() - t0, "end": time.time()}
            if r.status_code not in RETRY_STATUS and r.status_code != 200:
                break  # not retryable: a client error
            time.sleep(float(r.headers.get("Retry-After", 0.5)))
        except requests.RequestException as e:
            seen.append(type(e).__name__)
            time.sleep(0.5)
    return {"answer": None, "seen": seen, "latency": time.perf_counter() - t0, "end": time.time()}


def replicas(app: str) -> dict:
    from ray import serve

    deps = serve.status().applications[app].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deps.items()}


def alive(app: str, deployment: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.name for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"),
                                                 ("state", "=", "ALIVE")])]


def kill_one(app: str, deployment: str) -> str:
    import ray

    name = alive(app, deployment)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def killer(app: str, kill_at: list[float], started: float, log: list) -> None:
    """Kill one replica of each deployment at its time; record how long until its count is back."""
    for name, at in zip(KILLED, kill_at):
        time.sleep(max(0.0, started + at - time.time()))
        count = replicas(app).get(name, 0)  # its replicas running just before (the autoscaler may have added one)
        t = time.time()
        dead = kill_one(app, name)

        def back() -> bool:  # as many replicas running as before, the killed one not among the live actors
            live = alive(app, name)
            return dead not in live and len(live) >= count and replicas(app).get(name, 0) >= count

        time.sleep(2.5)  # one health-check period (2 s): before it, Serve's own count may not yet know of the death
        while not back() and time.time() - t < 180:
            time.sleep(0.25)
        log.append({"deployment": name, "replicas": count, "killed_at": t, "recovered_s": round(time.time() - t, 1),
                    "recovered": back()})


def run_faults(base: str, app: str, volume_ids: list[str], retrieval: bool, n: int = 240, concurrency: int = 8,
               kill_at=(5.0, 20.0, 35.0), timeout: float = 120) -> dict:
    """`n` requests at least, `concurrency` clients, until every killed replica is back; the figures."""
    plan = kinds(volume_ids, retrieval)
    expected = {i: one(base, r, timeout)["answer"] for i, r in enumerate(plan)}  # before any fault
    started, kills, results, lock = time.time(), [], [], threading.Lock()
    k = threading.Thread(target=killer, args=(app, list(kill_at), started, kills))
    k.start()

    def client(c: int) -> None:  # requests one after another until the kills are over and `n` are done
        i = c
        while k.is_alive() or len(results) < n:
            r = one(base, plan[i % len(plan)], timeout)
            with lock:
                results.append((i % len(plan), r))
            i += concurrency

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    k.join()
    n = len(results)
    lost = sum(r["answer"] is None for _, r in results)
    wrong = sum(r["answer"] is not None and r["answer"] != expected[i] for i, r in results)
    first = {}
    for _, r in results:
        first[str(r["seen"][0])] = first.get(str(r["seen"][0]), 0) + 1
    t_kill, t_back = min(x["killed_at"] for x in kills), max(x["killed_at"] + x["recovered_s"] for x in kills)
    phase = {"before": [r["latency"] for _, r in results if r["end"] < t_kill],
             "during": [r["latency"] for _, r in results if t_kill <= r["end"] <= t_back],
             "after": [r["latency"] for _, r in results if r["end"] > t_back]}
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None  # noqa: E731
    return {"requests": n, "concurrency": concurrency, "lost": lost, "wrong_answer": wrong,
            "first_attempt_status": first, "retried": sum(len(r["seen"]) > 1 for _, r in results),
            "kills": kills, "latency_s": {p: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95)} for p, v in phase.items()},
            "max_latency_s": round(max(r["latency"] for _, r in results), 2), "answers_expected": len(plan),
            "mean_latency_s": round(statistics.mean(r["latency"] for _, r in results), 3)}


def upload_volumes(base: str, shards: str, n: int = 3) -> list[str]:
    import io

    from med3dvlm.data.shards import read_table, volumes_from_table

    vols = volumes_from_table(read_table(shards, ["volume_id", "volume"]).slice(0, n))
    ids = []
    for v in vols:
        buf = io.BytesIO()
        np.save(buf, v.astype(np.float32))
        ids.append(requests.post(base + "/v1/upload", files={"file": ("v.npy", buf.getvalue())}, timeout=120)
                   .json()["volume_id"])
    return ids


def markdown(res: dict) -> str:
    rows = "\n".join(f"| {k['deployment']} | {k['replicas']} | {k['recovered_s']} | {k['recovered']} |"
                     for k in res["kills"])
    lat = "\n".join(f"| {p} | {v['n']} | {v['p50']} | {v['p95']} |" for p, v in res["latency_s"].items())
    return (f"{res['requests']} requests, {res['concurrency']} concurrent clients, {res['answers_expected']} distinct "
            f"requests (reports, VQA, retrieval; streamed and plain), greedy decoding.\n\n"
            f"- **lost: {res['lost']}**, answers unlike the same request's before the faults: {res['wrong_answer']}\n"
            f"- first attempt by outcome: {json.dumps(res['first_attempt_status'])}; requests retried: {res['retried']}\n"
            f"- slowest request (retries included): {res['max_latency_s']} s\n\n"
            f"| killed (ray.kill) | replicas running before | back to that count, s | recovered |\n"
            f"|---|--:|--:|---|\n{rows}\n\n"
            f"| phase | requests | p50 s | p95 s |\n|---|--:|--:|--:|\n{lat}\n")


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="out/demo/ckpt/stage3")
    a.add_argument("--clip", default="out/demo/ckpt/stage1")
    a.add_argument("--index", default="out/demo/shards")
    a.add_argument("--requests", type=int, default=240)
    a.add_argument("--concurrency", type=int, default=8)
    a.add_argument("--out", default=None)
    args = a.parse_args(argv)

    from ray import serve

    from med3dvlm.runtime import init_ray
    from record import write_markdown
    from med3dvlm.serve.app import build_app

    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": 8765, "request_timeout_s": 120})
    serve.run(build_app({"model": args.model, "clip": args.clip, "index": args.index, "ingress_replicas": 2,
                         "replica_cpus": 0.1}), name="faults", route_prefix="/")
    base = "http://127.0.0.1:8765"
    res = run_faults(base, "faults", upload_volumes(base, args.index), True, args.requests, args.concurrency)
    print(json.dumps(res, indent=1))
    f = write_markdown("faults", "Serving under faults: a replica of each deployment killed under load",
                       markdown(res), Path(args.out) if args.out else None)
    print(f"-> {f}")
    serve.shutdown()


if __name__ == "__main__":
    main()
