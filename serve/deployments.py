"""The Serve deployments: `Preprocessor` (upload parsing by content + the training preprocessing), `Encoder` (vision
tower + projector only, `@serve.batch`), `Generator` (the LLM only, batched generation), `Retriever` (stage-1 towers
+ an index built from shards). Uploads are kept by the ingress replicas themselves (`med3dvlm.io.volume_store`)."""

import os
import time

import numpy as np
from ray import serve

AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 5,
             "downscale_delay_s": 60}
# a replica that died is found by its next health check and replaced (Serve's defaults, 10 s and 30 s, left a killed
# replica's deployment short of its count for over a minute)
HEALTH = {"health_check_period_s": 2, "health_check_timeout_s": 10}
BATCH = 8  # @serve.batch max size; max_ongoing_requests >= BATCH x max_concurrent_batches so batches can fill


@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8, **HEALTH)
class Preprocessor:
    """Upload bytes -> the preprocessed (D, H, W) uint8 volume, exactly as the training shards were made, and the
    upload on its own grid for the viewer (`transform.display_volume`)."""

    def __init__(self, shape, data_cfg: dict, max_upload_bytes: int):
        self.shape, self.data, self.max_bytes = tuple(shape), data_cfg, max_upload_bytes

    def __call__(self, filename: str, data: bytes) -> dict:
        from med3dvlm.data.transform import display_volume, preprocess_volume, uses_window
        from med3dvlm.io import VolumeError, read_upload

        t = time.perf_counter()
        try:
            vol = read_upload(filename, data, max_bytes=self.max_bytes)
            window, mode = tuple(self.data["window"]), self.data["window_mode"]
            arr = preprocess_volume(vol, self.shape, "uint8", window, mode)
            display = display_volume(vol, window, mode)
        except VolumeError as e:
            return {"error": str(e)}
        except Exception as e:  # still this upload's fault (read_upload wraps its parsers; this is the transform)
            return {"error": f"{filename or 'upload'}: cannot preprocess ({type(e).__name__}: {e})"}
        windowed = uses_window(vol, self.data["window_mode"])
        return {"volume": arr, "display": display, "info": {
            "format": vol.kind, "input_shape": list(vol.array.shape), "output_shape": list(arr.shape),
            "display_shape": list(display.shape),
            "hu_window": list(self.data["window"]) if windowed else None,
            "steps": (["HU window (width, level)"] if windowed else []) + ["min-max to [0,1]", "foreground crop",
                                                                          f"trilinear resize to {list(arr.shape)}"]},
            "seconds": time.perf_counter() - t}


def held(module) -> dict:
    """What a replica holds: its process id and its parameters counted by top-level part (vision, projector, llm),
    so a check can see that each replica built only its own part."""
    parts: dict = {}
    for name, p in module.named_parameters():
        parts[name.split(".")[0]] = parts.get(name.split(".")[0], 0) + p.numel()
    return {"pid": os.getpid(), "parameters": parts}


def per_request(run, items: list) -> list:
    """`run(items)` for a whole batch; if it fails, each item alone, so that one bad request fails only itself:
    its result is {"error": reason}."""
    try:
        return run(items)
    except Exception as e:
        if len(items) == 1:
            return [{"error": f"{type(e).__name__}: {e}"[:500]}]
    return [r for it in items for r in per_request(run, [it])]


def _threads():
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * BATCH,
                  **HEALTH)
class Encoder:
    """DCFormer + projector of the served VLM: volumes -> image tokens, batched across requests."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str | None = None):
        import torch

        from med3dvlm.models.vlm import VLM

        _threads()
        self.device, self.dtype = torch.device(device), getattr(torch, dtype or "float32")
        self.vlm = VLM.from_pretrained(model_dir, parts=("vision",), dtype=self.dtype, device=self.device).eval()
        self.vlm.vision.fold_batchnorm()  # 1.31x at 128x256x256 on CPU (README: measured figures)
        self.batch_sizes: list[int] = []

    def encode_now(self, volumes: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from med3dvlm.data.transform import to_float

        with torch.no_grad():
            x = to_float(np.stack(volumes)).unsqueeze(1).to(self.device, self.dtype)
            return list(self.vlm.encode_images(x).float().cpu().numpy())

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.02)
    async def encode(self, volumes: list[np.ndarray]) -> list:
        """Image tokens per volume, or {"error": reason} for a volume that fails alone."""
        self.batch_sizes.append(len(volumes))
        return per_request(self.encode_now, volumes)

    def unbatched(self, volume: np.ndarray) -> np.ndarray:
        return self.encode_now([volume])[0]

    def stats(self) -> dict:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0)}

    def held(self) -> dict:
        return held(self.vlm)


@serve.deployment(autoscaling_config=AUTOSCALE, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * BATCH,
                  **HEALTH)
class Generator:
    """The LLM of the served VLM: image tokens + prompt -> text, batched (requests with equal decoding options)."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str | None = None):
        import torch

        from med3dvlm.models.vlm import VLM

        _threads()
        self.device, self.dtype = torch.device(device), getattr(torch, dtype or "float32")
        self.vlm = VLM.from_pretrained(model_dir, parts=("llm",), dtype=self.dtype, device=self.device).eval()
        self.streams = {"active": 0, "stopped_early": 0}

    def prompt_error(self, prompt: str, max_new_tokens: int) -> str | None:
        """Why the model cannot take this prompt (too long once the image tokens are added), or None."""
        try:
            ids, _ = self.vlm.encode_example(prompt, None)
        except ValueError as e:
            return str(e)
        room = getattr(self.vlm.llm.config, "max_position_embeddings", None)
        if room and len(ids) + max_new_tokens > room:
            return (f"prompt of {len(ids)} tokens (image tokens included) + max_new_tokens {max_new_tokens} exceeds "
                    f"the model's {room} positions")
        return None

    async def stream(self, req: dict):
        """The decoded pieces of one request's answer as the LLM produces them. When the caller goes away (the HTTP
        client disconnected), the generator is closed and the generation stops at its next token."""
        import asyncio
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = threading.Event()

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.vlm.tokenizer, skip_special_tokens=True)
        kw = {"do_sample": True, "temperature": req["temperature"], "top_p": req["top_p"]} if req["temperature"] > 0 else {}
        # a copy: the features come out of Ray's object store read-only
        feats = torch.tensor(np.asarray(req["tokens"])[None], device=self.device, dtype=self.dtype)
        worker = threading.Thread(target=self.vlm.generate_from_features, daemon=True, args=(
            feats, [req["prompt"]], req["max_new_tokens"]),
            kwargs={**kw, "streamer": streamer, "stopping_criteria": StoppingCriteriaList([Stop()])})
        self.streams["active"] += 1
        worker.start()
        try:
            loop = asyncio.get_running_loop()
            while (piece := await loop.run_in_executor(None, next, streamer, None)) is not None:
                if piece:
                    yield piece
        finally:
            self.streams["stopped_early"] += int(worker.is_alive())
            stop.set()
            self.streams["active"] -= 1

    def held(self) -> dict:
        return held(self.vlm)

    def stream_stats(self) -> dict:
        """This replica's streams: open now, and closed by their caller before the answer ended."""
        return {**self.streams, "replica": serve.get_replica_context().replica_id.unique_id}

    def generate_now(self, reqs: list[dict]) -> list[str]:
        """One `generate` call for requests with the same decoding options."""
        import torch

        r0 = reqs[0]
        kw = {"do_sample": True, "temperature": r0["temperature"], "top_p": r0["top_p"]} if r0["temperature"] > 0 else {}
        feats = torch.from_numpy(np.stack([r["tokens"] for r in reqs])).to(self.device, self.dtype)
        return self.vlm.generate_from_features(feats, [r["prompt"] for r in reqs], r0["max_new_tokens"], **kw)

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.02)
    async def generate(self, reqs: list[dict]) -> list:
        """Text per request, or {"error": reason} for one that fails alone (its neighbours still get theirs)."""
        out: list = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r["max_new_tokens"], r["temperature"], r["top_p"]), []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, per_request(self.generate_now, [reqs[i] for i in idx])):
                out[i] = res
        return out


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, **HEALTH)
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
