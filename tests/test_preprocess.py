"""The Ray Data preprocessing job on the synthetic M3D tree with every bad input planted."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from med3dvlm.data.shards import read_shards, read_table, volumes_from_table
from med3dvlm.data.synthetic import BAD_INPUTS
from med3dvlm.data.transform import preprocess_volume
from med3dvlm.io import read_volume
from med3dvlm.data.preprocess import preprocess
from med3dvlm.runtime import UserError
from pipelines.preprocess import main

PLANTED = {  # planted input -> words its quarantine reason must contain
    "Axial_truncated": "3.png: cannot decode image", "Axial_zero_byte": "4.png: empty file",
    "Axial_stray_file": "notes.txt: not an image slice", "Axial_empty": "holds no slices",
    "Axial_no_text": "no text.txt", "Axial_missing": "image does not exist",
    "Axial_2d": "expected a 3-D volume", "Axial_nan": "NaN", "Axial_corrupt": "cannot read NIfTI",
    "Axial_pickle": "refused to load", "Axial_dicom_gap": "missing slices",
}


def test_every_bad_input_is_quarantined_with_its_file_and_nothing_is_lost(shards, synthetic_m3d):
    out, manifest, _ = shards
    _, counts = synthetic_m3d
    assert len(PLANTED) == len(BAD_INPUTS) == counts["planted_bad"]
    c = manifest["counts"]
    assert c["inputs"] == counts["volumes"] + counts["planted_bad"]
    assert c["inputs"] == c["rows"] + c["quarantined"]
    assert c["rows"] == counts["volumes"] and c["quarantined"] == counts["planted_bad"]
    reasons = [q["reason"] for q in manifest["quarantine"]]
    for name, words in PLANTED.items():
        hits = [r for r in reasons if name in r]
        assert len(hits) == 1 and words in hits[0], (name, hits)
    # the VQA row naming a missing image is quarantined too
    assert any("Axial_gone" in r and "M3D_VQA_train.csv" in r for r in reasons)
    assert c["qa_inputs"] == c["qa_rows"] + c["qa_quarantined"] + c["qa_on_quarantined_volumes"]
    assert len(read_table(out, ["volume_id"])) == c["rows"]


def test_shard_volume_equals_the_transform_byte_for_byte(shards):
    out, _, cfg = shards
    table = read_table(out)
    vols = volumes_from_table(table)
    for i in (0, len(table) // 2, len(table) - 1):
        expected = preprocess_volume(read_volume(table["source"][i].as_py()), cfg.data.shape, cfg.data.dtype)
        assert vols[i].dtype == np.uint8 and np.array_equal(vols[i], expected)


def test_schema_row_groups_splits_and_questions(shards, synthetic_m3d):
    out, manifest, cfg = shards
    for f in sorted((out / "volumes").glob("part-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert all(s <= cfg.data.row_group_size for s in sizes) and sum(sizes) > 0
    t = read_table(out, ["case_id", "split", "case_split", "report", "qa", "shape"])
    assert set(t["split"].to_pylist()) <= {"train", "validation", "test"}
    # leak-free split: no case in two case_splits
    by_case = {}
    for case, cs in zip(t["case_id"].to_pylist(), t["case_split"].to_pylist()):
        by_case.setdefault(case, set()).add(cs)
    assert all(len(v) == 1 for v in by_case.values())
    # reports are the study_findings section, questions carry all five types
    assert all(r and "study_findings" not in r and "Title:" not in r for r in t["report"].to_pylist())
    qtypes = {q["question_type"] for qa in t["qa"].to_pylist() for q in qa}
    assert qtypes == {1, 2, 3, 4, 5}
    assert any(q["yes_no"] for qa in t["qa"].to_pylist() for q in qa)
    assert t["shape"][0].as_py() == list(cfg.data.shape)


def test_ray_reader_yields_tensors_per_split(shards):
    out, manifest, cfg = shards
    ds = read_shards(out, split="train", split_field="split", columns=["volume", "split"])
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["volume"].shape[1:] == cfg.data.shape and batch["volume"].dtype == np.uint8
    assert set(batch["split"]) == {"train"}
    assert ds.count() == manifest["counts"]["split"]["train"]


def test_rerun_skips_finished_shards_with_identical_bytes(shards, synthetic_m3d, tmp_path):
    out, manifest, cfg = shards
    raw, _ = synthetic_m3d
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in (copy / "volumes").iterdir()}
    (copy / "volumes" / "part-00001.parquet").unlink()  # one shard lost: rebuilt, the others skipped
    logs = []
    again = preprocess(cfg, raw, copy, log=logs.append)
    after = {p.name: p.read_bytes() for p in (copy / "volumes").iterdir()}
    assert after == before
    assert f"{len(before)}/{len(before)} shards ({len(before) - 1} unchanged, skipped)" in logs[-1]
    strip = lambda m: {k: v for k, v in m.items() if k != "figures"}  # noqa: E731 (timings differ)
    assert json.loads((copy / "manifest.json").read_text()) == strip(manifest) == strip(again)
    assert again["figures"]["skipped_shards"] == len(before) - 1


def test_malformed_manifests_stop_at_once_with_one_message(synthetic_m3d, tmp_path, capsys):
    raw, _ = synthetic_m3d
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "M3D_Cap.json").write_text('{"train": [{"image": 3}]}')
    with pytest.raises(UserError, match="entry 0 of 'train' lacks string fields"):
        preprocess(__import__("med3dvlm.config", fromlist=["x"]).load_config("tiny"), bad, tmp_path / "o", log=lambda *_: None)
    (bad / "M3D_Cap.json").write_text('{"train": []}')
    (bad / "M3D_VQA_test.csv").write_text((raw / "M3D_VQA_test.csv").read_text().replace("Answer Choice", "Letter"))
    with pytest.raises(SystemExit) as e:
        from pipelines.common import run_main
        run_main(lambda: main(["--raw", str(bad), "--out", str(tmp_path / "o")]))
    assert e.value.code == 2
    assert "M3D_VQA_test.csv: missing column(s) Answer Choice" in capsys.readouterr().err


def test_generic_layout_of_nifti_npy_and_dicom(ray_session, tmp_path):
    import nibabel as nib

    from med3dvlm.config import load_config
    from med3dvlm.data.synthetic import dicom_series

    raw = tmp_path / "raw"
    raw.mkdir()
    src = __import__("pathlib").Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    shutil.copy(src, raw / "brain.nii")
    np.save(raw / "vol.npy", np.random.default_rng(0).random((6, 20, 20)).astype(np.float32))
    dicom_series(raw / "ct", n=4)
    (raw / "reports.csv").write_text("image,report,case_id\nbrain.nii,T1 brain,a\nvol.npy,noise,b\nct,CT series,c\nnone.nii,missing,d\n")
    m = preprocess(load_config("tiny"), raw, tmp_path / "out", log=lambda *_: None)
    assert m["layout"] == "generic" and m["counts"]["rows"] == 3 and m["counts"]["quarantined"] == 1
    assert "none.nii: image does not exist" in m["quarantine"][0]["reason"]


def test_a_worker_killed_mid_run_has_its_shard_redone_byte_identically(ray_session, synthetic_m3d, tmp_path):
    """Ray Data runs each shard as a task and runs a task again when its worker dies: a shard worker SIGKILLed while
    it works leaves no partial file under a final name, and the run ends with the bytes of an uninterrupted one."""
    import os
    import signal
    import threading
    import time

    import psutil

    from med3dvlm.config import load_config

    raw, _ = synthetic_m3d
    cfg = load_config("tiny", ["data.rows_per_shard=3"])  # many small shards: a worker is caught mid-shard
    quiet = lambda *_: None  # noqa: E731
    whole = preprocess(cfg, raw, tmp_path / "whole", log=quiet)
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "process_shard_row" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    break
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        again = preprocess(cfg, raw, tmp_path / "killed", log=quiet)
    finally:
        stop.set()
        t.join()
    assert killed, "no shard worker was found to kill"
    assert again["counts"] == whole["counts"] and again["quarantine"] == whole["quarantine"]
    names = sorted(os.listdir(tmp_path / "whole" / "volumes"))
    assert sorted(os.listdir(tmp_path / "killed" / "volumes")) == names  # no partial file left, under any name
    for n in names:
        assert (tmp_path / "killed" / "volumes" / n).read_bytes() == (tmp_path / "whole" / "volumes" / n).read_bytes()
