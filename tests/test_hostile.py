"""Hostile and odd input, without Ray: the upload parser under fuzzing and named attacks, and raw trees whose
manifests point outside the data root, carry broken text or malformed VQA rows."""

import io
import json
import os
import re
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from med3dvlm.data.manifest import ManifestError, build_manifest
from med3dvlm.io import VolumeError, read_slice_folder, read_upload
from uploads import EDITS, dicom_zip, edited, hostile_uploads, nifti_bytes, npy_bytes, png, png_zip, volume, zip_of

SMALL = volume((4, 10, 12))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One valid upload of every kind, small, for the mutations to start from."""
    return [nifti_bytes(SMALL, gz=False), nifti_bytes(SMALL), npy_bytes(SMALL), png_zip(SMALL),
            dicom_zip(tmp_path_factory.mktemp("dcm"), n=3)]


def _parses_or_refuses(data: bytes) -> None:
    try:
        vol = read_upload("fuzz.bin", data, max_bytes=1 << 20, max_unpacked=8 << 20)
    except VolumeError:
        return
    assert vol.array.ndim == 3 and np.isfinite(vol.array.astype(np.float64)).all()


@seed(20261128)
@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(which=st.integers(0, 4), edits=EDITS)
def test_fuzzed_uploads_parse_to_a_finite_volume_or_are_refused(seeds, which, edits):
    _parses_or_refuses(edited(seeds[which], edits))


@seed(7)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(names=st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=4))
def test_fuzzed_zip_member_names_are_refused_or_parsed(names):
    one = png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    try:
        data = zip_of({n: one for n in names})
    except Exception:  # zipfile itself cannot write some names: nothing to upload
        return
    _parses_or_refuses(data)


# ------------------------------------------------------------------------------------------------ named attacks
def _dicom_zip_with(tmp_path, edit) -> bytes:
    import pydicom

    data = zipfile.ZipFile(io.BytesIO(dicom_zip(tmp_path, n=3)))
    members = {}
    for k, name in enumerate(data.namelist()):
        ds = pydicom.dcmread(io.BytesIO(data.read(name)))
        edit(ds, k)
        b = io.BytesIO()
        ds.save_as(b)
        members[name] = b.getvalue()
    return zip_of(members)


def _two_d_ipp(ds, k):
    ds.ImagePositionPatient = [0.0, float(k)]


def _text_slope(ds, k):
    ds.add_new(0x00281053, "LO", "steep")  # RescaleSlope as free text


def _two_series(ds, k):
    ds.SeriesInstanceUID = f"1.2.3.{k % 2}"


@pytest.mark.parametrize("case", sorted(hostile_uploads()))
def test_named_hostile_uploads_are_refused_with_the_reason(case):
    data, words = hostile_uploads()[case]
    with pytest.raises(VolumeError, match=words) as e:
        read_upload(f"{case}.bin", data)
    assert f"{case}.bin" in str(e.value)


@pytest.mark.parametrize("edit,words", [(_two_d_ipp, "ImagePositionPatient"), (_text_slope, "unusable DICOM"),
                                        (_two_series, "2 DICOM series")])
def test_dicom_tags_of_the_wrong_arity_or_type_and_two_series_are_refused(tmp_path, edit, words):
    with pytest.raises(VolumeError, match=words) as e:
        read_upload("study.zip", _dicom_zip_with(tmp_path, edit))
    if edit is _two_series:
        assert "1.2.3.0" in str(e.value) and "1.2.3.1" in str(e.value)


def test_16_bit_slices_keep_their_depth(tmp_path):
    vol = (np.arange(3 * 8 * 8).reshape(3, 8, 8) * 97 % 60000).astype(np.uint16)
    folder = tmp_path / "s"
    folder.mkdir()
    for i, sl in enumerate(vol):
        (folder / f"{i}.png").write_bytes(png(sl))
    got = read_slice_folder(folder)
    assert got.array.dtype == np.uint16 and np.array_equal(got.array, vol)  # not clipped to 255
    assert np.array_equal(read_upload("s.zip", zip_of({f"{i}.png": png(s) for i, s in enumerate(vol)})).array, vol)


# ------------------------------------------------------------------------------------------------ raw trees
def _generic(tmp_path, rows: str):
    raw = tmp_path / "raw"
    raw.mkdir()
    np.save(raw / "ok.npy", SMALL)
    (tmp_path / "secret.npy").write_bytes((raw / "ok.npy").read_bytes())
    (raw / "reports.csv").write_text("image,report,case_id\n" + rows)
    return raw


def test_manifest_paths_outside_the_root_are_quarantined(tmp_path):
    raw = _generic(tmp_path, "ok.npy,fine,a\n../secret.npy,stolen,b\n/etc/hostname,abs,c\nlink.npy,via link,d\n")
    os.symlink(tmp_path / "secret.npy", raw / "link.npy")
    items, _ = build_manifest(raw)
    errors = {it.key: it.error for it in items}
    assert errors["ok.npy"] is None
    for key in ("../secret.npy", "/etc/hostname", "link.npy"):
        assert "outside the data root" in errors[key], key


def _m3d(tmp_path, text: bytes | None, cap_extra=None):
    """An M3D tree with one case (two PNG slices) whose text.txt holds `text`."""
    raw = tmp_path / "m3d"
    series = raw / "M3D_Cap" / "ct_case" / "000001" / "Axial"
    series.mkdir(parents=True)
    for i in range(2):
        (series / f"{i}.png").write_bytes(png(np.full((8, 8), 40 * (i + 1), np.uint8)))
    if text is not None:
        (series.parent / "text.txt").write_bytes(text)
    entry = {"image": "M3D_Cap_npy/ct_case/000001/Axial.npy", "text": "M3D_Cap_npy/ct_case/000001/text.txt"}
    (raw / "M3D_Cap.json").write_text(json.dumps({"train": [entry] + (cap_extra or []), "validation": [], "test": []}))
    return raw


def test_m3d_entries_naming_files_outside_the_root_are_quarantined(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(nifti_bytes(SMALL))
    (tmp_path / "secret.txt").write_text("findings: confidential")
    raw = _m3d(tmp_path, b"findings: a normal liver.", [
        {"image": "../x.nii.gz", "text": "M3D_Cap_npy/ct_case/000001/text.txt"},
        {"image": "M3D_Cap_npy/ct_case/000001/Axial.npy", "text": "../secret.txt"}])
    items, _ = build_manifest(raw)
    by_key = {it.key: it for it in items}
    assert "outside the data root" in by_key["../x"].error
    assert all("confidential" not in it.report for it in items)


@pytest.mark.parametrize("text,words", [(b"\xff\xfe findings: bad bytes", "not valid UTF-8"), (b"", "empty report"),
                                        (b"   \n", "empty report")])
def test_reports_that_are_not_text_are_quarantined(tmp_path, text, words):
    items, _ = build_manifest(_m3d(tmp_path, text))
    assert len(items) == 1 and words in items[0].error


def test_malformed_vqa_rows_are_quarantined_one_by_one(tmp_path):
    raw = _m3d(tmp_path, b"findings: a normal liver.")
    img = "M3D_Cap_npy/ct_case/000001/Axial.npy"
    good = f"{img},t,3,Which organ?,Liver,Spleen,Kidney,Lung,Liver,A\n"
    (raw / "M3D_VQA_train.csv").write_text(
        "Image Path,Text,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice\n"
        + good + f"{img},t,300,Which?,a,b,c,d,a,A\n" + f"{img},t,3,Short row\n" + f"{img},t,x,Q,a,b,c,d,a,A\n"
        + f"{img},t,3,Q,a,b,c,d,a,A,extra\n" + good)
    items, quarantine = build_manifest(raw)
    assert len(items[0].qa) == 2 and len(quarantine) == 4
    reasons = " | ".join(q["reason"] for q in quarantine)
    for words in ("Question Type 300 is not one of 1-5", "missing Choice A", "'x' is not an integer", "extra fields"):
        assert words in reasons


def test_report_rows_without_a_usable_image_or_report_are_quarantined_one_by_one(tmp_path):
    """reports.json rows a file system cannot name (a NUL byte; a part over POSIX's NAME_MAX of 255 bytes), rows with
    no image, or a report that is not text: each quarantined with its reason, the good row kept, nothing raised."""
    raw = _generic(tmp_path, "")
    (raw / "reports.csv").unlink()
    rows = [{"image": "ok.npy", "report": "fine", "case_id": "a"}, {"report": "no image"}, {"image": 7, "report": "x"},
            {"image": "ok.npy", "report": ["a", "list"]}, {"image": "sub\x00dir/ok.npy", "report": "x"},
            {"image": "x" * 300 + ".npy", "report": "x"}]
    (raw / "reports.json").write_text(json.dumps(rows))
    items, _ = build_manifest(raw)
    errors = [it.error for it in items]
    assert len(items) == len(rows) and errors[0] is None
    for error, words in zip(errors[1:], ["row 2: no image path", "('image' is a int)", "the report is a list",
                                         "NUL byte", "longer than a file name can be"]):
        assert error and words in error, (words, error)
    assert all(len(e) < 400 and "\x00" not in e for e in errors[1:])  # printable, bounded


def test_m3d_entries_whose_paths_no_file_system_can_hold_are_quarantined(tmp_path):
    raw = _m3d(tmp_path, b"findings: a normal liver.", [
        {"image": "M3D_Cap_npy/ct_case/0\x00/Axial.npy", "text": "M3D_Cap_npy/ct_case/000001/text.txt"},
        {"image": "M3D_Cap_npy/ct_case/000002/Axial.npy", "text": "M3D_Cap_npy/ct_case/" + "y" * 256 + "/text.txt"}])
    items, _ = build_manifest(raw)
    errors = sorted(it.error or "" for it in items)
    assert errors[0] == "" and "NUL byte" in errors[2] and "longer than a file name can be" in errors[1], errors


def test_a_csv_field_over_the_csv_limit_stops_the_run_naming_the_file(tmp_path):
    raw = _generic(tmp_path, "ok.npy," + "z" * 200_000 + ",a\n")
    with pytest.raises(ManifestError, match=r"reports\.csv: line 2: not readable as CSV"):
        build_manifest(raw)


def test_exports_with_a_broken_config_or_tensor_file_are_refused_naming_the_file(tmp_path):
    """The safetensors file is written by the safetensors library itself, then cut or emptied; a cut in the header
    and a cut in the data are told apart, as the format's layout (8-byte header length, JSON header, data) allows."""
    import torch
    from safetensors.torch import save_file

    from med3dvlm.models.export import ExportError, check_tensors, read_meta

    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps({"kind": "vlm", "model": {"encoder": "nano"}}))
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(3)}, str(good / "model.safetensors"))
    assert read_meta(good, "vlm")["model"]["encoder"] == "nano"
    check_tensors(good)
    data = (good / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = [("config.json", "{", "config.json: not valid JSON"), ("config.json", "[1]", "no 'model' settings"),
             ("model.safetensors", data[: 8 + n + 100], "model.safetensors: cut short"),
             ("model.safetensors", data[: 8 + n // 2], "model.safetensors: not a safetensors file"),
             ("model.safetensors", b"", "not a safetensors file"),
             ("model.safetensors", b"\xff" * 8 + data[8:], "not a safetensors file")]
    for i, (name, content, words) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        (bad / name).write_bytes(content.encode() if isinstance(content, str) else content)
        with pytest.raises(ExportError, match=re.escape(words)):
            read_meta(bad, "vlm")
            check_tensors(bad)


def test_a_series_mixing_8_and_16_bit_slices_is_refused(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "0.png").write_bytes(png(np.full((8, 8), 7, np.uint8)))
    (folder / "1.png").write_bytes(png(np.full((8, 8), 3000, np.uint16)))
    with pytest.raises(VolumeError, match="mixes 8-bit and 16-bit"):
        read_slice_folder(folder)
    shutil.rmtree(folder)
