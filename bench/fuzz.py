"""Fuzz campaigns, sized by a flag, printing counts by outcome: what the platform does with input nobody should send.

- `uploads`: valid uploads of every kind (NIfTI, gzipped NIfTI, .npy, a PNG-slice zip, a DICOM zip) with bytes
  flipped, set, cut or overwritten by extreme integers and floats, through `read_upload` (the Serve app's parser):
  `parsed` (a finite 3-D volume) or `refused` (VolumeError naming the upload); anything else is a `crash`.
- `configs`: `key=value` overrides (real keys, misspelt and invented ones; numbers, extremes, NaN, text, lists,
  broken YAML) through `load_config`: `loaded` or `refused` (ValueError, one line); anything else is a `crash`.
- `trees`: raw folders with a reports.csv or reports.json whose rows and files are generated (paths outside the root,
  odd names, missing files, non-text reports) through `build_manifest`: `built` (every row an item, quarantined ones
  with a reason) or `refused` (ManifestError naming the file); anything else is a `crash`.

Each campaign is a hypothesis search (`--examples` per campaign, `--seed`); a crash does not stop it. Writes
bench/results/fuzz.md (counts, and the first crash of each kind if any).

    .venv/bin/python bench/fuzz.py [--examples 2000] [--campaigns uploads configs trees] [--seed 0]
"""

import argparse
import logging
import collections
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import ROOT, write_markdown  # noqa: E402

sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' builders of valid uploads

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from uploads import EDITS, edited  # noqa: E402  (the byte edits of tests/test_hostile.py's fuzz test)


def run(campaign, examples: int, rnd: int, tally: collections.Counter, crashes: dict):
    """Run one hypothesis search of `examples` calls of `campaign(**drawn)`, which returns its outcome."""
    def record(outcome: str, error: Exception | None = None):
        tally[outcome] += 1
        if error is not None:
            crashes.setdefault(type(error).__name__, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")

    def body(**drawn):
        try:
            record(campaign.call(**drawn))
        except Exception as e:  # noqa: BLE001 - what the campaign exists to count
            record("crash", e)

    test = given(**campaign.strategies)(body)
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))(test)
    seed(rnd)(test)()


class Uploads:
    def __init__(self):
        from uploads import dicom_zip, nifti_bytes, npy_bytes, png_zip, volume

        small = volume((4, 10, 12))
        self.seeds = [nifti_bytes(small, gz=False), nifti_bytes(small), npy_bytes(small), png_zip(small),
                      dicom_zip(Path(tempfile.mkdtemp()), n=3)]
        self.strategies = {"which": st.integers(0, len(self.seeds) - 1), "edits": EDITS}

    def call(self, which, edits) -> str:
        import numpy as np

        from med3dvlm.io import VolumeError, read_upload

        try:
            vol = read_upload("fuzz.bin", edited(self.seeds[which], edits), max_bytes=1 << 20, max_unpacked=8 << 20)
        except VolumeError as e:
            return "refused" if "\n" not in str(e) else "refused on several lines"
        ok = vol.array.ndim == 3 and np.isfinite(vol.array.astype(np.float64)).all()
        return "parsed" if ok else "parsed to a bad volume"


class Configs:
    def __init__(self):
        from med3dvlm.config import fields_of

        keys = [k for k, _, _ in fields_of()]
        key = st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k[:-1] + "x"),
                        st.text(min_size=0, max_size=20))
        value = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(repr),
                          st.booleans().map(str), st.text(max_size=30), st.sampled_from([".nan", "-.inf", "[", "{a: 1}",
                                                                                         "[1, 2, 3]", "~", "''"]))
        self.strategies = {"pairs": st.lists(st.tuples(key, value), min_size=1, max_size=4)}

    def call(self, pairs) -> str:
        from med3dvlm.config import load_config

        try:
            load_config("tiny", [f"{k}={v}" for k, v in pairs])
        except ValueError as e:
            return "refused" if "\n" not in str(e) else "refused on several lines"
        return "loaded"


class Trees:
    def __init__(self):
        name = st.one_of(st.sampled_from(["a.nii.gz", "b/c.npy", "../x.nii", "/etc/passwd", "d/../../e", "", " ",
                                          "f\x00g", "h" * 300, "s/1.png"]), st.text(max_size=40))
        report = st.one_of(st.text(max_size=60), st.none(), st.integers(), st.lists(st.integers(), max_size=3))
        self.strategies = {"rows": st.lists(st.fixed_dictionaries({"image": name, "report": report}), max_size=6),
                           "as_json": st.booleans(), "files": st.lists(name, max_size=4)}

    def call(self, rows, as_json, files) -> str:
        from med3dvlm.data.manifest import ManifestError, build_manifest

        raw = Path(tempfile.mkdtemp())
        try:
            for f in files:
                p = raw / f
                if f and "\x00" not in f and p.resolve().is_relative_to(raw) and len(p.name) < 200:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(b"not a volume")
            if as_json:
                (raw / "reports.json").write_text(json.dumps(rows))
            else:
                with open(raw / "reports.csv", "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=["image", "report"])
                    w.writeheader()
                    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
            try:
                items, _ = build_manifest(raw)
            except ManifestError as e:
                return "refused" if "\n" not in str(e) else "refused on several lines"
            unexplained = [it for it in items if it.error is None and not Path(it.source).resolve().is_relative_to(raw)]
            return "built" if not unexplained else "built with a path outside the root"
        finally:
            shutil.rmtree(raw, ignore_errors=True)


CAMPAIGNS = {"uploads": Uploads, "configs": Configs, "trees": Trees}


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--examples", type=int, default=2000, help="examples per campaign")
    a.add_argument("--campaigns", nargs="+", default=list(CAMPAIGNS), choices=list(CAMPAIGNS))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--results", default=None, help="default bench/results/fuzz.md")
    args = a.parse_args(argv)
    logging.getLogger("nibabel").setLevel(logging.ERROR)  # its header warnings for every mutated NIfTI
    lines = ["| campaign | examples | outcome | count |", "|---|--:|---|--:|"]
    all_crashes, bad = {}, 0
    for name in args.campaigns:
        tally, crashes = collections.Counter(), {}
        run(CAMPAIGNS[name](), args.examples, args.seed, tally, crashes)
        for outcome, n in sorted(tally.items()):
            lines.append(f"| {name} | {sum(tally.values())} | {outcome} | {n} |")
        bad += sum(n for o, n in tally.items() if o not in ("parsed", "refused", "loaded", "built"))
        all_crashes.update({f"{name}: {k}": v for k, v in crashes.items()})
        print(f"{name}: {dict(tally)}", flush=True)
    lines += ["", f"Outcomes other than parsed / loaded / built / refused on one line: **{bad}**."]
    if all_crashes:
        lines += ["", "First crash of each kind:", ""] + [f"- {k}: `{v}`" for k, v in all_crashes.items()]
    print(f"-> {write_markdown('fuzz', 'Fuzz campaigns: counts by outcome', chr(10).join(lines), Path(args.results) if args.results else None)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
