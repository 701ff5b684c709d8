"""The Ray Serve app over real HTTP on 127.0.0.1, serving the tiny models trained by the `chain` fixture."""

import concurrent.futures as cf
import json
import re
import time

import numpy as np
import pytest
import requests

from conftest import free_port, new_bucket
from uploads import bad_uploads, good_uploads, hostile_uploads, mutated, nifti_bytes, npy_bytes, png_zip, volume

TOKEN = "s3cret-token"



@pytest.fixture(scope="module")
def served(chain, shards, s3_server):
    from ray import serve

    from med3dvlm import storage
    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"replica_cpus": 0.1, "max_upload_mb": 8, "cache_size": 4}
    # the main app loads its models and index from a bucket (as on a cluster without a shared disk), /open from paths
    b = new_bucket()
    for src, dst in ((chain[3]["export"], "stage3"), (chain[1]["export"], "stage1"), (str(shards[0]), "shards")):
        storage.copy_dir(src, f"{b}/{dst}")
    serve.run(build_app({**common, "model": f"{b}/stage3", "clip": f"{b}/stage1", "index": f"{b}/shards",
                         "uploads": f"{b}/uploads", "token": TOKEN}), name="med", route_prefix="/")
    # /open: no token, uploads in the default folder, two ingress replicas
    serve.run(build_app({**common, "model": chain[3]["export"], "ingress_replicas": 2}), name="open",
              route_prefix="/open")
    base = f"http://127.0.0.1:{port}"
    yield base
    serve.shutdown()


def auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def post(base, path, files=None, data=None, headers=None, timeout=120):
    return requests.post(base + path, files=files, data=data, headers=auth() if headers is None else headers,
                         timeout=timeout)


@pytest.mark.parametrize("bad,words", [
    ({"modle": "x"}, "unknown argument 'modle'; did you mean 'model'?"),
    ({"replicas": "two"}, "argument 'replicas' expects a whole number, got 'two'"),
    ({"replicas": "0"}, "argument 'replicas' is 0; it must be at least 1"),
    ({"max_upload_mb": "inf"}, "argument 'max_upload_mb' is inf"), ({"cache_size": "-5"}, "argument 'cache_size' is -5"),
    ({"replica_cpus": "nan"}, "argument 'replica_cpus' is nan"),
    ({"upscale_delay_s": "soon"}, "argument 'upscale_delay_s' expects a number, got 'soon'"),
    ({"device": "gpu"}, "argument 'device' is 'gpu'; it must be cpu or cuda"),
    ({"dtype": "fp8"}, "argument 'dtype' is 'fp8'; it must be one of float32, bfloat16, float16"),
])
def test_bad_app_arguments_are_refused_naming_the_argument(bad, words):
    """Before any export is read or replica placed (the model path here does not exist)."""
    from serve.app import build_app

    with pytest.raises(ValueError, match=re.escape(words)):
        build_app({"model": "/no/such/export", **bad})


def test_each_replica_builds_only_its_own_part(served):
    """The Encoder replica holds the DCFormer and the projector and no LLM parameter; the Generator the LLM and no
    DCFormer or projector parameter (each counted by the replica itself, in its own process)."""
    from ray import serve

    enc = serve.get_deployment_handle("Encoder", app_name="med").held.remote().result(timeout_s=60)
    gen = serve.get_deployment_handle("Generator", app_name="med").held.remote().result(timeout_s=60)
    assert set(enc["parameters"]) == {"vision", "projector"} and min(enc["parameters"].values()) > 0, enc
    assert set(gen["parameters"]) == {"llm"} and gen["parameters"]["llm"] > 0, gen
    assert enc["pid"] != gen["pid"]


def test_health_docs_and_page(served):
    h = requests.get(served + "/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["retrieval"] is True and h["model"]["encoder"] == "nano"
    assert h["model"]["path"].startswith("s3://") and h["model"]["path"].endswith("/stage3")  # loaded from the bucket
    assert "/v1/report" in requests.get(served + "/openapi.json", timeout=30).json()["paths"]
    docs = requests.get(served + "/docs", timeout=30)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # offline: every asset from the app itself
    for src in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text):
        asset = requests.get(f"{served}/{src}", timeout=30)
        assert asset.status_code == 200 and len(asset.content) > 10_000, src
    assert requests.get(served + "/docs-assets/..%2Fetc%2Fpasswd", timeout=30).status_code == 404
    assert "<input id=\"file\"" in requests.get(served + "/", timeout=30).text


def test_report_for_every_upload_format(served, tmp_path):
    for name, data in good_uploads(tmp_path).items():
        r = post(served, "/v1/report", files={"file": (name, data)}, data={"max_new_tokens": 8})
        assert r.status_code == 200, (name, r.text)
        j = r.json()
        assert isinstance(j["report"], str) and j["preprocessing"]["output_shape"] == [32, 64, 64]
        assert j["timings"]["encode_s"] > 0 and j["decoding"]["temperature"] == 0.0
        if name.startswith("scan") or name == "dicom.zip":
            assert j["preprocessing"]["hu_window"] is not None, name  # raw CT gets the HU window


def test_vqa_by_volume_id_with_choices_and_open(served):
    up = post(served, "/v1/upload", files={"file": ("scan.nii.gz", nifti_bytes(volume()))})
    assert up.status_code == 200
    vid = up.json()["volume_id"]
    closed = post(served, "/v1/vqa", data={"volume_id": vid, "question": "Which organ?", "choice_a": "Liver",
                                           "choice_b": "Spleen", "choice_c": "Kidney", "max_new_tokens": 6})
    assert closed.status_code == 200, closed.text
    j = closed.json()
    assert j["volume_id"] == vid and j["choice"] in (None, "A", "B", "C")
    opened = post(served, "/v1/vqa", data={"volume_id": vid, "question": "Where is the lesion?", "max_new_tokens": 6})
    assert opened.status_code == 200 and opened.json()["choice"] is None
    png = requests.get(f"{served}/v1/volumes/{vid}/slice/1/5", headers=auth(), timeout=30)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_retrieval_by_text_and_by_volume(served, shards):
    from med3dvlm.data.shards import read_table

    t = read_table(shards[0], ["volume_id", "report"])
    r = post(served, "/v1/retrieve", data={"text": t["report"][0].as_py(), "k": 3})
    assert r.status_code == 200
    hits = r.json()["results"]
    assert len(hits) == 3 and {h["volume_id"] for h in hits} <= set(t["volume_id"].to_pylist())
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    r = post(served, "/v1/retrieve", files={"file": ("v.npy", npy_bytes(volume()))},
             data={"k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


@pytest.mark.parametrize("name", sorted(bad_uploads()))
def test_bad_uploads_get_a_4xx_with_the_reason(served, name):
    data, reason = bad_uploads()[name]
    r = post(served, "/v1/report", files={"file": (name, data)})
    assert r.status_code == 400 and reason in r.json()["detail"], r.text


def test_limits_auth_and_bad_requests(served):
    vol = nifti_bytes(volume())
    assert post(served, "/v1/report", files={"file": ("big.npy", b"\x93NUMPY" + b"\0" * (10 << 20))}).status_code == 413
    assert post(served, "/v1/report", files={"file": ("s.nii.gz", vol)}, headers={}).status_code == 401
    assert post(served, "/v1/report", files={"file": ("s.nii.gz", vol)},
                headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(served, "/v1/vqa", data={"question": "  ", "volume_id": "x"}).status_code == 400
    assert post(served, "/v1/vqa", data={"question": "Which?", "volume_id": "nope"}).status_code == 404
    assert post(served, "/v1/report", files={"file": ("s.nii.gz", vol)}, data={"max_new_tokens": 100000}).status_code == 422
    assert post(served, "/v1/report", files={"file": ("s.nii.gz", vol)}, data={"temperature": -1}).status_code == 422
    # auth off: the second app has no token
    r = post(served, "/open/v1/report", files={"file": ("s.nii.gz", vol)}, data={"max_new_tokens": 4}, headers={})
    assert r.status_code == 200, r.text
    assert post(served, "/open/v1/retrieve", data={"text": "liver"}, headers={}).status_code == 404  # not configured
    assert requests.get(served + "/healthz", timeout=30).status_code == 200  # still serving


def test_200_concurrent_mixed_requests_without_a_5xx(served, shards):
    up = post(served, "/v1/upload", files={"file": ("scan.nii.gz", nifti_bytes(volume(seed=3)))}).json()["volume_id"]
    bad = bad_uploads()

    def one(i):
        kind = i % 5
        if kind == 0:
            return post(served, "/v1/retrieve", data={"text": "lesion in the liver", "k": 2}).status_code
        if kind == 1:
            return post(served, "/v1/vqa", data={"volume_id": up, "question": "Which plane?", "choice_a": "Axial",
                                                 "choice_b": "Coronal", "max_new_tokens": 3}).status_code
        if kind == 2:
            name = sorted(bad)[i % len(bad)]
            return post(served, "/v1/report", files={"file": (name, bad[name][0])}).status_code
        if kind == 3:
            return requests.get(served + "/healthz", timeout=120).status_code
        return post(served, "/v1/report", data={"volume_id": up, "max_new_tokens": 3}).status_code

    t = time.time()
    with cf.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(one, range(200)))
    assert not [c for c in codes if c >= 500], codes
    assert codes.count(200) == 160 and all(c == 400 for i, c in enumerate(codes) if i % 5 == 2)
    assert time.time() - t < 600


@pytest.mark.parametrize("name", sorted(hostile_uploads()))
def test_hostile_uploads_get_a_4xx_naming_the_file(served, name):
    data, words = hostile_uploads()[name]
    r = post(served, "/v1/upload", files={"file": (name, data)})
    assert r.status_code == 400 and words in r.json()["detail"] and name in r.json()["detail"], r.text


def test_mutated_uploads_over_http_are_200_or_4xx(served, tmp_path):
    rng = np.random.default_rng(15)
    seeds = [nifti_bytes(volume((6, 16, 16)), gz=False), npy_bytes(volume((6, 16, 16))), png_zip(volume((4, 16, 16)))]

    def one(i):
        r = post(served, "/v1/upload", files={"file": (f"m{i}.bin", mutated(seeds[i % len(seeds)], rng))})
        return r.status_code

    with cf.ThreadPoolExecutor(4) as ex:
        codes = list(ex.map(one, range(60)))
    assert all(c == 200 or 400 <= c < 500 for c in codes), codes
    assert requests.get(served + "/healthz", timeout=30).status_code == 200


# form values, headers and bodies a client could send: odd numbers, text where numbers go, NUL, very long text,
# repeated or missing files, unknown fields, broken multipart framing, the wrong content type, odd auth headers
ODD_VALUES = ["", " ", "0", "-1", "2", "513", "1e309", "nan", "-inf", "1.5", "true", "null", "[]", "\x00", "a\x00b",
              "\u00e9" * 5, "\U0001f642" * 3, "x" * 2001, "x" * 100_000, "Which organ?", "../../etc/passwd", "\uff19", " 4 "]
FIELDS = ["volume_id", "prompt", "question", "choice_a", "choice_b", "choice_c", "choice_d", "max_new_tokens",
          "temperature", "top_p", "stream", "text", "k", "junk", "file"]
ODD_AUTH = [None, None, {}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN} x"},
            {"Authorization": "Basic dG9rOg=="}, {"Authorization": f"Bearer  {TOKEN}"}, {"Authorization": "Bearer t\u00f6k"}]


def _odd_request(base: str, rng, vid: str, seeds: list[bytes]) -> int:
    path = rng.choice(["/v1/upload", "/v1/report", "/v1/vqa", "/v1/retrieve"])
    kind = rng.random()
    if kind < 0.15:  # a slice with odd coordinates and display settings
        axis, i = rng.choice(["0", "2", "3", "-1", "x", "1.0", "9" * 20]), rng.choice(["0", "-1", "100000", "1e3", "9" * 25])
        q = {k: rng.choice(ODD_VALUES[:13]) for k in rng.sample(["view", "window", "level", "junk"], rng.randint(0, 4))}
        v = rng.choice([vid, vid[:-1], "x", "a" * 500])
        return requests.get(f"{base}/v1/volumes/{v}/slice/{axis}/{i}", params=q, headers=auth(), timeout=120).status_code
    if kind < 0.3:  # a hand-made body: cut, random bytes or JSON, under a content type that may not match
        body = (b'--X\r\nContent-Disposition: form-data; name="file"; filename="a.npy"\r\n\r\n' + seeds[1]
                + b"\r\n--X--\r\n")
        body = rng.choice([body[: rng.randint(0, len(body))], rng.randbytes(rng.randint(0, 3000)),
                           json.dumps({"volume_id": vid}).encode()])
        ctype = rng.choice(["multipart/form-data", "multipart/form-data; boundary=X", "multipart/form-data; boundary=",
                            "application/json", "text/plain"])
        return requests.post(base + path, data=body, headers={**auth(), "Content-Type": ctype}, timeout=120).status_code
    fields = {f: rng.choice(ODD_VALUES) for f in rng.sample(FIELDS, rng.randint(0, 6))}
    fields.setdefault("max_new_tokens", "2")
    files = None
    if rng.random() < 0.5:
        data = rng.choice(seeds)
        name = rng.choice(["a.nii.gz", "", "x" * 5000, "../../x.npy", "a\x00b.npy", "a/b/c.zip"])
        files = [("file", (name, data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data))] * rng.choice([1, 2])
    return post(base, path, data=fields, files=files, headers=rng.choice(ODD_AUTH)).status_code


def test_odd_forms_headers_and_bodies_get_a_4xx_never_a_5xx(served):
    """A fixed-seed campaign of 240 requests, four at a time, then the app still answers a good request (the same
    kind of generator outside the suite, against the demo's app: 30,060 requests in 6.5 minutes, no 5xx; 2026-11-30)."""
    import random

    seeds = [nifti_bytes(volume((6, 16, 16))), npy_bytes(volume((6, 16, 16))), png_zip(volume((4, 16, 16)))]
    vid = post(served, "/v1/upload", files={"file": ("a.npy", seeds[1])}).json()["volume_id"]
    rngs = [random.Random(2026_11_30 + i) for i in range(4)]
    with cf.ThreadPoolExecutor(4) as ex:
        codes = [c for part in ex.map(lambda r: [_odd_request(served, r, vid, seeds) for _ in range(60)], rngs)
                 for c in part]
    assert not [c for c in codes if c >= 500], sorted(set(codes))
    assert {400, 401, 404, 422} <= set(codes) and codes.count(200) >= 5  # every refusal path reached, and some answers
    r = post(served, "/v1/report", data={"volume_id": vid, "max_new_tokens": 2})
    assert r.status_code == 200, r.text


def test_parameters_beyond_the_model_are_refused_up_front(served):
    vid = post(served, "/v1/upload", files={"file": ("s.npy", npy_bytes(volume()))}).json()["volume_id"]
    r = post(served, "/v1/report", data={"volume_id": vid, "temperature": 1e-40})
    assert r.status_code == 422 and "temperature" in r.json()["detail"]
    long_q = "Which organ shows the lesion in this study " * 40  # < 2000 characters, > the tiny model's 96 tokens
    assert len(long_q) <= 2000
    r = post(served, "/v1/vqa", data={"volume_id": vid, "question": long_q})
    assert r.status_code == 422 and "exceeds max_len" in r.json()["detail"], r.text
    r = post(served, "/v1/vqa", data={"volume_id": vid, "question": "Which?", "choice_a": "x" * 501, "choice_b": "y"})
    assert r.status_code == 422, r.text
    r = post(served, "/v1/report", data={"volume_id": vid, "max_new_tokens": 4},
             headers={"Authorization": f"bearer {TOKEN}"})  # RFC 7235: the scheme is case-insensitive
    assert r.status_code == 200, r.text


def test_one_bad_request_never_fails_its_batch_neighbours(served):
    from ray import serve

    gen = serve.get_deployment_handle("Generator", app_name="med")
    enc = serve.get_deployment_handle("Encoder", app_name="med")
    tokens = enc.encode.remote(np.zeros((32, 64, 64), np.uint8)).result()
    good = {"tokens": tokens, "prompt": " Which organ?", "max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0}
    bad = {**good, "prompt": " lesion" * 200}  # too long for the model: fails inside the batch
    results = [r.result() for r in [gen.generate.remote(bad if i % 3 == 0 else good) for i in range(12)]]
    assert all(isinstance(r, dict) and "max_len" in r["error"] for r in results[::3])
    assert all(isinstance(r, str) for i, r in enumerate(results) if i % 3)
    # over HTTP too: ordinary requests sent beside refused ones all succeed
    vid = post(served, "/v1/upload", files={"file": ("s.npy", npy_bytes(volume(seed=2)))}).json()["volume_id"]

    def one(i):
        q = "Which organ shows the lesion " * 60 if i % 3 == 0 else "Which organ?"
        return i, post(served, "/v1/vqa", data={"volume_id": vid, "question": q, "max_new_tokens": 3}).status_code

    with cf.ThreadPoolExecutor(12) as ex:
        codes = dict(ex.map(one, range(24)))
    assert all(c == 422 for i, c in codes.items() if i % 3 == 0) and all(c == 200 for i, c in codes.items() if i % 3)


def _events(resp) -> list[tuple[str, dict]]:
    """(event name, data) of a Server-Sent Events body."""
    out = []
    for block in resp.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_streamed_report_and_answer_equal_the_whole_greedy_ones(served):
    vid = post(served, "/v1/upload", files={"file": ("s.npy", npy_bytes(volume(seed=5)))}).json()["volume_id"]
    for path, form, key in (("/v1/report", {"volume_id": vid, "max_new_tokens": 12}, "report"),
                            ("/v1/vqa", {"volume_id": vid, "question": "Which organ?", "choice_a": "Liver",
                                         "choice_b": "Spleen", "max_new_tokens": 6}, "answer")):
        whole = post(served, path, data=form).json()
        r = post(served, path, data={**form, "stream": "true"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        ev = _events(r)
        assert ev[-1][0] == "done" and all(name == "message" for name, _ in ev[:-1])
        streamed = "".join(d["text"] for _, d in ev[:-1]).strip()
        assert streamed == whole[key] == ev[-1][1][key]
        t = ev[-1][1]["timings"]
        assert 0 < t.get("first_token_s", t["total_s"]) <= t["total_s"]
        if path == "/v1/vqa":
            assert ev[-1][1]["choice"] == whole["choice"]


def test_a_client_that_disconnects_stops_its_generation(served):
    """An HTTP client that closes a streamed report after its first piece: the Generator's stream is closed and its
    generation stops before its tokens run out (the replica counts it), and nothing stays open."""
    from ray import serve

    h = serve.get_deployment_handle("Generator", app_name="open")

    def stats() -> dict:  # every running replica's counters (a call lands on one replica)
        running = serve.status().applications["open"].deployments["Generator"].replica_states.get("RUNNING", 1)
        seen = {}
        for _ in range(100):
            st = h.stream_stats.remote().result()
            seen[st["replica"]] = st
            if len(seen) >= running:
                break
        return {k: sum(st[k] for st in seen.values()) for k in ("active", "stopped_early")}

    base = served + "/open"
    vid = post(base, "/v1/upload", files={"file": ("s.npy", npy_bytes(volume(seed=7)))}, headers={}).json()["volume_id"]
    before = stats()["stopped_early"]
    # sampled at a high temperature, so the tiny model does not end early at an EOS; a generation that still ended
    # before the disconnect reached its replica (a loaded machine) is not a stop: up to three tries
    for _ in range(3):
        with requests.post(base + "/v1/report", data={"volume_id": vid, "max_new_tokens": 400, "temperature": 2.0,
                                                      "stream": "true"}, stream=True, timeout=60) as r:
            assert r.status_code == 200
            assert next(line for line in r.iter_lines() if line).startswith(b"data: ")
        t0 = time.time()
        while (now := stats())["stopped_early"] == before and time.time() - t0 < 20:
            time.sleep(0.5)
        if now["stopped_early"] > before:
            break
    assert now["stopped_early"] == before + 1, now
    t0 = time.time()
    while (now := stats())["active"] and time.time() - t0 < 20:
        time.sleep(0.5)
    assert now["active"] == 0, now


def test_an_upload_id_resolves_on_every_ingress_replica(served):
    """No single cache on the request path: a volume uploaded through either of /open's two ingress replicas is
    served by both (the X-Med3dvlm-Replica header says which answered)."""
    base, latest = served + "/open", {}
    for i in range(40):  # upload until each replica has taken one
        r = post(base, "/v1/upload", files={"file": ("s.npy", npy_bytes(volume(seed=100 + i)))}, headers={})
        assert r.status_code == 200, r.text
        # each replica's latest: the two newest uploads, which the app's 4 kept uploads hold (a replica's first could
        # have expired while the other replica's turn did not come)
        latest[r.headers["X-Med3dvlm-Replica"]] = r.json()["volume_id"]
        if len(latest) == 2:
            break
    assert len(latest) == 2, "every upload went to one ingress replica"
    for vid in latest.values():
        answered = set()
        for _ in range(40):
            r = requests.get(f"{base}/v1/volumes/{vid}/slice/0/3", timeout=30)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            answered.add(r.headers["X-Med3dvlm-Replica"])
            if len(answered) == 2:
                break
        assert len(answered) == 2, f"{vid}: only replica {answered} answered"
    r = requests.get(f"{base}/v1/volumes/{'0' * 16}/slice/0/3", timeout=30)
    assert r.status_code == 404 and "upload the file again" in r.json()["detail"]


def test_batched_encoder_equals_unbatched(served):

    from ray import serve

    h = serve.get_deployment_handle("Encoder", app_name="med")
    vols = [np.random.default_rng(i).integers(0, 255, (32, 64, 64), dtype=np.uint8) for i in range(6)]
    batched = [r.result() for r in [h.encode.remote(v) for v in vols]]
    single = [h.unbatched.remote(v).result() for v in vols]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert h.stats.remote().result()["max_batch"] > 1  # requests really were batched


def test_web_page_uploads_a_volume_and_shows_a_report(served, tmp_path):
    import shutil

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and browser):
        pytest.skip("chromium and chromium-driver (Debian) are not installed; `make setup` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    f = tmp_path / "scan.nii.gz"
    f.write_bytes(nifti_bytes(volume()))
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(served + "/")
        drv.find_element(By.ID, "token").send_keys(TOKEN)
        drv.find_element(By.ID, "file").send_keys(str(f))
        drv.find_element(By.ID, "upload").click()
        WebDriverWait(drv, 60).until(lambda d: "volume " in d.find_element(By.ID, "status").text)
        WebDriverWait(drv, 30).until(lambda d: (d.find_element(By.ID, "img0").get_attribute("src") or "").startswith("blob:"))
        assert drv.find_element(By.ID, "report").is_enabled()
        drv.find_element(By.ID, "max_tokens").clear()
        drv.find_element(By.ID, "max_tokens").send_keys("8")
        drv.find_element(By.ID, "report").click()
        # the finished report ends with its timing
        WebDriverWait(drv, 120).until(lambda d: d.find_element(By.ID, "report_out").text.rstrip().endswith(" s]"))
        text = drv.find_element(By.ID, "report_out").text
        assert not text.startswith(("4", "5")), text  # a report, not an error status
        # a refused upload clears the previous volume's report and images, and says why
        bad = tmp_path / "broken.nii.gz"
        bad.write_bytes(b"\x1f\x8b not really gzip")
        drv.find_element(By.ID, "file").send_keys(str(bad))
        drv.find_element(By.ID, "upload").click()
        WebDriverWait(drv, 60).until(lambda d: "refused" in d.find_element(By.ID, "status").text)
        assert drv.find_element(By.ID, "report_out").text == ""
        assert not drv.find_element(By.ID, "views").is_displayed()
        assert drv.find_element(By.ID, "report").get_attribute("disabled") is not None
        # a new good upload starts clean too, with slice numbers
        drv.find_element(By.ID, "file").send_keys(str(f))
        drv.find_element(By.ID, "upload").click()
        WebDriverWait(drv, 60).until(lambda d: "volume " in d.find_element(By.ID, "status").text)
        WebDriverWait(drv, 30).until(lambda d: " / " in d.find_element(By.ID, "n0").text)
        assert drv.find_element(By.ID, "report_out").text == ""
        # the native view browses the upload's own grid: as many slices as one of its axes (12 x 40 x 48, in the
        # order its orientation gives), not the model input's 32
        from selenium.webdriver.support.ui import Select

        Select(drv.find_element(By.ID, "view")).select_by_value("native")
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "n0").text.split(" / ")[-1] in {"12", "40", "48"})
    finally:
        drv.quit()


def test_generator_autoscales_to_two_replicas_under_load_and_back(served, chain):
    """Short delays so the mechanism shows in a test: a bounded load on /v1/report takes the Generator from 1 to 2
    replicas; without it, the Generator returns to 1."""
    import threading

    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"model": chain[3]["export"], "replica_cpus": 0.1, "upscale_delay_s": 1,
                         "downscale_delay_s": 3, "look_back_period_s": 3, "metrics_interval_s": 1}),
              name="scale", route_prefix="/scale")
    base = served + "/scale"

    def running() -> int:
        states = serve.status().applications["scale"].deployments["Generator"].replica_states
        return sum(n for s, n in states.items() if str(getattr(s, "value", s)).upper() == "RUNNING")

    vid = post(base, "/v1/upload", files={"file": ("s.nii.gz", nifti_bytes(volume()))}, headers={}).json()["volume_id"]
    stop, codes = threading.Event(), []

    def load():  # sampled, so a tiny model does not stop at an early EOS: each request holds the Generator
        while not stop.is_set():
            codes.append(post(base, "/v1/report", data={"volume_id": vid, "max_new_tokens": 160, "temperature": 1.0},
                              headers={}).status_code)

    threads = [threading.Thread(target=load) for _ in range(16)]
    try:
        assert running() == 1
        for t in threads:
            t.start()
        t0 = time.time()
        while running() < 2 and time.time() - t0 < 180:
            time.sleep(1)
        assert running() == 2, f"no second Generator replica after {time.time() - t0:.0f} s of load"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    t1 = time.time()
    while running() > 1 and time.time() - t1 < 180:
        time.sleep(1)
    assert running() == 1, f"still {running()} Generator replicas {time.time() - t1:.0f} s after the load stopped"
    assert codes and set(codes) == {200}, sorted(set(codes))
    serve.delete("scale")


def test_native_view_slices_are_the_upload_on_its_own_grid(served):
    """`view=native` gives the upload's own voxels (min-max scaled to 0-255 as the model input is, before its crop
    and resize), every k-th voxel of an axis longer than 256; `view=input` the model's input."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    arr = rng.uniform(0, 1000, (20, 600, 70)).astype(np.float32)  # not HU-like (min > -500): min-max only
    r = requests.post(served + "/v1/upload", files={"file": ("grid.npy", npy_bytes(arr))}, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    j = r.json()
    vid, k = j["volume_id"], -(-600 // 256)
    assert j["preprocessing"]["display_shape"] == [20, len(range(0, 600, k)), 70]

    def png(axis, index, view):
        resp = requests.get(f"{served}/v1/volumes/{vid}/slice/{axis}/{index}", params={"view": view},
                            headers=auth(), timeout=60)
        assert resp.status_code == 200, resp.text
        return np.asarray(Image.open(io.BytesIO(resp.content)))

    expected = np.rint((arr - arr.min()) / (arr.max() - arr.min()) * 255)[:, ::k]
    native = png(0, 7, "native")
    assert native.shape == expected[7].shape and np.abs(native.astype(int) - expected[7]).max() <= 1
    assert png(2, 69, "native").shape == expected[:, :, 69].shape
    assert png(0, 7, "input").shape == tuple(j["preprocessing"]["output_shape"][1:])
    bad = requests.get(f"{served}/v1/volumes/{vid}/slice/0/0", params={"view": "raw"}, headers=auth(), timeout=30)
    assert bad.status_code == 422
