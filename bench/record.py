"""What every bench script writes beside its figures: the date, the machine (lscpu), the commit and the command, so
a file under bench/results/ says how to reproduce it. Scripts write their own results; nothing is edited by hand.

    from record import provenance, write_markdown
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """The CPU model and count as lscpu gives them, and the memory."""
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if ":" in line)
        cpu = f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except OSError:
        cpu = f"{os.cpu_count()} CPUs"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {mem:.0f} GiB"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def provenance() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "commit": commit(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_markdown(topic: str, title: str, body: str, out: Path | None = None) -> Path:
    """bench/results/<topic>.md (or `out`): the title, the provenance lines, then the script's own text."""
    p = provenance()
    f = Path(out) if out else RESULTS / f"{topic}.md"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(f"# {title}\n\n- date: {p['date']}\n- machine: {p['machine']}\n- commit: {p['commit']}\n"
                 f"- command: `{p['command']}`\n\n{body.strip()}\n")
    return f


def write_results(topic: str, title: str, lines: list[str], data: dict, out: Path | None = None) -> Path:
    """A script's figures twice, both with its provenance: `<topic>.json` (the data) and `<topic>.md` (the text and
    tables it printed). `out`: the JSON's path (the markdown goes beside it)."""
    import json

    f = Path(out) if out else RESULTS / f"{topic}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({**provenance(), **data}, indent=1, default=str))
    write_markdown(topic, title, "\n".join(lines), f.with_suffix(".md"))
    return f
