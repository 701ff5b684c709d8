"""The feature cache: the frozen vision tower's two feature maps (what the dual-stream projector consumes), computed
once over the shards by a Ray Data actor pool and read by stages 2 and 3 instead of the volumes where the tower does
not train and no augmentation is drawn (`train.feature_cache`).

    <shards>/features/<key[:16]>/part-NNNNN.parquet  one file per shard, the shard's rows in its order, the volume
                                                     replaced by `feat_low` and `feat_high` (float32 bytes)
    <shards>/features/<key[:16]>/manifest.json       the key, its parts, the feature shapes, each file's rows, bytes, sha256

The key hashes the shards' manifest, the tower's weights, the preprocessing and the transform; any change gives a new
key (a new folder). A folder whose manifest or files do not match its key is refused naming the part or file. Each
file is written under a temporary name and renamed whole; the manifest comes last, so a killed build leaves no
manifest and its re-run keeps the finished files and writes the same bytes for the rest.

The tower runs in eval mode (BatchNorm on its running statistics). The released code leaves a frozen tower in train
mode, where each volume's features depend on its batch: nothing can be cached then (`model.trainable=released_code`).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from med3dvlm import storage
from med3dvlm.runtime import UserError, sha256_json

COLUMNS = ("volume_id", "case_id", "split", "case_split", "report", "qa")
FEATURES = ("feat_low", "feat_high")  # the tower's last two feature maps: the projector's (low, high) inputs
FORMAT = 2  # 2: pages with CRC checksums
ENCODE_BATCH = 4  # volumes per tower call (fixed: the bytes written do not depend on the machine)


def encoder_hash(export: str) -> str:
    """sha256 of the export's vision tower tensors (names and bytes), read one at a time."""
    from safetensors import safe_open

    from med3dvlm.models.export import model_dir

    h = hashlib.sha256()
    with safe_open(os.path.join(model_dir(export), "model.safetensors"), framework="np") as f:
        for k in sorted(k for k in f.keys() if k.startswith("vision.")):
            h.update(k.encode())
            h.update(np.ascontiguousarray(f.get_tensor(k)).tobytes())
    return h.hexdigest()


def key_parts(cfg, manifest: dict, export: str) -> dict:
    return {"shards_manifest": sha256_json(manifest), "encoder": encoder_hash(export),
            "preprocessing": sha256_json(manifest["config"]),
            "transform": sha256_json({"encoder": cfg.model.encoder, "stem_act": cfg.model.stem_act, "mode": "eval",
                                      "dtype": "float32", "format": FORMAT})}


def location(shards: str, parts: dict) -> str:
    return storage.join(storage.absolute(shards), "features", sha256_json(parts)[:16])


def why_not(cfg, stage) -> str | None:
    """Why the cache cannot stand in for the volumes of this stage, or None when it can."""
    from med3dvlm.models.vlm import TRAINABLE

    if stage.export_kind != "med3dvlm-vlm":
        return f"stage {stage.number} trains the vision tower"
    if cfg.train.augment:
        return "train.augment=true draws new volumes every epoch"
    if cfg.model.trainable == "released_code":
        return "model.trainable=released_code runs the frozen tower in train mode (features depend on the batch)"
    if "vision" in TRAINABLE[cfg.model.trainable][stage.number]:
        return f"model.trainable={cfg.model.trainable} trains the vision tower in stage {stage.number}"
    return None


def check(loc: str, parts: dict) -> dict:
    """The cache at `loc` against its key: the manifest's parts, then each file (present, its size, the key in its
    footer). UserError naming the part or the file; returns the manifest."""

    man = storage.join(loc, "manifest.json")
    got = storage.read_json(man)
    differ = [k for k in parts if got.get("parts", {}).get(k) != parts[k]]
    if differ:
        raise UserError(f"feature cache {loc}: built for another {', '.join(differ)} ({man}); delete the folder to "
                        f"rebuild it")
    for name, f in got["files"].items():
        path = storage.join(loc, name)
        if not storage.is_file(path) or storage.size(path) != f["bytes"]:
            raise UserError(f"feature cache file {path}: " + ("missing" if not storage.is_file(path) else
                            f"{storage.size(path)} bytes where the manifest says {f['bytes']}") + "; delete the folder")
        if file_meta(path).get("key") != got["key"]:
            raise UserError(f"feature cache file {path}: written for another key; delete the folder")
    return got


def file_meta(path: str) -> dict:
    """What a cache file's footer says it holds (key, rows, shapes); a footer that cannot be read: ShardError."""
    from med3dvlm.data.verified import open_file

    meta = open_file(path).schema_arrow.metadata or {}
    return json.loads(meta.get(b"med3dvlm.features", b"{}"))


def prepare(cfg, stage, shards: str, manifest: dict, init: str | None, log=print) -> str | None:
    """The cache folder a stage reads (building it for `on`), or None to read the volumes; one line says which."""
    mode = cfg.train.feature_cache
    if mode not in ("auto", "on", "off"):
        raise UserError(f"train.feature_cache={mode!r}: expected auto, on or off")
    reason = why_not(cfg, stage) if mode != "off" else None
    if mode == "off" or (reason and stage.export_kind != "med3dvlm-vlm"):
        return None
    if reason:
        if mode == "on":
            raise UserError(f"train.feature_cache=on: {reason}")
        log(f"[train] feature cache: not used ({reason})")
        return None
    parts = key_parts(cfg, manifest, init)
    loc = location(shards, parts)
    if not storage.is_file(storage.join(loc, "manifest.json")):
        if mode == "auto":
            log(f"[train] feature cache: none for this key ({loc}); reading the volumes (train.feature_cache=on "
                f"builds it)")
            return None
        build(cfg, shards, init, parts, loc, log)
    got = check(loc, parts)
    log(f"[train] feature cache: {loc} ({sum(f['rows'] for f in got['files'].values())} volumes, key "
        f"{got['key'][:16]}), read instead of the volumes")
    return loc


def build(cfg, shards: str, export: str, parts: dict, loc: str, log=print) -> dict:
    """One Ray Data actor pool (each actor holds the tower) over the shards, a file per shard; then the manifest."""
    import time

    import ray
    import ray.data

    from med3dvlm.data.shards import shard_files
    from med3dvlm.runtime import configure_data_context, data_settings

    started, key = time.time(), sha256_json(parts)
    files = shard_files(shards)
    configure_data_context(data_settings(), preserve_order=True)
    specs = [{"shard": f, "out": storage.join(loc, os.path.basename(f)), "key": key, "export": export} for f in files]
    size = max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1))))
    log(f"[train] feature cache: encoding {len(files)} shards with stage 1's tower in eval mode (BatchNorm running "
        f"statistics; the released code would use batch statistics) on {size} actors -> {loc}")
    done = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=len(specs)).map(
        ShardEncoder, compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1)
    results = [json.loads(r["result"]) for r in done.iter_rows()]
    manifest = {"key": key, "parts": parts, "format": FORMAT, "encoder_export": export, "encoder_mode": "eval",
                "shapes": results[0]["shapes"] if results else None,
                "files": {r["name"]: {k: r[k] for k in ("rows", "bytes", "sha256")} for r in results},
                "build_s": round(time.time() - started, 2)}
    storage.write_text(storage.join(loc, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


class ShardEncoder:
    """A Ray Data actor: the tower loaded at its first shard (the export comes in each row, not as a constructor
    argument, which Ray would keep in the object store for restarts), then one shard per call, written to a
    temporary file and moved whole to its final name (a file already there with this key is kept: the re-run of a
    killed build)."""

    def __init__(self):
        self.export, self.tower = None, None

    def load(self, export: str) -> None:
        import torch

        from med3dvlm.models.export import CLIP, read_meta

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        if read_meta(export)["kind"] == CLIP:
            from med3dvlm.models.clip import CLIPModel

            self.tower = CLIPModel.from_pretrained(export).vision
        else:
            from med3dvlm.models.vlm import VLM

            self.tower = VLM.from_pretrained(export, parts=("vision",)).vision
        self.export = export
        self.tower.eval()

    def __call__(self, row: dict) -> dict:
        spec = json.loads(row["spec"])
        if storage.is_file(spec["out"]):
            meta = file_meta(spec["out"])
            if meta.get("key") == spec["key"]:
                return {"result": json.dumps(self._record(spec["out"], meta))}
        return {"result": json.dumps(self.encode(spec))}

    @staticmethod
    def _record(path: str, meta: dict) -> dict:
        return {"name": os.path.basename(path), "rows": meta["rows"], "shapes": meta["shapes"],
                "bytes": storage.size(path), "sha256": storage.sha256(path)}

    def encode(self, spec: dict) -> dict:
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from med3dvlm.data.shards import volumes_from_table
        from med3dvlm.train.augment import apply_augment

        if spec["export"] != self.export:
            self.load(spec["export"])
        t = _read_shard(spec["shard"])
        feats = {k: [] for k in FEATURES}
        with torch.no_grad():
            for i in range(0, t.num_rows, ENCODE_BATCH):
                out = self.tower(apply_augment(volumes_from_table(t.slice(i, ENCODE_BATCH)), None))
                for k, f in zip(FEATURES, (out[-2], out[-1])):
                    feats[k] += [np.ascontiguousarray(x.float().numpy()) for x in f]
        shapes = {k: list(v[0].shape) if v else None for k, v in feats.items()}
        meta = {"key": spec["key"], "rows": t.num_rows, "shapes": shapes}
        cols = {c: t.column(c) for c in COLUMNS}
        cols.update({k: pa.array([x.tobytes() for x in v], pa.binary()) for k, v in feats.items()})
        table = pa.table(cols).replace_schema_metadata({"med3dvlm.features": json.dumps(meta)})
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".parquet.tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression="zstd", row_group_size=16, write_page_checksum=True)
            storage.put_file(tmp, spec["out"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self._record(spec["out"], meta)


def _read_shard(path: str):
    """The shard's columns the cache keeps, and its volumes, with the page checksums verified."""
    from med3dvlm.data.verified import open_file

    return open_file(path).read(columns=list(COLUMNS) + ["volume", "shape"])


def read_features(loc: str, split: str, split_field: str, columns: list[str]):
    """A Ray Dataset of the cache's rows of one split: `columns` (shard columns) with the features as float32 arrays."""
    from med3dvlm.data.verified import read_row_groups

    man = storage.read_json(storage.join(loc, "manifest.json"))
    keep = [c for c in columns if c != "volume"] + list(FEATURES)
    ds = read_row_groups([storage.join(loc, n) for n in sorted(man["files"])], keep, (split_field, [split]))
    return ds.map_batches(decode_features, batch_format="numpy", batch_size=8,
                                               fn_kwargs={"shapes": man["shapes"]})


def decode_features(batch: dict, shapes: dict) -> dict:
    from med3dvlm.data.shards import qa_as_lists

    for k in FEATURES:
        batch[k] = np.stack([np.frombuffer(b, np.float32).reshape(shapes[k]) for b in batch[k]]) if len(batch[k]) \
            else np.zeros((0, *shapes[k]), np.float32)
    return qa_as_lists(batch)
