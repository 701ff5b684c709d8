"""The HTTP API: a FastAPI ingress (OpenAPI at /docs, the web page at /) over the deployments' handles."""

import asyncio
import hmac
import io
import json
import time
from typing import Literal

import numpy as np
import ray.exceptions
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from med3dvlm.eval.vqa import first_choice
from med3dvlm.io.volume_store import VolumeStore
from med3dvlm.models.prompt import LETTERS, question_prompt
from .deployments import AUTOSCALE, HEALTH

MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 2000  # a report request or a question
MAX_CHOICE_CHARS = 500  # each of choice_a..choice_d
MIN_TEMPERATURE = 0.05  # 0 is greedy; below this, sampling divides logits into inf/nan
RETRIES, RETRY_AFTER_S = 4, 2  # a downstream replica that dies under a call: calls again, then 503 + Retry-After
DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # ActorDiedError is a RayActorError


async def call(method, *args):
    """A downstream deployment's answer. A replica that dies under the call is left by Serve's router, and the call
    goes to another (or to its replacement): every call here is idempotent (preprocessing, retrieval, greedy decoding
    on fixed weights). 503 with Retry-After when none answers."""
    for attempt in range(RETRIES):
        try:
            return await method.remote(*args)
        except DIED:
            await asyncio.sleep(0.25 * 2 ** attempt)
    raise unavailable()


def unavailable() -> HTTPException:
    return HTTPException(503, "a model replica stopped while answering and none took over in time; retry",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


api = FastAPI(title="med3dvlm", version="1", docs_url=None, redoc_url=None,
              description="Report generation, VQA and retrieval for 3D CT with a Med3DVLM-style model. "
                          "For research use only.")
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}  # served locally (offline)
api.state.max_upload_bytes = 256 << 20  # set by the Api replica from its configuration


@api.middleware("http")
async def limit_body(request: Request, call_next):
    """413 before the body is read when Content-Length is over the limit (chunked bodies are cut in `Api._read`)."""
    n = request.headers.get("content-length")
    limit = request.app.state.max_upload_bytes
    if n and n.isdigit() and int(n) > limit + (1 << 20):
        return JSONResponse({"detail": f"request body larger than the upload limit of {limit} bytes"}, 413)
    return await call_next(request)


@api.middleware("http")
async def replica_header(request: Request, call_next):
    """Which ingress replica answered (operators follow a request across replicas with it)."""
    response = await call_next(request)
    response.headers["X-Med3dvlm-Replica"] = serve.get_replica_context().replica_id.unique_id
    return response


@serve.deployment(autoscaling_config={**AUTOSCALE, "target_ongoing_requests": 16}, ray_actor_options={"num_cpus": 0.5},
                  max_ongoing_requests=64, **HEALTH)
@serve.ingress(api)
class Api:
    def __init__(self, preprocessor, encoder, generator, retriever, uploads: dict, token: str | None,
                 max_upload_bytes: int, model_info: dict):
        self.pre, self.enc, self.gen, self.ret = preprocessor, encoder, generator, retriever
        self.store = VolumeStore(uploads["root"], uploads["max_stored"])
        self.token, self.max_bytes, self.model_info = token, max_upload_bytes, model_info
        api.state.max_upload_bytes = max_upload_bytes

    # -------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, cred = request.headers.get("authorization", "").strip().partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), self.token.encode())):
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
            res = await call(self.pre, file.filename, data)
            timings["preprocess_s"] = round(time.perf_counter() - t, 4)
            if "error" in res:
                raise HTTPException(400, res["error"])
            item = {"volume": res["volume"], "display": res["display"], "info": res["info"], "name": file.filename}
            vid = await asyncio.to_thread(self.store.put, item)
            return vid, item, timings
        if volume_id:
            item = await asyncio.to_thread(self.store.get, volume_id)
            if item is None:
                raise HTTPException(404, f"volume_id {volume_id[:64]}: unknown or expired (the server keeps the newest "
                                         f"{self.store.max_stored} uploads); upload the file again")
            return volume_id, item, timings
        raise HTTPException(400, "send a volume file (field `file`) or the `volume_id` of a previous upload")

    async def _check_request(self, prompt: str, max_new_tokens: int, temperature: float) -> None:
        """422 before any work when the model cannot take the request: a degenerate temperature, or a prompt that
        is too long for the model once the image tokens are added."""
        if 0 < temperature < MIN_TEMPERATURE:
            raise HTTPException(422, f"temperature {temperature:g}: use 0 (greedy) or {MIN_TEMPERATURE}..2")
        err = await call(self.gen.prompt_error, prompt, max_new_tokens)
        if err:
            raise HTTPException(422, err)

    async def _generate(self, item: dict, prompt: str, decoding: dict, timings: dict) -> str:
        tokens = await self._encode(item, timings)
        t = time.perf_counter()
        text = await call(self.gen.generate, {"tokens": tokens, "prompt": prompt, **decoding})
        timings["generate_s"] = round(time.perf_counter() - t, 4)
        if isinstance(text, dict):
            raise HTTPException(422, f"cannot answer this request: {text['error']}")
        return text

    async def _encode(self, item: dict, timings: dict):
        t = time.perf_counter()
        tokens = await call(self.enc.encode, item["volume"])
        timings["encode_s"] = round(time.perf_counter() - t, 4)
        if isinstance(tokens, dict):
            raise HTTPException(422, f"cannot encode this volume: {tokens['error']}")
        return tokens

    def _sse(self, tokens, prompt: str, decoding: dict, timings: dict, t0: float, finish) -> StreamingResponse:
        """Server-Sent Events: `data: {"text": piece}` per decoded piece, then `event: done` with the whole answer,
        the timings (time to first token included) and what `finish(answer)` adds (the choice letter)."""
        request = {"tokens": tokens, "prompt": prompt, **decoding}

        async def events():
            pieces = []
            for attempt in range(RETRIES):  # a Generator that dies before the first piece: streamed again elsewhere
                try:
                    async for piece in self.gen.options(stream=True).stream.remote(request):
                        if not pieces:
                            timings["first_token_s"] = round(time.perf_counter() - t0, 4)
                        pieces.append(piece)
                        yield f"data: {json.dumps({'text': piece})}\n\n"
                    break
                except DIED:
                    if pieces or attempt == RETRIES - 1:  # what was sent cannot be taken back: the client retries
                        yield ("event: error\ndata: " + json.dumps({"error": "the model replica stopped mid-answer",
                               "retryable": True, "retry_after_s": RETRY_AFTER_S}) + "\n\n")
                        return
                    await asyncio.sleep(0.25 * 2 ** attempt)
            timings["total_s"] = round(time.perf_counter() - t0, 4)
            answer = "".join(pieces).strip()
            yield f"event: done\ndata: {json.dumps({**finish(answer), 'timings': timings})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -------------------------------------------------------------- endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_info, "retrieval": self.ret is not None,
                "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(self) -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title="med3dvlm API",
                                   swagger_js_url="docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="docs-assets/swagger-ui.css", swagger_favicon_url="")

    @api.get("/docs-assets/{name}", include_in_schema=False)
    def docs_asset(self, name: str) -> Response:
        from pathlib import Path

        from swagger_ui_bundle import swagger_ui_path

        if name not in DOCS_ASSETS:
            raise HTTPException(404, "no such asset")
        return Response((Path(swagger_ui_path) / name).read_bytes(), media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "max-age=86400"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        from .web import PAGE

        return PAGE

    @api.post("/v1/upload", summary="Upload a volume; returns its id (for /v1/vqa, /v1/report) and the preprocessing")
    async def upload(self, request: Request, file: UploadFile = File(...)) -> dict:
        self._auth(request)
        vid, item, timings = await self._volume(file, None)
        return {"volume_id": vid, "preprocessing": item["info"], "timings": timings}

    @api.get("/v1/volumes/{volume_id}/slice/{axis}/{index}", summary="One slice of an uploaded volume as PNG")
    async def slice_png(self, request: Request, volume_id: str, axis: int, index: int,
                        window: int = Query(255, ge=1, le=255, description="display window on the 0-255 input"),
                        level: int = Query(128, ge=0, le=255, description="display level (window centre)"),
                        view: Literal["input", "native"] = Query(
                            "input", description="input: the model's input; native: the upload on its own grid "
                                                 "(every voxel up to 256 per axis, every k-th beyond)")) -> Response:
        from PIL import Image

        self._auth(request)
        _, item, _ = await self._volume(None, volume_id)
        vol = item["volume"] if view == "input" else item.get("display")
        if vol is None:
            raise HTTPException(404, f"volume_id {volume_id}: no native view kept for this upload; upload it again")
        if axis not in (0, 1, 2) or not 0 <= index < vol.shape[axis]:
            raise HTTPException(400, f"axis must be 0-2 and index within {list(vol.shape)}")
        sl = np.take(vol, index, axis=axis)
        if window < 255 or level != 128:  # display only: the model always sees the whole range
            lo = level - window / 2
            sl = np.clip((sl.astype(np.float32) - lo) * (255.0 / window), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(sl)).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @api.post("/v1/report", summary="Generate a findings report for a volume")
    async def report(self, request: Request, file: UploadFile | None = File(None), volume_id: str | None = Form(None),
                     prompt: str = Form("Describe the findings of this CT scan.", max_length=MAX_PROMPT_CHARS),
                     max_new_tokens: int = Form(256, ge=1, le=MAX_NEW_TOKENS),
                     temperature: float = Form(0.0, ge=0.0, le=2.0), top_p: float = Form(1.0, gt=0.0, le=1.0),
                     stream: bool = Form(False, description="answer with Server-Sent Events, a piece at a time")):
        self._auth(request)
        if not prompt.strip():
            raise HTTPException(400, "empty prompt")
        t0 = time.perf_counter()
        await self._check_request(question_prompt(prompt), max_new_tokens, temperature)
        vid, item, timings = await self._volume(file, volume_id)
        decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if stream:
            return self._sse(await self._encode(item, timings), question_prompt(prompt), decoding, timings, t0,
                             lambda text: {"volume_id": vid, "report": text, "decoding": decoding})
        text = await self._generate(item, question_prompt(prompt), decoding, timings)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {"volume_id": vid, "report": text, "preprocessing": item["info"], "timings": timings,
                "decoding": decoding}

    @api.post("/v1/vqa", summary="Answer a question about a volume (closed-ended when choices A-D are given)")
    async def vqa(self, request: Request, question: str = Form(..., max_length=MAX_PROMPT_CHARS),
                  file: UploadFile | None = File(None), volume_id: str | None = Form(None),
                  choice_a: str | None = Form(None, max_length=MAX_CHOICE_CHARS),
                  choice_b: str | None = Form(None, max_length=MAX_CHOICE_CHARS),
                  choice_c: str | None = Form(None, max_length=MAX_CHOICE_CHARS),
                  choice_d: str | None = Form(None, max_length=MAX_CHOICE_CHARS),
                  max_new_tokens: int = Form(64, ge=1, le=MAX_NEW_TOKENS),
                  temperature: float = Form(0.0, ge=0.0, le=2.0), top_p: float = Form(1.0, gt=0.0, le=1.0),
                  stream: bool = Form(False, description="answer with Server-Sent Events, a piece at a time")):
        self._auth(request)
        if not question.strip():
            raise HTTPException(400, "empty question")
        choices = {k: v.strip() for k, v in zip(LETTERS, (choice_a, choice_b, choice_c, choice_d)) if v and v.strip()}
        if len(choices) == 1:
            raise HTTPException(400, "a closed question needs at least two choices")
        t0 = time.perf_counter()
        prompt = question_prompt(question, choices)
        await self._check_request(prompt, max_new_tokens, temperature)
        vid, item, timings = await self._volume(file, volume_id)

        def finish(text: str) -> dict:
            letter = first_choice(text, ignore_case=True) if choices else None
            letter = letter if letter in choices else None
            return {"volume_id": vid, "question": question.strip(), "answer": text, "choice": letter,
                    "choice_text": choices.get(letter) if letter else None}

        decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if stream:
            return self._sse(await self._encode(item, timings), prompt, decoding, timings, t0, finish)
        text = await self._generate(item, prompt, decoding, timings)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {**finish(text), "timings": timings}

    @api.post("/v1/retrieve", summary="Text -> the k most similar indexed volumes; volume -> the k most similar reports")
    async def retrieve(self, request: Request, text: str | None = Form(None, max_length=5000),
                       file: UploadFile | None = File(None), volume_id: str | None = Form(None),
                       k: int = Form(5, ge=1, le=100)) -> dict:
        self._auth(request)
        if self.ret is None:
            raise HTTPException(404, "retrieval is not configured (start the app with clip=DIR index=SHARDS)")
        t0 = time.perf_counter()
        if text is not None and text.strip():
            hits = await call(self.ret.by_text, text.strip(), k)
            return {"query": "text", "results": hits, "timings": {"total_s": round(time.perf_counter() - t0, 4)}}
        if file is None and not volume_id:
            raise HTTPException(400, "send `text`, or a volume (`file` or `volume_id`)")
        vid, item, timings = await self._volume(file, volume_id)
        hits = await call(self.ret.by_volume, item["volume"], k)
        timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {"query": "volume", "volume_id": vid, "results": hits, "timings": timings}
