"""The export format: a `from_pretrained` directory (a local path or a storage URI), its metadata and its kind.

    <export>/config.json        {"kind": "med3dvlm-clip" | "med3dvlm-vlm", "model": ModelConfig, "data": {...}, ...}
    <export>/model.safetensors  every parameter and buffer, keys as in the module tree (vision.*, projector.*, llm.*)
    <export>/text/ or llm/, tokenizer/   the HF config (and tokenizer) of the text tower or the LLM

`data` records how the volumes the model saw were made (shape, HU window), so serving preprocesses an upload the
same way without being told. One kind per stage: stage 1 exports `med3dvlm-clip`, stages 2 and 3 `med3dvlm-vlm`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from med3dvlm import storage

CLIP, VLM = "med3dvlm-clip", "med3dvlm-vlm"
WHAT = {CLIP: "stage 1's export (CLIP)", VLM: "a stage-2/3 export (VLM)"}


class ExportError(ValueError):
    """A location that is not the export asked for; the message names it and says what it holds."""


def model_dir(loc: str | Path) -> str:
    """A local directory for a model given by path or storage URI (a URI is copied once per node; never a hub)."""
    if not storage.exists(loc):
        raise FileNotFoundError(f"model path {loc} does not exist (models load only from local paths or storage URIs)")
    return storage.local_path(loc)


def read_meta(loc: str | Path, kind: str | tuple[str, ...] | None = None) -> dict:
    """`config.json` of an export (path or URI, nothing else is copied); with `kind`, refuse any other kind."""
    f = storage.join(loc, "config.json")
    if not storage.is_file(f):
        raise ExportError(f"{loc}: not an exported model directory (no config.json)")
    try:
        meta = json.loads(storage.read_text(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ExportError(f"{f}: not an export's config.json (no 'model' settings)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and meta.get("kind") not in kinds:
        raise ExportError(f"{loc}: holds a {meta.get('kind')!r} model; expected {' or '.join(WHAT[k] for k in kinds)}")
    return meta


def check_tensors(loc: str | Path) -> None:
    """The export's `model.safetensors` is there and whole, read as the format specifies (8 bytes: the JSON header's
    length N, little-endian; N bytes of JSON; then the data, each tensor at its `data_offsets` from the data's start)
    from its first bytes only, so a bucket's file is not copied; else ExportError naming the file."""
    f = storage.join(loc, "model.safetensors")
    if not storage.is_file(f):
        raise ExportError(f"{loc}: no model.safetensors")
    fs, path = storage.resolve(f)
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as h:
        n = int.from_bytes(h.read(8), "little") if size >= 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):  # 100 MB: the safetensors library's own limit on the header
            raise ExportError(f"{f}: not a safetensors file ({size} bytes; header length {n})")
        try:
            header = json.loads(h.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ExportError(f"{f}: not a safetensors file (its header: {e!r})") from None
    if 8 + n + end > size:
        raise ExportError(f"{f}: cut short: {size} bytes where its header places data up to byte {8 + n + end}")


def write_meta(path: Path, kind: str, model_cfg: dict, data: dict | None = None, **extra) -> None:
    meta = {"kind": kind, "model": model_cfg, **({"data": data} if data else {}), **extra}
    (Path(path) / "config.json").write_text(json.dumps(meta, indent=1))


def data_info(data_cfg) -> dict:
    """What an export records of the data config: how its inputs were made."""
    return {"shape": list(data_cfg.shape), "window": list(data_cfg.window), "window_mode": data_cfg.window_mode}


def load_state(path: Path, prefixes: tuple[str, ...] | None = None) -> dict:
    """The export's tensors, or only those under `prefixes` (the rest are never read from disk)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if prefixes is None or k.startswith(prefixes):
                out[k] = f.get_tensor(k)
    return out


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAPPED_BYTES = 256 << 20  # of the export file mapped at once while copying


def copy_state(module, path: Path, prefixes: tuple[str, ...]) -> None:
    """Fill `module`'s parameters and buffers from the export's tensors under `prefixes`, one tensor at a time (cast
    to each parameter's dtype and device as it is copied), so that loading never holds a second copy of the weights.
    The file is memory-mapped at most `MAPPED_BYTES` of tensors at a time (it is closed and reopened between
    groups): its pages would otherwise stay resident beside the copies until the end (+1.5 GiB at a 0.5B LLM).
    The keys must match exactly, as `load_state_dict(strict=True)`."""
    import torch
    from safetensors import safe_open

    own = module.state_dict(keep_vars=True)
    file = str(Path(path) / "model.safetensors")
    with safe_open(file, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefixes)]
        slices = {k: f.get_slice(k) for k in keys}
        sizes = {k: _ITEMSIZE.get(s.get_dtype(), 8) * math.prod(s.get_shape()) for k, s in slices.items()}
    missing, unexpected = sorted(set(own) - set(keys)), sorted(set(keys) - set(own))
    if missing or unexpected:
        raise ExportError(f"{path}: the export's tensors do not fit the model (missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]})")
    groups, size = [[]], 0
    for k in keys:
        if groups[-1] and size + sizes[k] > MAPPED_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += sizes[k]
    with torch.no_grad():
        for group in groups:
            with safe_open(file, framework="pt") as f:
                for k in group:
                    own[k].copy_(f.get_tensor(k))
