"""Synthetic data in the exact M3D layout, with content a model can learn.

Each case is a body (an ellipsoid, longer superior-inferior, wider left-right) with a spine and an aorta, holding one
organ (position, shape and brightness per organ) and, with probability 0.7, a lesion whose side (left/right), pole
(upper/lower), size and brightness vary; the report names the organ and the lesion's density and side. Each case
exports 1-2 series; a series has a plane (the stacking axis: axial, coronal, sagittal) and a contrast phase (the
aorta's enhancement and the organ's brightness; the spine, always the brightest, keeps them visible after the
min-max normalisation, as bone does in CT). The report
(`text.txt`, per case as in M3D) says only what the image shows (so every distinct report is one a model can tell
from the volume), and all five VQA question types are derived from the same attributes. Choices come in M3D's
random order, with the answer's letter balanced within each question type (in blocks of four), so no letter wins by
being frequent.

    write_m3d_tree(out, cases=40, seed=0, bad=True)

`bad=True` also plants every kind of bad input the preprocessing must quarantine (see `BAD_INPUTS`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice"]

ORGANS = {  # name: (centre z, y, x as fractions of the body box, radii as fractions, intensity)
    "liver": ((0.45, 0.50, 0.35), (0.20, 0.24, 0.22), 0.50),
    "spleen": ((0.40, 0.55, 0.72), (0.16, 0.16, 0.14), 0.64),
    "kidney": ((0.60, 0.65, 0.30), (0.18, 0.14, 0.12), 0.80),
    "pancreas": ((0.50, 0.45, 0.55), (0.10, 0.10, 0.24), 0.40),
}
PHASES = {"non_contrast": 0.88, "arterial": 1.12, "portal_venous": 1.0}  # organ brightness factor per phase
AORTA = {"non_contrast": 0.26, "arterial": 0.92, "portal_venous": 0.58}  # the aorta's brightness per phase
PHASE_NAMES = {"non_contrast": "Non-contrast", "arterial": "Arterial", "portal_venous": "Portal venous"}
PLANES = ("Axial", "Coronal", "Sagittal")


@dataclass
class Case:
    case_id: str
    folder: str  # ct_case or ct_quizze
    organ: str
    lesion: bool
    side: str  # left / right
    pole: str  # upper / lower (superior / inferior half of the organ)
    size: str  # small / large
    density: str  # hypodense / hyperdense
    age: int
    gender: str
    series: list[tuple[str, str]]  # (plane, phase)

    @property
    def abnormality(self) -> str:
        return f"{self.density.capitalize()} lesion" if self.lesion else "No abnormality"

    @property
    def location(self) -> str:
        return f"{self.side.capitalize()} side of the {self.organ}" if self.lesion else "No lesion present"


def sample_case(index: int, seed: int) -> Case:
    rng = np.random.default_rng([seed, index])
    organ = list(ORGANS)[rng.integers(len(ORGANS))]
    n_series = 1 if rng.random() < 0.6 else 2
    combos = [(p, ph) for p in PLANES for ph in PHASES]
    picks = rng.choice(len(combos), size=n_series, replace=False)
    return Case(
        case_id=f"{index + 1:06d}",
        folder="ct_case" if index % 2 == 0 else "ct_quizze",
        organ=organ,
        lesion=bool(rng.random() < 0.7),
        side=str(rng.choice(["left", "right"])),
        pole=str(rng.choice(["upper", "lower"])),
        size=str(rng.choice(["small", "large"])),
        density=str(rng.choice(["hypodense", "hyperdense"])),
        age=int(rng.integers(20, 85)),
        gender=str(rng.choice(["Male", "Female"])),
        series=[combos[i] for i in sorted(picks)],
    )


def render_volume(case: Case, phase: str, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Canonical (Z superior->inferior, Y anterior->posterior, X patient right->left) volume in [0,1]."""
    rng = np.random.default_rng([seed, int(case.case_id), list(PHASES).index(phase)])
    Z, Y, X = shape
    z, y, x = np.meshgrid(np.linspace(0, 1, Z), np.linspace(0, 1, Y), np.linspace(0, 1, X), indexing="ij", sparse=True)
    vol = np.zeros(shape, np.float32)
    body = ((z - 0.5) / 0.48) ** 2 + ((y - 0.5) / 0.36) ** 2 + ((x - 0.5) / 0.46) ** 2 <= 1
    vol[body] = 0.22
    # the spine (always the brightest, as bone is in CT: it anchors the min-max normalisation, so brightness
    # survives it) and the aorta in front of it, whose enhancement shows the contrast phase
    vol[body & (((y - 0.76) / 0.06) ** 2 + ((x - 0.5) / 0.06) ** 2 <= 1)] = 1.0
    vol[body & (((y - 0.62) / 0.05) ** 2 + ((x - 0.55) / 0.05) ** 2 <= 1)] = AORTA[phase]
    (cz, cy, cx), (rz, ry, rx), level = ORGANS[case.organ]
    organ = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    vol[organ] = level * PHASES[phase]
    if case.lesion:
        r = 0.6 if case.size == "small" else 0.85
        lx = cx + (-0.45 if case.side == "right" else 0.45) * rx  # patient right is image left (low x)
        lz = cz + (-0.4 if case.pole == "upper" else 0.4) * rz  # superior is low z
        lesion = ((z - lz) / (r * rz)) ** 2 + ((y - cy) / (r * ry)) ** 2 + ((x - lx) / (r * rx * 0.9)) ** 2 <= 1
        vol[lesion & organ] = 0.04 if case.density == "hypodense" else 1.0
    vol[body] += rng.normal(0, 0.02, size=int(body.sum())).astype(np.float32)
    return np.clip(vol, 0, 1)


def report_text(case: Case) -> str:
    """Findings from what the volume shows, at the detail a tiny model learns in minutes: the organ, and the
    lesion's density and side (20 distinct texts, 5 per organ). The lesion's size and pole vary in the volume but
    are not reported: with them, most of the 68 texts were seen once in training and never learned."""
    organ = case.organ
    if not case.lesion:
        return f"The {organ} is normal in size and attenuation. No focal lesion is seen."
    return (f"There is a {case.density} lesion in the {case.side} part of the {organ}. "
            f"The remainder of the {organ} enhances normally.")


def case_text(case: Case, seed: int) -> str:
    findings = report_text(case)
    return (
        f"Title: Synthetic {case.organ} case {case.case_id}\n"
        f"presentation: Abdominal pain.\npatient: \nAge: {case.age} years\nGender: {case.gender}\n"
        f"study_findings: {findings}\n"
        f"discussion: Synthetic case for testing; {case.abnormality.lower()} of the {case.organ}.\n"
    )


class LetterBalance:
    """The answer's position per question type, from shuffled blocks of 0..3: balanced across letters within a type."""

    def __init__(self, seed: int):
        self.rng, self.queues = np.random.default_rng([seed, 31]), {}

    def next(self, qtype: int) -> int:
        q = self.queues.setdefault(qtype, [])
        if not q:
            q.extend(self.rng.permutation(4).tolist())
        return q.pop()


def _choices(answer: str, pool: list[str], rng: np.random.Generator, position: int) -> tuple[list[str], str]:
    """The answer at `position` among 3 distractors from `pool` in random order (4 choices, as M3D's)."""
    others = [p for p in pool if p != answer]
    options = [others[i] for i in rng.permutation(len(others))][:3]
    options.insert(position, answer)
    return options, "ABCD"[position]


def vqa_rows(case: Case, plane: str, phase: str, image: str, text: str, seed: int, balance: LetterBalance) -> list[list]:
    rng = np.random.default_rng([seed, int(case.case_id), PLANES.index(plane), list(PHASES).index(phase)])
    qs = [
        (1, "In which plane is this CT image displayed?", plane, ["Axial", "Coronal", "Sagittal", "Oblique"]),
        (2, "What is the contrast phase of this CT scan?", PHASE_NAMES[phase], ["Non-contrast", "Arterial", "Portal venous", "Delayed"]),
        (3, "Which organ is the main focus of this image?", case.organ.capitalize(), [o.capitalize() for o in ORGANS]),
        (4, f"What abnormality is seen in the {case.organ}?", case.abnormality, ["Hypodense lesion", "Hyperdense lesion", "No abnormality", "Calcification"]),
        (5, "Where is the abnormality located?", case.location,
         [f"Left side of the {case.organ}", f"Right side of the {case.organ}", "No lesion present", f"Both sides of the {case.organ}"]),
    ]
    rows = []
    for qtype, q, ans, pool in qs:
        opts, letter = _choices(ans, pool, rng, balance.next(qtype))
        rows.append([image, text, qtype, q, *opts, ans, letter])
    return rows


def yn_rows(case: Case, image: str, text: str) -> list[list]:
    ans = "Yes" if case.lesion else "No"
    return [[image, text, 4, f"Is there a focal lesion in the {case.organ}?", "Yes", "No", "", "", ans, "A" if case.lesion else "B"]]


def _write_png_series(folder: Path, vol: np.ndarray, axis: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    u8 = np.rint(np.moveaxis(vol, axis, 0) * 255).astype(np.uint8)
    for i, sl in enumerate(u8):
        Image.fromarray(sl).save(folder / f"{i + 1}.png", optimize=False, compress_level=1)


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(VQA_COLUMNS)
        w.writerows(rows)


def write_m3d_tree(
    out: str | Path,
    cases: int = 40,
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 48, 64),
    bad: bool = False,
    splits: tuple[float, float] = (0.7, 0.1),
) -> dict:
    """Write `out/M3D_Cap/...`, `out/M3D_Cap.json`, `out/M3D_VQA_*.csv`. Returns counts."""
    out = Path(out)
    root = out / "M3D_Cap"
    entries, vqa, yn, balance = [], {}, [], LetterBalance(seed)
    for i in range(cases):
        case = sample_case(i, seed)
        case_dir = root / case.folder / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        text = case_text(case, seed)
        (case_dir / "text.txt").write_text(text)
        findings = text.split("study_findings:")[1].split("\n")[0].strip()
        for plane, phase in case.series:
            series = f"{plane}_{phase}"
            vol = render_volume(case, phase, shape, seed)
            _write_png_series(case_dir / series, vol, PLANES.index(plane))
            image = f"M3D_Cap_npy/{case.folder}/{case.case_id}/{series}.npy"
            entries.append({"image": image, "text": f"M3D_Cap_npy/{case.folder}/{case.case_id}/text.txt", "_case": case})
            vqa[image] = vqa_rows(case, plane, phase, image, findings, seed, balance)
            yn.append((image, yn_rows(case, image, findings)))
    # official split: per image file, as M3D (so cases leak across splits, as upstream)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(entries))
    n_train = int(round(splits[0] * len(entries)))
    n_val = int(round(splits[1] * len(entries)))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[idx] = "train" if rank < n_train else ("validation" if rank < n_train + n_val else "test")
    cap = {"train": [], "validation": [], "test": []}
    for idx, e in enumerate(entries):
        cap[split_of[idx]].append({"image": e["image"], "text": e["text"]})
    for k in ("test100", "test500", "test1k"):
        cap[k] = cap["test"][: {"test100": 100, "test500": 500, "test1k": 1000}[k]]
    csv_rows = {"train": [], "val": [], "test": []}
    for idx, e in enumerate(entries):
        csv_rows[{"train": "train", "validation": "val", "test": "test"}[split_of[idx]]] += vqa[e["image"]]
    yn_train = [r for idx, (image, rows) in enumerate(yn) if split_of[idx] == "train" for r in rows]
    counts = {"cases": cases, "volumes": len(entries), "planted_bad": 0}
    if bad:
        counts["planted_bad"] = plant_bad_inputs(out, cap, csv_rows)
    (out / "M3D_Cap.json").write_text(json.dumps(cap, indent=1))
    _write_csv(out / "M3D_VQA_train.csv", csv_rows["train"])
    _write_csv(out / "M3D_VQA_val.csv", csv_rows["val"])
    _write_csv(out / "M3D_VQA_test.csv", csv_rows["test"])
    _write_csv(out / "M3D_VQA_test5k.csv", csv_rows["test"][:5000])
    _write_csv(out / "M3D_VQA_yn_train.csv", yn_train)
    counts["qa"] = sum(len(v) for v in csv_rows.values())
    return counts


# ---------------------------------------------------------------- bad inputs

BAD_INPUTS = [
    "truncated PNG", "zero-byte file", "non-image file in a series folder", "empty series folder",
    "case without text.txt", "JSON entry whose image does not exist", "2-D NIfTI", "NIfTI with NaNs",
    "corrupt .nii.gz", ".npy holding a pickle", "DICOM series with missing slices",
]


def dicom_series(folder: Path, n: int = 6, skip: int | None = None) -> None:
    """A real CT slice (pydicom's bundled CT_small.dcm) repeated at increasing positions; `skip` leaves a gap."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    folder.mkdir(parents=True, exist_ok=True)
    x0, y0, z0 = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
    for k in range(n):
        if k == skip:
            continue
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [x0, y0, z0 + 5.0 * k]
        ds.InstanceNumber = k + 1
        arr = ds.pixel_array
        ds.PixelData = np.clip(arr.astype(np.int32) + 40 * k, 0, 4000).astype(arr.dtype).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm")


def plant_bad_inputs(out: Path, cap: dict, csv_rows: dict) -> int:
    import nibabel as nib

    root = out / "M3D_Cap" / "ct_case"
    good = np.full((8, 16, 16), 100, np.uint8)
    good[2:6, 4:12, 4:12] = 200
    planted = []

    def series(case: str, name: str) -> Path:
        d = root / case / name
        d.mkdir(parents=True, exist_ok=True)
        if not (root / case / "text.txt").exists() and case != "900005":
            (root / case / "text.txt").write_text("study_findings: Planted bad input for testing.\n")
        planted.append(f"M3D_Cap_npy/ct_case/{case}/{name}.npy")
        return d

    def pngs(d: Path) -> None:
        _write_png_series(d, good.astype(np.float32) / 255, 0)

    d = series("900001", "Axial_truncated")
    pngs(d)
    blob = (d / "3.png").read_bytes()
    (d / "3.png").write_bytes(blob[: len(blob) // 2])
    d = series("900002", "Axial_zero_byte")
    pngs(d)
    (d / "4.png").write_bytes(b"")
    d = series("900003", "Axial_stray_file")
    pngs(d)
    (d / "notes.txt").write_text("not an image")
    series("900004", "Axial_empty")
    pngs(series("900005", "Axial_no_text"))  # its case has no text.txt
    planted.append("M3D_Cap_npy/ct_case/900006/Axial_missing.npy")  # exists nowhere
    npy_dir = out / "M3D_Cap_npy" / "ct_case"
    for case, name, writer in [
        ("900007", "Axial_2d.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), p)),
        ("900008", "Axial_nan.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), p)),
        ("900009", "Axial_corrupt.nii.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")),
        ("900010", "Axial_pickle.npy", lambda p: np.save(p, np.array([{"evil": 1}], dtype=object), allow_pickle=True)),
    ]:
        (npy_dir / case).mkdir(parents=True, exist_ok=True)
        (npy_dir / case / "text.txt").write_text("study_findings: Planted bad input for testing.\n")
        writer(npy_dir / case / name)
        planted.append(f"M3D_Cap_npy/ct_case/{case}/{name}")
    dicom_series(series("900011", "Axial_dicom_gap"), n=6, skip=3)
    for image in planted:
        case_dir = image.rsplit("/", 1)[0]
        cap["train"].append({"image": image, "text": f"{case_dir}/text.txt"})
    # a VQA row whose image exists nowhere
    csv_rows["train"].append(["M3D_Cap_npy/ct_case/900099/Axial_gone.npy", "x", 1, "Which plane?", "Axial", "Coronal", "Sagittal", "NA", "Axial", "A"])
    return len(planted)


