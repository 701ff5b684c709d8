"""Where shards, checkpoints and exports live: a local or NFS path, or a URI that pyarrow's filesystems understand
(`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `file:///...`).

Every pipeline reads and writes its outputs through these helpers, so the same command runs on a laptop (paths) and on
a cluster whose nodes share no disk (a bucket). S3 credentials and endpoint come from the usual AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL_S3` for MinIO and other S3-compatible
stores) or from URI query options (`s3://bucket/x?endpoint_override=host:9000&scheme=http`), which `join` keeps.

Libraries that need a local directory (transformers, tokenizers) get one from `local_path`: a remote directory is copied
once per node into a cache keyed by its listing, so a re-exported model gets a fresh copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class StoreError(OSError):
    """A store that cannot be reached or read (no such host, no credentials, no such bucket): the location and the
    store's own reason, on one line; entry points print it as such (exit 2)."""


@contextmanager
def _store(loc):
    """pyarrow's errors for `loc` as a StoreError naming it (its reason is the first line of theirs)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # pyarrow: OSError for the store, ArrowInvalid (a ValueError) for the URI
        if isinstance(e, StoreError) or not is_uri(loc):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"{loc}: the store cannot be read ({reason})") from None


def is_uri(loc: str | Path) -> bool:
    return "://" in str(loc)


def resolve(loc: str | Path):
    """(pyarrow FileSystem, path on it). A plain path is made absolute on the local filesystem."""
    import pyarrow.fs as pafs

    if is_uri(loc):
        return pafs.FileSystem.from_uri(str(loc))
    return pafs.LocalFileSystem(), os.path.abspath(str(loc))


def is_local(loc: str | Path) -> bool:
    """True when `loc` is on this machine's filesystem (a path or a file:// URI)."""
    import pyarrow.fs as pafs

    return not is_uri(loc) or isinstance(resolve(loc)[0], pafs.LocalFileSystem)


def absolute(loc: str | Path) -> str:
    """What to hand to another process: URIs as given, paths made absolute."""
    return str(loc) if is_uri(loc) else os.path.abspath(str(loc))


def join(loc: str | Path, *parts: str) -> str:
    """`loc/part/...`, keeping a URI's scheme and query options."""
    if not is_uri(loc):
        return os.path.join(str(loc), *parts)
    base, q, query = str(loc).partition("?")
    tail = "/".join(p.strip("/") for p in parts if p)
    return (base.rstrip("/") + "/" + tail if tail else base) + q + query


def _info(loc):
    with _store(loc):
        fs, path = resolve(loc)
        return fs.get_file_info(path)


def is_file(loc) -> bool:
    import pyarrow.fs as pafs

    return _info(loc).type == pafs.FileType.File


def is_dir(loc) -> bool:
    import pyarrow.fs as pafs

    return _info(loc).type == pafs.FileType.Directory


def exists(loc) -> bool:
    import pyarrow.fs as pafs

    return _info(loc).type != pafs.FileType.NotFound


def read_bytes(loc) -> bytes:
    fs, path = resolve(loc)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def read_text(loc) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc):
    return json.loads(read_bytes(loc))


def write_bytes(loc, data: bytes) -> None:
    """Write a whole file; readers never see half of it (rename locally, a single PUT on object stores)."""
    if is_local(loc):
        path = resolve(loc)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = resolve(loc)
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def write_text(loc, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def list_files(loc, prefix: str = "", suffix: str = "") -> list[str]:
    """Files directly under `loc` whose names match, sorted; [] when `loc` does not exist."""
    import pyarrow.fs as pafs

    with _store(loc):
        fs, path = resolve(loc)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [join(loc, n) for n in names if n.startswith(prefix) and n.endswith(suffix)]


def delete(loc) -> None:
    """Remove a file or a directory tree; nothing there is fine."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(path)


def sha256(loc) -> str:
    fs, path = resolve(loc)
    h = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def size(loc) -> int:
    return _info(loc).size


def put_file(local: str, loc) -> None:
    """Move a finished local file to `loc` (an atomic rename when both are local; otherwise an upload, then delete)."""
    if is_local(loc):
        dest = resolve(loc)[1]
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.replace(local, dest)
            return
        except OSError:  # another device: copy next to the target, then rename
            tmp = dest + ".tmp"
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
    else:
        import pyarrow.fs as pafs

        fs, dest = resolve(loc)
        pafs.copy_files(local, dest, destination_filesystem=fs)
    os.unlink(local)


def copy_dir(src, dst) -> None:
    """Copy a directory tree between any two locations (files already at `dst` and not in `src` stay)."""
    import pyarrow.fs as pafs

    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    if isinstance(sfs, pafs.LocalFileSystem) and isinstance(dfs, pafs.LocalFileSystem):
        if os.path.realpath(spath) != os.path.realpath(dpath):
            shutil.copytree(spath, dpath, dirs_exist_ok=True)
        return
    if isinstance(dfs, pafs.LocalFileSystem):
        os.makedirs(dpath, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


@contextmanager
def staged(loc, pull: bool = False):
    """A local directory to write `loc`'s files into: `loc` itself when it is local, else a temporary directory that is
    uploaded when the block succeeds (`pull`: first filled with what `loc` already holds, to resume or append)."""
    if is_local(loc):
        path = resolve(loc)[1]
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="med3dvlm-staged-") as d:
        if pull and is_dir(loc):
            copy_dir(loc, d)
        yield d
        copy_dir(d, loc)


def cache_root() -> str:
    return os.environ.get("MED3DVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "med3dvlm", "remote"))


def local_path(loc) -> str:
    """A local directory holding what directory `loc` holds: the path itself when local; else a node-local copy in
    `cache_root()`, made once per node (a file lock) and keyed by the remote listing (names, sizes, mtimes)."""
    import pyarrow.fs as pafs
    from filelock import FileLock

    if is_local(loc):
        return resolve(loc)[1]
    fs, path = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"{loc}: no files there")
    key = hashlib.sha1(json.dumps([str(loc), files]).encode()).hexdigest()[:20]
    root = cache_root()
    dest = os.path.join(root, key)
    os.makedirs(root, exist_ok=True)
    with FileLock(dest + ".lock"):
        if not os.path.isdir(dest):
            tmp = tempfile.mkdtemp(dir=root, prefix=f".{key}-")
            pafs.copy_files(path, tmp, source_filesystem=fs, use_threads=True)
            os.replace(tmp, dest)
    return dest



class RemotePath:
    """The read-only pathlib subset the manifest builder uses (`/`, name, exists, is_file, is_dir, iterdir, read_bytes,
    read_text) over one recursive listing of a remote tree: one listing instead of a request per check. `str()` is the
    URI, which is what preprocessing workers fetch."""

    def __init__(self, uri: str, _index: dict | None = None, _rel: str = ""):
        if _index is None:
            _index = _list_tree(uri)
        self._index, self._rel = _index, _rel

    def __truediv__(self, other) -> "RemotePath":
        rel = posixpath.normpath(posixpath.join(self._rel, str(other)))
        return RemotePath("", self._index, "" if rel == "." else rel)

    def __str__(self) -> str:
        return join(self._index["uri"], self._rel) if self._rel else self._index["uri"]

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return posixpath.basename(self._rel or self._index["root"])

    def is_file(self) -> bool:
        return self._index["kinds"].get(self._rel) == "file"

    def is_dir(self) -> bool:
        return self._index["kinds"].get(self._rel) == "dir"

    def exists(self) -> bool:
        return self._rel in self._index["kinds"]

    def iterdir(self):
        for rel in sorted(self._index["children"].get(self._rel, [])):
            yield RemotePath("", self._index, rel)

    def read_bytes(self) -> bytes:
        with self._index["fs"].open_input_stream(f"{self._index['root']}/{self._rel}", compression=None) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)


def _list_tree(uri: str) -> dict:
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    root = root.rstrip("/")
    kinds = {"": "dir"}
    for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = i.path[len(root) + 1:]
        if i.type == pafs.FileType.File:
            kinds[rel] = "file"
        elif i.type == pafs.FileType.Directory:
            kinds.setdefault(rel, "dir")
        parts = rel.split("/")
        for k in range(1, len(parts)):  # object stores need not list the "folders" between
            kinds.setdefault("/".join(parts[:k]), "dir")
    children: dict[str, list[str]] = {}
    for rel in kinds:
        if rel:
            children.setdefault(posixpath.dirname(rel), []).append(rel)
    if len(kinds) == 1 and fs.get_file_info(root).type == pafs.FileType.NotFound:
        kinds = {}
    return {"uri": uri.rstrip("/"), "fs": fs, "root": root, "kinds": kinds, "children": children}


def as_tree(loc):
    """A `pathlib.Path` for a local location, a `RemotePath` (one listing) for a remote one."""
    return Path(resolve(loc)[1]) if is_local(loc) else RemotePath(str(loc))


class FetchError(OSError):
    """A remote input that is missing or too large to copy: the input's fault, reported with its URI."""


@contextmanager
def fetched(loc, max_bytes: int | None = None):
    """A local path for the file or folder at `loc`: itself when local, else a temporary copy (deleted afterwards).
    A remote input larger than `max_bytes` in total is refused before any byte is copied."""
    import pyarrow.fs as pafs

    if is_local(loc):
        yield resolve(loc)[1]
        return
    fs, path = resolve(loc)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FetchError(f"{loc}: does not exist")
    files = [info] if info.type == pafs.FileType.File else [
        i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    total = sum(i.size for i in files)
    if max_bytes is not None and total > max_bytes:
        raise FetchError(f"{loc}: {total} bytes, over the {max_bytes}-byte limit per volume")
    with tempfile.TemporaryDirectory(prefix="med3dvlm-fetch-") as d:
        local = os.path.join(d, posixpath.basename(path.rstrip("/")))
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(path, compression=None) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            os.makedirs(local)
            pafs.copy_files(path, local, source_filesystem=fs, use_threads=True)
        yield local


def fingerprint(loc) -> list:
    """(name, size, mtime_ns) of a file, or of every file directly in a folder: what says an input changed."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc}: does not exist")
    if info.type == pafs.FileType.File:
        return [(info.base_name, info.size, info.mtime_ns)]
    return [(i.base_name, i.size, i.mtime_ns) for i in sorted(fs.get_file_info(pafs.FileSelector(path)),
                                                            key=lambda i: i.base_name)]
