"""Ray Serve application: report generation, VQA and retrieval over HTTP, with autoscaling and a web viewer.

    serve run serve.app:build_app model=out/demo/ckpt/stage3 clip=out/demo/ckpt/stage1 index=out/demo/shards
    serve deploy serve/config.yaml                       # a cluster: deployments' replicas/autoscaling from the file

Deployments, composed with DeploymentHandles: `Preprocessor` (upload parsing by content + the training preprocessing),
`Encoder` (DCFormer + projector, `@serve.batch`), `Generator` (the LLM, batched generation), `Retriever` (stage-1
CLIP model + an index built from shards), `VolumeCache` (bounded, shared by ingress replicas) and `Api`, the FastAPI
ingress (OpenAPI at /docs, the web page at /). Arguments (`key=value` after the import path, or `args:` in YAML):

    model          stage-2/3 export (reports, VQA)            clip / index   stage-1 export and shards (retrieval)
                   (each a path or a storage URI such as s3://bucket/ckpt/stage3; a URI is copied once per node)
    config         preset or YAML for preprocessing (tiny)     token          bearer token (or $MED3DVLM_SERVE_TOKEN)
    max_upload_mb  upload limit (256)                          cache_size     volumes kept for follow-up questions (64)
    device         cpu | cuda (cpu)                            index_split    only this split in the index (all)
    replica_cpus   CPUs per replica for every deployment (default: each deployment's own)
    gpus_per_replica  GPUs for each Encoder and Generator replica when device=cuda (1)
    replicas       a fixed number of Encoder and Generator replicas instead of autoscaling
"""


import hashlib
import hmac
import io
import os
import time
from collections import OrderedDict

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from med3dvlm.data.samples import question_prompt
from med3dvlm.eval.vqa import first_choice

LETTERS = "ABCD"
MAX_NEW_TOKENS = 512
AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 5,
             "downscale_delay_s": 60}
BATCH = 8  # @serve.batch max size; max_ongoing_requests >= BATCH x max_concurrent_batches so batches can fill


# ------------------------------------------------------------------------------------------------ deployments
@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Preprocessor:
    """Upload bytes -> the preprocessed (D, H, W) uint8 volume, exactly as the training shards were made."""

    def __init__(self, shape, data_cfg: dict, max_upload_bytes: int):
        self.shape, self.data, self.max_bytes = tuple(shape), data_cfg, max_upload_bytes

    def __call__(self, filename: str, data: bytes) -> dict:
        from med3dvlm.data.transform import preprocess_volume, uses_window
        from med3dvlm.io import VolumeError, read_upload

        t = time.perf_counter()
        try:
            vol = read_upload(filename, data, max_bytes=self.max_bytes)
            arr = preprocess_volume(vol, self.shape, "uint8", tuple(self.data["window"]), self.data["window_mode"])
        except VolumeError as e:
            return {"error": str(e)}
        windowed = uses_window(vol, self.data["window_mode"])
        return {"volume": arr, "info": {
            "format": vol.kind, "input_shape": list(vol.array.shape), "output_shape": list(arr.shape),
            "hu_window": list(self.data["window"]) if windowed else None,
            "steps": (["HU window (width, level)"] if windowed else []) + ["min-max to [0,1]", "foreground crop",
                                                                          f"trilinear resize to {list(arr.shape)}"]},
            "seconds": time.perf_counter() - t}


def _threads():
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * BATCH)
class Encoder:
    """DCFormer + projector of the served VLM: volumes -> image tokens, batched across requests."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from med3dvlm.models.vlm import VLM

        _threads()
        self.device = torch.device(device)
        self.vlm = VLM.from_pretrained(model_dir)
        self.vlm.llm = None  # the Generator deployment holds the LLM
        self.vlm.to(self.device).eval()
        self.batch_sizes: list[int] = []

    def encode_now(self, volumes: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from med3dvlm.data.transform import to_float

        with torch.no_grad():
            x = to_float(np.stack(volumes)).unsqueeze(1).to(self.device)
            return list(self.vlm.encode_images(x).float().cpu().numpy())

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.02)
    async def encode(self, volumes: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes.append(len(volumes))
        return self.encode_now(volumes)

    def unbatched(self, volume: np.ndarray) -> np.ndarray:
        return self.encode_now([volume])[0]

    def stats(self) -> dict:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}


@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * BATCH)
class Generator:
    """The LLM of the served VLM: image tokens + prompt -> text, batched (requests with equal decoding options)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from med3dvlm.models.vlm import VLM

        _threads()
        self.device = torch.device(device)
        self.vlm = VLM.from_pretrained(model_dir).to(self.device).eval()
        self.vlm.vision = None  # the Encoder deployment runs it

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.02)
    async def generate(self, reqs: list[dict]) -> list[str]:
        import torch

        out: list[str | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r["max_new_tokens"], r["temperature"], r["top_p"]), []).append(i)
        for (max_new, temp, top_p), idx in groups.items():
            kw = {"do_sample": True, "temperature": temp, "top_p": top_p} if temp > 0 else {}
            feats = torch.from_numpy(np.stack([reqs[i]["tokens"] for i in idx])).to(self.device)
            for i, text in zip(idx, self.vlm.generate_from_features(feats, [reqs[i]["prompt"] for i in idx],
                                                                     max_new, **kw)):
                out[i] = text
        return out


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Retriever:
    """Stage-1 CLIP features of every volume and report in `index` shards: text -> volumes, volume -> reports."""

    def __init__(self, clip_dir: str, shards: str, split: str | None = None, split_field: str = "split"):
        import torch

        from med3dvlm.data.shards import read_table, volumes_from_table
        from med3dvlm.eval.predict import Embedder

        _threads()
        embed = Embedder(clip_dir)  # the features evaluation ranks with
        self.model = embed.model
        t = read_table(shards, ["volume_id", "volume", "report"], split=split, split_field=split_field)
        self.ids, self.reports = t["volume_id"].to_pylist(), t["report"].to_pylist()
        vols = volumes_from_table(t)
        out = [embed({"volume_id": self.ids[i:i + 16], "volume": vols[i:i + 16], "report": self.reports[i:i + 16]})
               for i in range(0, len(self.ids), 16)]
        self.img = torch.from_numpy(np.concatenate([o["image_embedding"] for o in out]))
        self.txt = torch.from_numpy(np.concatenate([o["text_embedding"] for o in out]))

    def size(self) -> int:
        return len(self.ids)

    def by_text(self, text: str, k: int) -> list[dict]:
        import torch

        with torch.no_grad():
            q = self.model.encode_text(**self.model.tokenize([text]))[0]
        return self._top(self.img @ q, k)

    def by_volume(self, volume: np.ndarray, k: int) -> list[dict]:
        import torch

        from med3dvlm.data.transform import to_float

        with torch.no_grad():
            q = self.model.encode_image(to_float(volume[None]).unsqueeze(1))[0]
        return self._top(self.txt @ q, k)

    def _top(self, scores, k: int) -> list[dict]:
        top = scores.topk(min(k, len(self.ids)))
        return [{"volume_id": self.ids[i], "report": self.reports[i], "score": round(float(s), 5)}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class VolumeCache:
    """Uploaded volumes by id, least recently used evicted beyond `size` (one replica: shared by all ingresses)."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def put(self, vid: str, item: dict) -> None:
        self.items[vid] = item
        self.items.move_to_end(vid)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, vid: str) -> dict | None:
        if vid in self.items:
            self.items.move_to_end(vid)
        return self.items.get(vid)

    def count(self) -> int:
        return len(self.items)


# ------------------------------------------------------------------------------------------------ HTTP ingress
api = FastAPI(title="med3dvlm", version="1",
              description="Report generation, VQA and retrieval for 3D CT with a Med3DVLM-style model.")
_BODY_LIMIT = [256 << 20]  # set by the Api replica from its configuration


@api.middleware("http")
async def limit_body(request: Request, call_next):
    """413 before the body is read when Content-Length is over the limit (chunked bodies are cut in `Api._read`)."""
    n = request.headers.get("content-length")
    if n and n.isdigit() and int(n) > _BODY_LIMIT[0] + (1 << 20):
        return JSONResponse({"detail": f"request body larger than the upload limit of {_BODY_LIMIT[0]} bytes"}, 413)
    return await call_next(request)


@serve.deployment(autoscaling_config={**AUTOSCALE, "target_ongoing_requests": 16}, ray_actor_options={"num_cpus": 0.5},
                  max_ongoing_requests=64)
@serve.ingress(api)
class Api:
    def __init__(self, preprocessor, encoder, generator, retriever, cache, token: str | None, max_upload_bytes: int,
                 model_info: dict):
        self.pre, self.enc, self.gen, self.ret, self.cache = preprocessor, encoder, generator, retriever, cache
        self.token, self.max_bytes, self.model_info = token, max_upload_bytes, model_info
        _BODY_LIMIT[0] = max_upload_bytes

    # -------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if not self.token:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, file: UploadFile) -> bytes:
        data = await file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"upload larger than the limit of {self.max_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{file.filename or 'upload'}: empty upload")
        return data

    async def _volume(self, file: UploadFile | None, volume_id: str | None) -> tuple[str, dict, dict]:
        """(volume id, cache item, timings) for an upload or the id of a previous one."""
        timings = {}
        if file is not None and file.filename is not None:
            data = await self._read(file)
            t = time.perf_counter()
            res = await self.pre.remote(file.filename, data)
            timings["preprocess_s"] = round(time.perf_counter() - t, 4)
            if "error" in res:
                raise HTTPException(400, res["error"])
            vid = hashlib.sha256(res["volume"].tobytes()).hexdigest()[:16]
            item = {"volume": res["volume"], "info": res["info"], "name": file.filename}
            await self.cache.put.remote(vid, item)
            return vid, item, timings
        if volume_id:
            item = await self.cache.get.remote(volume_id)
            if item is None:
                raise HTTPException(404, f"volume_id {volume_id}: unknown or evicted from the cache; upload the file again")
            return volume_id, item, timings
        raise HTTPException(400, "send a volume file (field `file`) or the `volume_id` of a previous upload")

    async def _generate(self, item: dict, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                        timings: dict) -> str:
        t = time.perf_counter()
        tokens = await self.enc.encode.remote(item["volume"])
        timings["encode_s"] = round(time.perf_counter() - t, 4)
        t = time.perf_counter()
        text = await self.gen.generate.remote({"tokens": tokens, "prompt": prompt, "max_new_tokens": max_new_tokens,
                                               "temperature": temperature, "top_p": top_p})
        timings["generate_s"] = round(time.perf_counter() - t, 4)
        return text

    # -------------------------------------------------------------- endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_info, "retrieval": self.ret is not None,
                "cached_volumes": await self.cache.count.remote()}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        from serve.web import PAGE

        return PAGE

    @api.post("/v1/upload", summary="Upload a volume; returns its id (for /v1/vqa, /v1/report) and the preprocessing")
    async def upload(self, request: Request, file: UploadFile = File(...)) -> dict:
        self._auth(request)
        vid, item, timings = await self._volume(file, None)
        return {"volume_id": vid, "preprocessing": item["info"], "timings": timings}

    @api.get("/v1/volumes/{volume_id}/slice/{axis}/{index}", summary="One slice of an uploaded volume as PNG")
    async def slice_png(self, request: Request, volume_id: str, axis: int, index: int) -> Response:
        from PIL import Image

        self._auth(request)
        _, item, _ = await self._volume(None, volume_id)
        vol = item["volume"]
        if axis not in (0, 1, 2) or not 0 <= index < vol.shape[axis]:
            raise HTTPException(400, f"axis must be 0-2 and index within {list(vol.shape)}")
        sl = np.take(vol, index, axis=axis)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(sl)).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @api.post("/v1/report", summary="Generate a findings report for a volume")
    async def report(self, request: Request, file: UploadFile | None = File(None), volume_id: str | None = Form(None),
                     prompt: str = Form("Describe the findings of this CT scan.", max_length=2000),
                     max_new_tokens: int = Form(256, ge=1, le=MAX_NEW_TOKENS),
                     temperature: float = Form(0.0, ge=0.0, le=2.0), top_p: float = Form(1.0, gt=0.0, le=1.0)) -> dict:
        self._auth(request)
        t0 = time.perf_counter()
        vid, item, timings = await self._volume(file, volume_id)
        text = await self._generate(item, f" {prompt.strip()}", max_new_tokens, temperature, top_p, timings)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {"volume_id": vid, "report": text, "preprocessing": item["info"], "timings": timings,
                "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}}

    @api.post("/v1/vqa", summary="Answer a question about a volume (closed-ended when choices A-D are given)")
    async def vqa(self, request: Request, question: str = Form(..., max_length=2000), file: UploadFile | None = File(None),
                  volume_id: str | None = Form(None), choice_a: str | None = Form(None), choice_b: str | None = Form(None),
                  choice_c: str | None = Form(None), choice_d: str | None = Form(None),
                  max_new_tokens: int = Form(64, ge=1, le=MAX_NEW_TOKENS),
                  temperature: float = Form(0.0, ge=0.0, le=2.0), top_p: float = Form(1.0, gt=0.0, le=1.0)) -> dict:
        self._auth(request)
        if not question.strip():
            raise HTTPException(400, "empty question")
        choices = {k: v.strip() for k, v in zip(LETTERS, (choice_a, choice_b, choice_c, choice_d)) if v and v.strip()}
        if len(choices) == 1:
            raise HTTPException(400, "a closed question needs at least two choices")
        t0 = time.perf_counter()
        vid, item, timings = await self._volume(file, volume_id)
        text = await self._generate(item, question_prompt(question.strip(), choices), max_new_tokens, temperature, top_p,
                                    timings)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        letter = first_choice(text, ignore_case=True) if choices else None
        letter = letter if letter in choices else None
        return {"volume_id": vid, "question": question.strip(), "answer": text, "choice": letter,
                "choice_text": choices.get(letter) if letter else None, "timings": timings}

    @api.post("/v1/retrieve", summary="Text -> the k most similar indexed volumes; volume -> the k most similar reports")
    async def retrieve(self, request: Request, text: str | None = Form(None, max_length=5000),
                       file: UploadFile | None = File(None), volume_id: str | None = Form(None),
                       k: int = Form(5, ge=1, le=100)) -> dict:
        self._auth(request)
        if self.ret is None:
            raise HTTPException(404, "retrieval is not configured (start the app with clip=DIR index=SHARDS)")
        t0 = time.perf_counter()
        if text is not None and text.strip():
            hits = await self.ret.by_text.remote(text.strip(), k)
            return {"query": "text", "results": hits, "timings": {"total_s": round(time.perf_counter() - t0, 4)}}
        if file is None and not volume_id:
            raise HTTPException(400, "send `text`, or a volume (`file` or `volume_id`)")
        vid, item, timings = await self._volume(file, volume_id)
        hits = await self.ret.by_volume.remote(item["volume"], k)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {"query": "volume", "volume_id": vid, "results": hits, "timings": timings}


# ------------------------------------------------------------------------------------------------ builder
def build_app(args: dict) -> serve.Application:
    """`serve run serve.app:build_app model=DIR [clip=DIR index=SHARDS] [token=...] ...`"""
    from med3dvlm import storage
    from med3dvlm.config import load_config

    model = args.get("model")
    if not model or not storage.is_file(storage.join(model, "config.json")):
        raise ValueError(f"model={model}: give a stage-2/3 export directory or URI (with config.json)")
    model = storage.absolute(model)
    meta = storage.read_json(storage.join(model, "config.json"))
    if meta.get("kind") != "med3dvlm-vlm":
        raise ValueError(f"model={model}: holds a {meta.get('kind')} model; serving needs a stage-2/3 export")
    clip, index = [storage.absolute(args[k]) if args.get(k) else None for k in ("clip", "index")]
    if bool(clip) != bool(index):
        raise ValueError("retrieval needs both clip=DIR (stage-1 export) and index=SHARDS")
    cfg = load_config(args.get("config", "tiny"))
    max_bytes = int(float(args.get("max_upload_mb", 256)) * (1 << 20))
    token = args.get("token") or os.environ.get("MED3DVLM_SERVE_TOKEN") or None
    device = args.get("device", "cpu")
    data_cfg = {"window": list(cfg.data.window), "window_mode": cfg.data.window_mode}
    cpus = args.get("replica_cpus")  # one CPU figure for every deployment (small machines, tests)

    gpus = float(args.get("gpus_per_replica", 1)) if device.startswith("cuda") else 0

    fixed = args.get("replicas")  # a fixed replica count for Encoder and Generator (benchmarks), no autoscaling

    def opt(d, gpu: bool = False):
        res = {"num_cpus": float(cpus)} if cpus is not None else {}
        if gpu and gpus:
            res["num_gpus"] = gpus
        d = d.options(ray_actor_options={**d.ray_actor_options, **res}) if res else d
        return d.options(num_replicas=int(fixed), autoscaling_config=None) if gpu and fixed else d

    info = {"path": str(model), "encoder": meta["model"]["encoder"], "input_shape": meta["input_shape"],
            "llm": meta["model"]["llm"], "lora": meta["lora"]}
    retriever = opt(Retriever).bind(clip, index, args.get("index_split"), args.get("index_split_field", "split")) \
        if clip else None
    return opt(Api).bind(opt(Preprocessor).bind(meta["input_shape"], data_cfg, max_bytes), opt(Encoder, True).bind(model, device),
                         opt(Generator, True).bind(model, device), retriever,
                         opt(VolumeCache).bind(int(args.get("cache_size", 64))), token, max_bytes, info)
