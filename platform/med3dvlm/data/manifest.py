"""Manifests: which volumes exist, their report, split and questions.

Two layouts (BAAI-DCAI/M3D's data release):
- M3D: `M3D_Cap/{ct_case,ct_quizze}/<id>/<Series>/<n>.png` + `<id>/text.txt`, `M3D_Cap.json` and the
  `M3D_VQA_*.csv` files. JSON/CSV entries name `M3D_Cap_npy/.../<Series>.npy` (or `.nii.gz`); they are mapped back to
  the raw series folder, or read as the named file when that exists.
- Generic: a folder of volumes (NIfTI, .npy, DICOM folders, slice folders) with `reports.csv` or `reports.json`
  (fields `image`, `report`, optional `split` and `case_id`; paths relative to the folder).

Every input becomes one `Item`. Inputs that are unusable before reading (no image, no report) carry `error` and are
quarantined; nothing is dropped. A malformed JSON or CSV stops the run with `ManifestError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from med3dvlm import storage

VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice"]
VQA_FILES = {  # file -> the qa split it carries
    "M3D_VQA_train.csv": "train",
    "M3D_VQA_val.csv": "val",
    "M3D_VQA_test.csv": "test",
    "M3D_VQA_test5k.csv": "test5k",
    "M3D_VQA_yn_train.csv": "yn_train",
}
CAP_SPLITS = ("train", "validation", "test", "test1k", "test500", "test100")
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}


class ManifestError(Exception):
    """A malformed manifest (JSON/CSV); the run stops at once."""


@dataclass
class Item:
    volume_id: str
    case_id: str
    series: str
    split: str
    source: str  # absolute path of the series folder or file
    key: str  # the path the manifest names, relative to the data root
    report: str = ""
    qa: list[dict] = field(default_factory=list)
    error: str | None = None


def _text_lines(path) -> io.StringIO:
    """A CSV file's text for csv.DictReader (local Path or RemotePath; newlines inside quoted fields kept)."""
    try:
        return io.StringIO(path.read_bytes().decode("utf-8"), newline="")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


@lru_cache(maxsize=1 << 16)
def _real_dir(d: str) -> str:
    return os.path.realpath(d)


def _real(p: str) -> str:
    """os.path.realpath, with the resolved parent folders cached (a tree of 120K series shares few of them)."""
    if os.path.islink(p):
        return os.path.realpath(p)
    head, tail = os.path.split(p)
    return os.path.normpath(os.path.join(_real_dir(head), tail))


def outside_root(raw, path) -> str | None:
    """Why `path` (a file or folder a manifest names) is not inside the data root `raw`, or None. Local paths are
    resolved first, so `..` and symlinks that lead out are caught; a remote path can only name what the listing holds."""
    if isinstance(raw, Path):
        root, target = _real_dir(str(raw)), _real(str(path))
        inside = target == root or target.startswith(root.rstrip(os.sep) + os.sep)
    else:
        rel = getattr(path, "_rel", "")
        inside = not (rel == ".." or rel.startswith("../") or rel.startswith("/"))
    return None if inside else f"{path}: outside the data root {raw}; refused"


def stable_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def case_split(case_id: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Leak-free split: every series of a case lands in the same split (hash of the case id)."""
    u = int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16) / 0x100000000
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def extract_report(text: str) -> str:
    """`study_findings:` section, else `discussion:`, else the whole text (each needs >= 5 non-space characters)."""
    def section(name: str) -> str:
        m = re.search(rf"{name}:(.*?)(?:\n[A-Za-z_ ]+:|\Z)", text, flags=re.S)
        return " ".join(m.group(1).split()) if m else ""

    for name in ("study_findings", "discussion"):
        s = section(name)
        if len(s.replace(" ", "")) >= 5:
            return s
    return " ".join(text.split())


def _strip_ext(path: str) -> str:
    for ext in (".nii.gz", ".npy", ".nii"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def path_problem(rel: str) -> str | None:
    """Why a path a manifest names cannot name a file at all, found from the text before the OS is asked (which
    answers a NUL byte or an over-long name with an exception, not with a miss); None when it can."""
    if "\x00" in rel:
        return "the path holds a NUL byte"
    if len(rel.encode()) > 4095 or any(len(part.encode()) > 255 for part in rel.split("/")):
        return "the path is longer than a file name can be (255 bytes a part, 4095 in all)"
    return None


def shown(path) -> str:
    """A path as a message shows it: NUL bytes visible, cut after 200 characters."""
    text = str(path).replace("\x00", "\\x00")
    return text if len(text) <= 200 else text[:200] + "..."


def _read_csv(path) -> tuple[list[str], list[dict]]:
    """A CSV file's header and rows; one the csv module cannot read (a field over its 128 KiB limit) stops the run."""
    reader = csv.DictReader(_text_lines(path))
    try:
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as e:
        raise ManifestError(f"{path}: line {reader.line_num + 1}: not readable as CSV ({e})") from None


def is_m3d_layout(raw: Path) -> bool:
    return (raw / "M3D_Cap.json").is_file() or (raw / "M3D_Cap").is_dir()


def build_manifest(raw: str | Path, fractions=(0.8, 0.1, 0.1)) -> tuple[list[Item], list[dict]]:
    """Returns (items, qa_quarantine). `raw`: a path, or a URI (s3://bucket/M3D) listed once."""
    raw = storage.as_tree(raw)
    if not raw.is_dir():
        raise ManifestError(f"{raw}: raw data folder does not exist")
    items = _m3d_items(raw) if is_m3d_layout(raw) else _generic_items(raw)
    for it in items:
        it.split = it.split or "unlisted"
    qa_quarantine = _attach_vqa(raw, items)
    return items, qa_quarantine


def _load_cap_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not any(k in data for k in ("train", "validation", "test")):
        raise ManifestError(f"{path}: expected an object with keys train/validation/test")
    for k, v in data.items():
        if k not in CAP_SPLITS:
            continue
        if not isinstance(v, list):
            raise ManifestError(f"{path}: '{k}' must be a list of {{image, text}} entries")
        for i, e in enumerate(v):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("text"), str):
                raise ManifestError(f"{path}: entry {i} of '{k}' lacks string fields 'image' and 'text'")
    return data


def _m3d_resolve(raw: Path, rel: str) -> tuple[Path | None, str | None]:
    """`M3D_Cap_npy/<folder>/<id>/<Series>.npy` -> raw series folder, else the named file (or its .nii.gz twin);
    (path, None), or (None, why not): missing, or outside the data root."""
    parts = _strip_ext(rel).split("/")
    folder = raw / "M3D_Cap" / Path(*parts[-3:]) if len(parts) >= 4 else None
    if folder is not None and folder.is_dir():
        found = folder
    else:
        stem = _strip_ext(rel)
        found = next((c for c in (raw / rel, raw / (stem + ".nii.gz"), raw / (stem + ".npy")) if c.exists()), None)
    why = found is not None and outside_root(raw, found)
    return (None, why) if why else (found, None)


def read_report_file(path) -> tuple[str, str | None]:
    """(report, None), or ("", why not): a report must be UTF-8 and hold text."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return "", f"{path}: report is not valid UTF-8 ({e.reason} at byte {e.start})"
    report = extract_report(text)
    return (report, None) if report.strip() else ("", f"{path}: empty report")


def _read_report(raw: Path, rel: str, cache: dict) -> tuple[str, str | None]:
    parts = rel.split("/")
    cands = [raw / "M3D_Cap" / Path(*parts[-3:])] if len(parts) >= 4 else []
    cands.append(raw / rel)
    for c in cands:
        if c.is_file():
            out = outside_root(raw, c)
            if out:
                return "", out
            if c not in cache:
                cache[c] = read_report_file(c)
            return cache[c]
    return "", f"case has no text.txt (looked for {cands[0]})"


def _m3d_items(raw: Path) -> list[Item]:
    items: dict[str, Item] = {}
    cache: dict = {}
    cap_path = raw / "M3D_Cap.json"
    if cap_path.is_file():
        cap = _load_cap_json(cap_path)
        for split in CAP_SPLITS:
            for e in cap.get(split, []):
                key = _strip_ext(e["image"])
                if key in items:
                    continue
                parts = key.split("/")
                case_id = "/".join(parts[-3:-1]) if len(parts) >= 3 else parts[0]
                bad = path_problem(e["image"]) or path_problem(e["text"])
                source, why = (None, None) if bad else _m3d_resolve(raw, e["image"])
                it = Item(stable_id(key), case_id, parts[-1], split, str(source or raw / e["image"]), key)
                if bad:
                    it.error = f"{shown(raw / e['image'])}: {bad} (M3D_Cap.json '{split}')"
                elif source is None:
                    it.error = why or f"{raw / e['image']}: image does not exist (listed in M3D_Cap.json '{split}')"
                else:
                    it.report, err = _read_report(raw, e["text"], cache)
                    it.error = f"{source}: {err}" if err else None
                items[key] = it
    # series folders on disk that no split lists: kept, with split "unlisted"
    cap_root = raw / "M3D_Cap"
    if cap_root.is_dir():
        for group in sorted(p for p in cap_root.iterdir() if p.is_dir()):
            for case in sorted(p for p in group.iterdir() if p.is_dir()):
                for series in sorted(p for p in case.iterdir() if p.is_dir()):
                    key = f"M3D_Cap_npy/{group.name}/{case.name}/{series.name}"
                    if key in items:
                        continue
                    it = Item(stable_id(key), f"{group.name}/{case.name}", series.name, "", str(series), key)
                    it.report, err = _read_report(raw, f"M3D_Cap_npy/{group.name}/{case.name}/text.txt", cache)
                    it.error = outside_root(raw, series) or (f"{series}: {err}" if err else None)
                    items[key] = it
    return list(items.values())


def _generic_items(raw: Path) -> list[Item]:
    if (raw / "reports.csv").is_file():
        path = raw / "reports.csv"
        cols, rows = _read_csv(path)
    elif (raw / "reports.json").is_file():
        path = raw / "reports.json"
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ManifestError(f"{path}: expected a list of objects")
        cols = sorted({k for r in rows for k in r})
    else:
        raise ManifestError(f"{raw}: neither the M3D layout (M3D_Cap/, M3D_Cap.json) nor reports.csv/reports.json")
    missing = [c for c in ("image", "report") if c not in cols]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    return [_generic_item(raw, f"{path.name} row {i + 1}", r) for i, r in enumerate(rows)]


def _generic_item(raw: Path, where: str, r: dict) -> Item:
    """One reports.csv/json row -> an Item; a row whose image or report is unusable is quarantined with the reason."""
    image, report = r.get("image"), r.get("report")
    key = image if isinstance(image, str) and image else where
    src = raw / key
    case_id = str(r.get("case_id") or Path(key).parent.as_posix() or key)
    it = Item(stable_id(key), case_id, Path(_strip_ext(key)).name, str(r.get("split") or ""), str(src), key,
              report if isinstance(report, str) else "")
    it.error = _row_error(raw, where, image, report, src)
    return it


def _row_error(raw: Path, where: str, image, report, src) -> str | None:
    """Why a reports row cannot be used (checked in this order, the OS asked last), or None."""
    if not isinstance(image, str) or not image:
        return f"{where}: no image path" + ("" if image in (None, "") else f" ('image' is a {type(image).__name__})")
    if report is not None and not isinstance(report, str):
        return f"{shown(src)}: the report is a {type(report).__name__}, not text ({where})"
    if bad := path_problem(image):
        return f"{shown(src)}: {bad} ({where})"
    if out := outside_root(raw, src):
        return f"{out} ({where})"
    if not src.exists():
        return f"{src}: image does not exist ({where})"
    if not (report or "").strip():
        return f"{src}: empty report ({where})"
    return None


def qa_entry(row: dict, qsplit: str) -> tuple[dict | None, str | None]:
    """One VQA CSV row -> (question, None), or (None, why it is refused): a missing field (a short row), a Question
    Type that is not one of M3D's 1-5."""
    absent = [c for c in VQA_COLUMNS if row.get(c) is None]
    if absent or None in row:
        return None, f"{len(row) - (None in row)} fields where {len(VQA_COLUMNS)} are expected" + \
            (f" (missing {', '.join(absent)})" if absent else " (extra fields)")
    try:
        qtype = int(row["Question Type"])
    except ValueError:
        return None, f"Question Type {row['Question Type']!r} is not an integer"
    if qtype not in QUESTION_TYPES:
        return None, f"Question Type {qtype} is not one of {min(QUESTION_TYPES)}-{max(QUESTION_TYPES)}"
    return {"question_type": qtype, "question": row["Question"],
            "choice_a": row["Choice A"], "choice_b": row["Choice B"], "choice_c": row["Choice C"],
            "choice_d": row["Choice D"], "answer": row["Answer"], "answer_choice": row["Answer Choice"],
            "split": qsplit, "yes_no": qsplit == "yn_train"}, None


def _attach_vqa(raw: Path, items: list[Item]) -> list[dict]:
    """Each CSV row becomes a question of its volume, or a quarantine entry with its reason (never both, never lost)."""
    by_key = {_strip_ext(it.key): it for it in items}
    quarantine = []
    for name, qsplit in VQA_FILES.items():
        path = raw / name
        if not path.is_file():
            continue
        cols, rows = _read_csv(path)
        missing = [c for c in VQA_COLUMNS if c not in cols]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(rows, start=2):
            q, why = qa_entry(row, qsplit)
            it = by_key.get(_strip_ext(str(row.get("Image Path") or "")))
            if q is not None and it is None:
                why = f"{raw / str(row['Image Path'])}: image does not exist"
            if why:
                quarantine.append({"input": f"{path}:{line}", "reason": f"{name} line {line}: {why}"})
                continue
            it.qa.append(q)
    return quarantine
