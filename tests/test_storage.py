"""Storage by path or URI (med3dvlm.storage), against the local disk and an S3-compatible server on localhost."""

import os
import time

import pytest

from med3dvlm import storage


def test_join_keeps_scheme_and_query():
    assert storage.join("s3://b/x/", "volumes", "part-0.parquet") == "s3://b/x/volumes/part-0.parquet"
    assert storage.join("s3://b/x?endpoint_override=h:9000&scheme=http", "y") == "s3://b/x/y?endpoint_override=h:9000&scheme=http"
    assert storage.join("/data/x", "y") == "/data/x/y"
    assert storage.absolute("rel/dir") == os.path.join(os.getcwd(), "rel/dir")
    assert storage.absolute("s3://b/rel") == "s3://b/rel"
    assert storage.is_local("file:///tmp/x") and storage.is_local("x") and not storage.is_local("s3://b/x")


@pytest.fixture(params=["path", "file-uri", "s3"])
def root(request, tmp_path):
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file-uri":
        return "file://" + str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_files_round_trip(root, tmp_path):
    a = storage.join(root, "sub", "a.json")
    assert not storage.exists(a) and storage.list_files(storage.join(root, "sub")) == []
    storage.write_text(a, '{"x": 1}')
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\0" * 10)
    assert storage.read_json(a) == {"x": 1} and storage.is_file(a) and storage.is_dir(storage.join(root, "sub"))
    assert storage.size(storage.join(root, "sub", "b.bin")) == 10
    assert [f.rsplit("/", 1)[1] for f in storage.list_files(storage.join(root, "sub"))] == ["a.json", "b.bin"]
    assert storage.list_files(storage.join(root, "sub"), suffix=".bin") == [storage.join(root, "sub", "b.bin")]
    local = tmp_path / "shard.tmp"
    local.write_bytes(b"parquet bytes")
    storage.put_file(str(local), storage.join(root, "volumes", "part-00000.parquet"))
    assert not local.exists() and storage.read_bytes(storage.join(root, "volumes", "part-00000.parquet")) == b"parquet bytes"
    storage.delete(a)
    storage.delete(a)  # nothing there is fine
    assert not storage.exists(a)
    storage.delete(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "sub", "b.bin"))


def test_staged_uploads_only_on_success(root):
    with storage.staged(storage.join(root, "export")) as d:
        os.makedirs(os.path.join(d, "text"))
        open(os.path.join(d, "config.json"), "w").write("{}")
        open(os.path.join(d, "text", "vocab.txt"), "w").write("a\nb\n")
    assert storage.read_text(storage.join(root, "export", "text", "vocab.txt")) == "a\nb\n"
    with pytest.raises(RuntimeError):
        with storage.staged(storage.join(root, "failed")) as d:
            open(os.path.join(d, "config.json"), "w").write("{}")
            raise RuntimeError("boom")
    if not storage.is_local(root):  # a local target is written in place; a remote one only after the block succeeds
        assert not storage.exists(storage.join(root, "failed", "config.json"))
    with storage.staged(storage.join(root, "export"), pull=True) as d:  # resume: what is there comes down first
        assert open(os.path.join(d, "text", "vocab.txt")).read() == "a\nb\n"
        open(os.path.join(d, "more.txt"), "w").write("x")
    assert storage.is_file(storage.join(root, "export", "more.txt"))
    assert storage.is_file(storage.join(root, "export", "config.json"))


def test_local_path_copies_remote_once_per_version(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MED3DVLM_CACHE", str(tmp_path / "cache"))
    src = bucket + "/model"
    storage.write_text(storage.join(src, "config.json"), '{"v": 1}')
    storage.write_text(storage.join(src, "llm", "w.txt"), "weights")
    first = storage.local_path(src)
    assert open(os.path.join(first, "llm", "w.txt")).read() == "weights"
    assert storage.local_path(src) == first  # cached: same listing, same copy
    time.sleep(1.1)  # S3 mtimes have one-second resolution
    storage.write_text(storage.join(src, "config.json"), '{"v": 22}')  # re-exported: a fresh copy
    second = storage.local_path(src)
    assert second != first and open(os.path.join(second, "config.json")).read() == '{"v": 22}'
    local = tmp_path / "plain"
    local.mkdir()
    assert storage.local_path(str(local)) == str(local)  # local paths are used in place
    with pytest.raises(FileNotFoundError, match="no files"):
        storage.local_path(bucket + "/nothing")


def test_copy_dir_between_stores(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.txt").write_text("1")
    (src / "y.txt").write_text("2")
    storage.copy_dir(str(src), bucket + "/c")
    storage.copy_dir(bucket + "/c", bucket + "/d")
    storage.copy_dir(bucket + "/d", str(tmp_path / "back"))
    assert (tmp_path / "back" / "a" / "x.txt").read_text() == "1" and (tmp_path / "back" / "y.txt").read_text() == "2"
    # bytes travel as they are: pyarrow's streams would otherwise (de)compress by extension (.gz, .nii.gz)
    storage.write_bytes(bucket + "/e/volume.nii.gz", b"not gzip")
    storage.copy_dir(bucket + "/e", str(tmp_path / "e"))
    assert (tmp_path / "e" / "volume.nii.gz").read_bytes() == b"not gzip"
    (tmp_path / "e" / "real.nii.gz").write_bytes(__import__("gzip").compress(b"voxels"))
    storage.copy_dir(str(tmp_path / "e"), bucket + "/f")
    assert __import__("gzip").decompress(storage.read_bytes(bucket + "/f/real.nii.gz")) == b"voxels"
    with storage.fetched(bucket + "/f/real.nii.gz") as local:
        assert open(local, "rb").read() == storage.read_bytes(bucket + "/f/real.nii.gz")


# ------------------------------------------------------------------------------------------------ pipelines on a bucket
def _names(loc) -> set:
    return {f.rsplit("/", 1)[1] for f in storage.list_files(loc)}


def test_training_events_reach_a_bucket_at_every_checkpoint_not_only_at_the_end(bucket):
    from med3dvlm.train.metrics import StepLog
    from med3dvlm.train.stages import get_stage

    log = StepLog(get_stage(1), 2, bucket + "/tb")
    log.scalars({"loss": 1.0}, 0)
    assert not storage.list_files(bucket + "/tb", prefix="events.")
    log.sync()  # a checkpoint: a worker killed after it leaves these events in the bucket
    assert storage.list_files(bucket + "/tb", prefix="events.")
    first, staged = storage.list_files(bucket + "/tb", prefix="events."), log.tb_dir
    # the worker is killed here (its log never closed); a restarted one on this node replaces its staging folder
    log = StepLog(get_stage(1), 2, bucket + "/tb")
    assert log.tb_dir == staged and not {storage.join(bucket + "/tb", f) for f in os.listdir(staged)} & set(first)
    log.scalars({"loss": 0.5}, 1)
    log.close()
    log.sync()  # the final checkpoint comes after the export closed the log
    assert not os.path.exists(log.tb_dir)
    assert set(first) < set(storage.list_files(bucket + "/tb", prefix="events."))  # both attempts' events kept


def test_pipelines_read_and_write_a_bucket(shards, synthetic_m3d, bucket, chain, tmp_path, monkeypatch):
    """Preprocess -> stage 2 (from a stage-1 export in the bucket: the session chain's) -> evaluation, with every
    output in a bucket and nothing on a shared disk. Stage 1 writes its export and checkpoints by the same calls as
    stage 2, so one training run in the bucket covers both (a second was 30-40 s of the suite)."""
    import csv
    import io

    import torch
    from safetensors.torch import load

    from conftest import cfg_for
    from med3dvlm.data.shards import read_table
    from med3dvlm.models.vlm import VLM
    from med3dvlm.eval.runner import evaluate
    from pipelines.evaluate import parse_args
    from med3dvlm.data.preprocess import preprocess
    from med3dvlm.train.driver import train

    monkeypatch.setenv("MED3DVLM_CACHE", str(tmp_path / "cache"))
    local_shards, local_manifest, cfg = shards
    raw, _ = synthetic_m3d
    s3_shards, ckpt = bucket + "/shards", bucket + "/ckpt"
    quiet = lambda *_: None  # noqa: E731

    m = preprocess(cfg, raw, s3_shards, log=quiet)
    # same inputs, same config: byte-identical shards whether they land on a disk or in a bucket
    assert m["outputs"] == local_manifest["outputs"] and m["counts"] == local_manifest["counts"]
    assert _names(bucket + "/shards") == {"manifest.json", "run.json"}
    assert storage.read_json(s3_shards + "/manifest.json")["outputs"] == m["outputs"]
    assert preprocess(cfg, raw, s3_shards, log=quiet)["figures"]["skipped_shards"] == m["counts"]["shards"]
    assert read_table(s3_shards, ["volume_id"]).equals(read_table(local_shards, ["volume_id"]))

    stage1 = ckpt + "/stage1"
    storage.copy_dir(chain[1]["export"], stage1)
    r2 = train(cfg_for(), 2, s3_shards, ckpt, stage1, log=quiet)  # --init from the bucket
    assert r2["export"] == ckpt + "/stage2" and r2["figures"]["loss_last"] < r2["figures"]["loss_first"]
    assert {"config.json", "model.safetensors", "history.json", "run.json", "curves.png", "placement.json"} <= _names(r2["export"])
    assert storage.list_files(r2["export"] + "/tensorboard", prefix="events.")
    assert storage.read_json(r2["export"] + "/history.json") == r2["history"]
    # DeepSpeed checkpoints went to the bucket through Ray Train's storage
    assert r2["checkpoint"].path.startswith(ckpt.removeprefix("s3://") + "/ray/")
    assert "ds" in {i.rsplit("/", 1)[1] for i in _listing(r2["checkpoint"].path)}
    exported = load(storage.read_bytes(r2["export"] + "/model.safetensors"))
    vlm = VLM.from_pretrained(r2["export"])  # copied once into the node-local cache, then loaded
    assert all(torch.equal(v, exported[k]) for k, v in vlm.state_dict().items())
    assert os.listdir(tmp_path / "cache")

    def evaluate_into(task, model, out, *extra):
        return evaluate(parse_args(["--task", task, "--model", model, "--shards", s3_shards, "--out", out,
                                   "--allow-overlap", *extra]), log=quiet)

    res = evaluate_into("retrieval", stage1, bucket + "/eval-retrieval")
    assert res["out"] == bucket + "/eval-retrieval"
    assert {"results.json", "results.md", "samples.csv", "similarity.png", "run.json"} <= _names(res["out"])
    assert storage.read_json(res["out"] + "/results.json")["metrics"] == res["metrics"]
    first = evaluate_into("report", r2["export"], bucket + "/eval-report", "--limit", "1", "--max-new-tokens", "4",
                          "--no-bertscore")
    res = evaluate_into("report", r2["export"], bucket + "/eval-report", "--resume", "--max-new-tokens", "4",
                        "--no-bertscore")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(res["out"] + "/samples.csv"))))
    assert first["n"] == 1 and res["n"] == len(rows) > 1 and len({r["key"] for r in rows}) == len(rows)


def _listing(fs_path: str) -> list[str]:
    import pyarrow.fs as pafs

    fs = pafs.FileSystem.from_uri("s3://" + fs_path)[0]
    return [i.path for i in fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))]


def test_preprocess_reads_raw_data_from_a_bucket(shards, synthetic_m3d, bucket, tmp_path):
    """The M3D tree (with its planted bad inputs) in a bucket: the same rows, volumes and quarantine as from disk."""
    from med3dvlm.data.shards import read_table, volumes_from_table
    from med3dvlm.data.preprocess import preprocess

    local_shards, local_manifest, cfg = shards
    raw, _ = synthetic_m3d
    storage.copy_dir(str(raw), bucket + "/M3D")
    m = preprocess(cfg, bucket + "/M3D", str(tmp_path / "shards"), log=lambda *_: None)
    assert m["counts"] == local_manifest["counts"] and m["layout"] == local_manifest["layout"] == "m3d"
    assert m["inputs"]["manifest_files"] == local_manifest["inputs"]["manifest_files"]
    as_uri = lambda q: {k: v.replace(str(raw), bucket + "/M3D") for k, v in q.items()}  # noqa: E731
    assert m["quarantine"] == [as_uri(q) for q in local_manifest["quarantine"]]  # each names its file in the bucket
    cols = ["volume_id", "case_id", "split", "case_split", "report", "qa"]
    ours, theirs = read_table(str(tmp_path / "shards")), read_table(local_shards)
    assert ours.select(cols).equals(theirs.select(cols))
    assert (volumes_from_table(ours) == volumes_from_table(theirs)).all()
    assert all(s.startswith(bucket + "/M3D/") for s in ours.column("source").to_pylist())



def test_uploads_resolve_through_any_store_on_the_root_and_expire_oldest_first(root):
    """Two ingress replicas = two VolumeStores on one root: an id put through either is read through the other, with
    its volume and metadata intact (no pickle); beyond `max_stored` the oldest upload expires; a malformed id never
    reaches a path."""
    import numpy as np

    from med3dvlm.io.volume_store import VolumeStore

    a, b = VolumeStore(root, max_stored=2, memory=1), VolumeStore(root, max_stored=2, memory=1)
    vols = [np.random.default_rng(i).integers(0, 255, (4, 6, 5), dtype=np.uint8) for i in range(3)]
    ids = []
    for i, (store, v) in enumerate(zip((a, b, a), vols)):
        ids.append(store.put({"volume": v, "info": {"format": "npy", "i": i}, "name": f"scan {i}.npy"}))
        time.sleep(0.01 if storage.is_local(root) else 1.05)  # distinct modification times (S3's are in seconds)
    assert len(set(ids)) == 3
    got = b.get(ids[2])
    assert np.array_equal(got["volume"], vols[2]) and got["volume"].dtype == np.uint8
    assert got["info"] == {"format": "npy", "i": 2} and got["name"] == "scan 2.npy"
    assert a.get(ids[1])["name"] == "scan 1.npy"
    assert VolumeStore(root).get(ids[0]) is None  # expired: the store keeps the newest two
    for bad in ("../../etc/passwd", "0" * 15, "0" * 16 + "/x", "", "ABCDEF0123456789"):
        assert a.get(bad) is None
    assert b.put({"volume": vols[2].copy(), "info": {}, "name": "again"}) == ids[2]  # the same volume, the same id


def test_an_upload_is_never_removed_by_its_own_pruning(tmp_path):
    """A bucket's modification times have whole seconds: uploads of one second tie, and the one just written must
    not be the one pruned. Here the older uploads' times are set ahead of it, the worst case of such a tie."""
    import numpy as np

    from med3dvlm.io.volume_store import VolumeStore

    store = VolumeStore(str(tmp_path), max_stored=2)
    vols = [np.full((4, 4, 4), i, np.uint8) for i in range(3)]
    older = [store.put({"volume": v, "info": {}, "name": f"{i}.npy"}) for i, v in enumerate(vols[:2])]
    ahead = time.time() + 3600
    for vid in older:
        os.utime(tmp_path / f"{vid}.npz", (ahead, ahead))
    new = store.put({"volume": vols[2], "info": {}, "name": "2.npy"})
    assert VolumeStore(str(tmp_path)).get(new)["name"] == "2.npy"
    assert {p.name for p in tmp_path.glob("*.npz")} == {f"{new}.npz", f"{max(older)}.npz"}  # ties: by name


def test_apps_that_preprocess_differently_keep_uploads_apart(tmp_path):
    """Two Serve apps on one upload root (the default folder on one machine): an app resolves and prunes only the
    uploads preprocessed its way, so an id from an app with another input shape is unknown to it."""
    import numpy as np

    from med3dvlm.io.volume_store import VolumeStore
    from serve.app import AppSettings, upload_store

    prep = {"input_shape": [32, 64, 64], "window": [-1000, 1000], "window_mode": "minmax"}
    app = AppSettings(uploads=str(tmp_path))
    small = upload_store(app, prep)
    large = upload_store(app, {**prep, "input_shape": [128, 256, 256]})
    assert small["root"] != large["root"] and small == upload_store(app, dict(prep))
    assert all(s["root"].startswith(str(tmp_path)) for s in (small, large))
    vid = VolumeStore(small["root"], max_stored=1).put({"volume": np.zeros((32, 64, 64), np.uint8), "info": {},
                                                        "name": "a.npy"})
    assert VolumeStore(small["root"]).get(vid) is not None and VolumeStore(large["root"]).get(vid) is None
    VolumeStore(large["root"], max_stored=1).put({"volume": np.ones((4, 4, 4), np.uint8), "info": {}, "name": "b.npy"})
    assert VolumeStore(small["root"]).get(vid) is not None  # the other app's pruning left it alone
