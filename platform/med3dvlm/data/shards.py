"""Parquet shards: one row per volume (README, "Shards").

The volume is stored as raw bytes (a binary column, C order, dtype and shape in the `shape` column and the schema
metadata): Parquet decodes a binary value with one copy, where a tensor (list) column costs a repetition level per
voxel (4x slower to read at 128x256x256). `read_shards` and `volumes_from_table` give (N, D, H, W) arrays back.

`process_shard` runs inside a Ray task: read + transform each volume of one shard, write `volumes/part-NNNNN.parquet`
in row groups, and record what it did in `_state/part-NNNNN.json`. A re-run with the same inputs finds that record
and skips the shard; the bytes are the same because the shard assignment, the row order and the writer are fixed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from med3dvlm import storage
from med3dvlm.data.transform import preprocess_volume
from med3dvlm.io import VolumeError, read_volume
from med3dvlm.runtime import NO_SPACE, UserError

QA_FIELDS = [
    ("question_type", "int8"), ("question", "string"), ("choice_a", "string"), ("choice_b", "string"),
    ("choice_c", "string"), ("choice_d", "string"), ("answer", "string"), ("answer_choice", "string"),
    ("split", "string"), ("yes_no", "bool"),
]


FORMAT = 3  # 3: pages with CRC checksums; 2: the volume as raw bytes (1: a tensor column). Part of every spec hash,
# so older shards are rewritten


def shard_schema(shape, dtype: str):
    import pyarrow as pa

    types = {"int8": pa.int8(), "string": pa.string(), "bool": pa.bool_()}
    qa_type = pa.list_(pa.struct([(n, types[t]) for n, t in QA_FIELDS]))
    meta = {"med3dvlm.volume": json.dumps({"shape": list(shape), "dtype": dtype, "format": FORMAT})}
    return pa.schema([
        ("volume_id", pa.string()), ("case_id", pa.string()), ("series", pa.string()),
        ("split", pa.string()), ("case_split", pa.string()), ("volume", pa.binary()),
        ("shape", pa.list_(pa.int32(), 3)), ("report", pa.string()), ("qa", qa_type), ("source", pa.string()),
    ], metadata=meta)


def _table(rows: list[dict], schema):
    import pyarrow as pa

    cols = {}
    for f in schema:
        if f.name == "volume":
            cols[f.name] = pa.array([np.ascontiguousarray(r["volume"]).tobytes() for r in rows], type=pa.binary())
        else:
            cols[f.name] = pa.array([r[f.name] for r in rows], type=f.type)
    return pa.Table.from_pydict(cols, schema=schema)


def decode_volumes(blobs, shapes) -> np.ndarray:
    """Raw volume bytes and their (D, H, W) -> an (N, D, H, W) array (uint8, or float16 at 2 bytes a voxel)."""
    out = []
    for b, shape in zip(blobs, shapes):
        shape = tuple(int(x) for x in shape)
        itemsize = len(b) // int(np.prod(shape))
        out.append(np.frombuffer(b, dtype={1: np.uint8, 2: np.float16}[itemsize]).reshape(shape))
    return np.stack(out) if out else np.zeros((0, 0, 0, 0), np.uint8)


def decode_batch(batch: dict) -> dict:
    """A numpy batch of shard rows with the volume bytes decoded (Ray Data's `map_batches`)."""
    return qa_as_lists({**batch, "volume": decode_volumes(batch["volume"], batch["shape"])})


def qa_as_lists(batch: dict) -> dict:
    """A numpy batch's questions as lists, for a `map_batches` that returns them: numpy arrays of dicts do not convert
    back to Arrow (they travel pickled, with a warning per task)."""
    if "qa" in batch:
        batch["qa"] = [list(q) if isinstance(q, np.ndarray) else q for q in batch["qa"]]
    return batch


def process_shard(spec: dict) -> dict:
    """Read, transform and write one shard. `spec`: index, out (path or URI), items (dicts), data (DataConfig as dict),
    spec_hash. The shard is written to a local file first and then moved or uploaded whole."""
    import resource
    import tempfile

    out, name = spec["out"], f"part-{spec['index']:05d}"
    path = storage.join(out, "volumes", f"{name}.parquet")
    state = storage.join(out, "_state", f"{name}.json")
    input_fp = _input_fingerprint(spec["items"])
    if storage.is_file(state) and storage.is_file(path):
        done = storage.read_json(state)
        if done.get("spec_hash") == spec["spec_hash"] and done.get("input_fp") == input_fp and \
                done.get("sha256") == storage.sha256(path):
            return {**done, "skipped": True}
    local_dir = os.path.dirname(storage.resolve(path)[1]) if storage.is_local(path) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{name}-", suffix=".parquet.tmp")
    os.close(fd)
    try:
        rows, quarantine = _write_shard(spec["items"], spec["data"], tmp)
        digest, nbytes = storage.sha256(tmp), os.path.getsize(tmp)
        storage.put_file(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise UserError(f"{NO_SPACE}{path}: {os.strerror(e.errno)}; nothing was written under that name and the "
                        f"previous manifest is kept: free space and run the same command again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    done = {"shard": name, "spec_hash": spec["spec_hash"], "input_fp": input_fp, "sha256": digest,
            "rows": rows, "inputs": len(spec["items"]), "quarantine": quarantine, "bytes": nbytes}
    storage.write_text(state, json.dumps(done, indent=1, sort_keys=True))
    return {**done, "skipped": False, "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def process_shard_row(row: dict) -> dict:
    """`process_shard` as a Ray Data `map` function: the spec in, the result out, each as JSON text (one column each,
    so Arrow never reshapes the nested items)."""
    return {"result": json.dumps(process_shard(json.loads(row["spec"])))}


def _input_fingerprint(items: list[dict]) -> str:
    """What says a shard's inputs changed: each input's file names, sizes and modification times."""
    fp = hashlib.sha256()
    for it in items:
        try:
            fp.update(json.dumps([it["volume_id"], storage.fingerprint(it["source"])]).encode())
        except OSError as e:
            fp.update(f"{it['volume_id']}:missing:{e}".encode())
    return fp.hexdigest()


def read_item(it: dict, data: dict) -> np.ndarray:
    """One input -> its preprocessed volume; raises VolumeError or storage.FetchError naming the input."""
    with storage.fetched(it["source"], data["max_file_bytes"]) as src:  # a remote input: a local copy
        try:
            vol = read_volume(src, data["max_file_bytes"])
        except VolumeError as e:  # name the input the user gave, not the temporary copy
            raise VolumeError(str(e).replace(src, it["source"])) from None
    return preprocess_volume(vol, tuple(data["shape"]), data["dtype"], tuple(data["window"]), data["window_mode"])


ROW_FIELDS = ("volume_id", "case_id", "series", "split", "case_split", "report", "qa", "source")


def _write_shard(items: list[dict], data: dict, tmp: str) -> tuple[int, list[dict]]:
    """Every item read and written to `tmp` in row groups of `row_group_size`; (rows, quarantine)."""
    import pyarrow.parquet as pq

    schema = shard_schema(tuple(data["shape"]), data["dtype"])
    rows, buffer, quarantine = 0, [], []
    with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True,  # verified when read
                          write_statistics=["split", "case_split", "volume_id"]) as writer:
        for it in items:
            try:
                arr = read_item(it, data)
            except (VolumeError, storage.FetchError) as e:
                quarantine.append({"input": it["key"], "volume_id": it["volume_id"], "reason": str(e)})
                continue
            except Exception as e:  # anything else is still this input's fault: report it, keep going
                quarantine.append({"input": it["key"], "volume_id": it["volume_id"],
                                   "reason": f"{it['source']}: {type(e).__name__}: {e}"})
                continue
            buffer.append({**{k: it[k] for k in ROW_FIELDS}, "volume": arr, "shape": list(data["shape"])})
            if len(buffer) == data["row_group_size"]:
                writer.write_table(_table(buffer, schema))
                rows, buffer = rows + len(buffer), []
        if buffer:
            writer.write_table(_table(buffer, schema))
            rows += len(buffer)
    return rows, quarantine


def list_shards(out: str | Path) -> list[str]:
    """The shard files under `out` (a path or URI), sorted; [] when there are none."""
    return storage.list_files(storage.join(out, "volumes"), "part-", ".parquet")


def shard_files(out: str | Path) -> list[str]:
    """`list_shards`, refusing an empty folder (a UserError: the user named the wrong folder)."""
    from med3dvlm.runtime import UserError

    files = list_shards(out)
    if not files:
        raise UserError(f"--shards {out}: no shards there (volumes/part-*.parquet); run pipelines.preprocess")
    return files


def read_shards(out: str | Path, split: str | list[str] | None = None, split_field: str = "case_split",
                columns: list[str] | None = None):
    """Ray Dataset over the shards, optionally one split or a list of them (by `case_split`, or the official `split`),
    read a row group at a time with its page checksums verified (`data.verified`: a damaged shard is one line)."""
    from med3dvlm.data.verified import read_row_groups

    where = (split_field, [split] if isinstance(split, str) else list(split)) if split is not None else None
    cols = list(dict.fromkeys(columns + (["shape"] if "volume" in columns else []))) if columns else None
    ds = read_row_groups(shard_files(storage.absolute(out)), cols, where)
    if not columns or "volume" in columns:
        ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=8)
    return ds


def read_table(out: str | Path, columns: list[str] | None = None, split: str | None = None, split_field: str = "case_split"):
    """The shards as one pyarrow Table without a Ray cluster (small data, tests, evaluation indexes)."""
    import pyarrow.dataset as pads

    from med3dvlm.data.verified import read_row_group, row_groups

    fs, _ = storage.resolve(out)
    files = shard_files(out)
    verify = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(
        page_checksum_verification=True))
    flt = (pads.field(split_field) == split) if split is not None else None
    if columns and "volume" in columns and "shape" not in columns:
        columns = columns + ["shape"]  # volumes_from_table decodes the bytes with it
    try:
        dset = pads.dataset([storage.resolve(f)[1] for f in files], format=verify, filesystem=fs)
        return dset.to_table(columns=columns, filter=flt)
    except (OSError, ValueError):  # a damaged file: find it, row group by row group, to name it
        for item in row_groups(files):
            read_row_group(item["file"], item["row_group"], columns)
        raise


def volumes_from_table(table) -> np.ndarray:
    """The `volume` column of a Table from `read_table` (which must also hold `shape`) as an (N, D, H, W) array."""
    if "shape" not in table.column_names:
        raise ValueError("volumes_from_table needs the 'shape' column beside 'volume'")
    return decode_volumes(table.column("volume").to_pylist(), table.column("shape").to_pylist())
