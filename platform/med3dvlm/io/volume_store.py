"""Uploaded volumes by content, resolvable by every ingress replica: no shared actor on the request path.

An upload's id is the hash of its preprocessed volume. The volume is written once to a storage root (a local path,
a shared disk, or a bucket such as `s3://bucket/uploads`: `med3dvlm.storage`), as an `.npz` read back without
pickle; each replica keeps the few it used last in memory in front of it. The root keeps the newest `max_stored`
uploads (the replica that writes one removes the oldest beyond that), so an id older than that is answered as
expired. Ids are checked against their pattern before they touch a path, so a request cannot name a file outside
the root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from collections import OrderedDict

import numpy as np

from med3dvlm import storage

ID = re.compile(r"[0-9a-f]{16}")
SUFFIX = ".npz"


def volume_id(volume: np.ndarray) -> str:
    """The id of a preprocessed volume: its content and shape, hashed."""
    h = hashlib.sha256(np.ascontiguousarray(volume).tobytes())
    h.update(repr(volume.shape).encode())
    return h.hexdigest()[:16]


def encode(item: dict) -> bytes:
    """The volume, the viewer's copy on the upload's own grid (`display`, when there is one) and the metadata."""
    buf = io.BytesIO()
    meta = json.dumps({"info": item["info"], "name": item["name"]})
    extra = {"display": item["display"]} if item.get("display") is not None else {}
    np.savez(buf, volume=item["volume"], meta=np.array(meta), **extra)
    return buf.getvalue()


def decode(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return {"volume": z["volume"], "display": z["display"] if "display" in z.files else None, **meta}


class VolumeStore:
    """`put(item) -> id` and `get(id) -> item | None` over a storage root, with an in-memory LRU of `memory` items."""

    def __init__(self, root: str, max_stored: int = 256, memory: int = 8):
        self.root, self.max_stored, self.memory = storage.absolute(root), max_stored, memory
        self.recent: OrderedDict[str, dict] = OrderedDict()
        if storage.is_local(self.root):  # uploads are patients' scans: readable by this user only
            os.makedirs(storage.resolve(self.root)[1], mode=0o700, exist_ok=True)

    def put(self, item: dict) -> str:
        """Store `{"volume", "info", "name"}` (and `display`); returns its id. The same volume again gets the same
        id."""
        vid = volume_id(item["volume"])
        storage.write_bytes(self._path(vid), encode(item))
        self._remember(vid, item)
        self._prune(keep=vid)
        return vid

    def get(self, vid: str) -> dict | None:
        """The item stored under `vid`; None when it is malformed, unknown or expired."""
        if not ID.fullmatch(vid or ""):
            return None
        if vid in self.recent:
            self.recent.move_to_end(vid)
            return self.recent[vid]
        try:
            item = decode(storage.read_bytes(self._path(vid)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # gone (expired), or not one of ours
            return None
        self._remember(vid, item)
        return item

    def _path(self, vid: str) -> str:
        return storage.join(self.root, vid + SUFFIX)

    def _remember(self, vid: str, item: dict) -> None:
        self.recent[vid] = item
        self.recent.move_to_end(vid)
        while len(self.recent) > self.memory:
            self.recent.popitem(last=False)

    def _prune(self, keep: str) -> None:
        """Remove the oldest uploads beyond `max_stored` (another replica may be removing the same ones), never `keep`,
        the one just written: a bucket's modification times have whole seconds, so uploads of the same second tie
        and the newest could otherwise sort first and be removed by its own upload."""
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self.root)
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                 if i.type == pafs.FileType.File and ID.fullmatch(i.base_name.removesuffix(SUFFIX))]
        infos = [i for i in infos if i.base_name != keep + SUFFIX]
        for old in sorted(infos, key=lambda i: (i.mtime_ns or 0, i.base_name))[:max(0, len(infos) + 1 - self.max_stored)]:
            self.recent.pop(old.base_name.removesuffix(SUFFIX), None)
            try:
                fs.delete_file(old.path)
            except (FileNotFoundError, OSError):
                pass
