"""Preprocessing's driver SIGKILLed at random moments: is a partial file ever visible under a final name, and does the
re-run end with the bytes of an uninterrupted run? A synthetic M3D tree, `pipelines.preprocess` as a user runs it
(its own local Ray each time), killed `--kills` times at seeded random moments while a watcher reads the footer of
every `volumes/part-*.parquet` every 20 ms, then run to the end and compared with the same command run uninterrupted.

    .venv/bin/python bench/preprocess_kills.py [--kills 20] [--cases 60] [--seed 0] [--out FILE]
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import ROOT, write_markdown  # noqa: E402


def complete(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
        return True
    except (OSError, ValueError):
        return not path.exists()


def run(cmd: list[str], kill_after: float | None) -> tuple[int, float]:
    """The command, SIGKILLed after `kill_after` s (None: to its end); (final-named files seen partial, seconds)."""
    out = Path(cmd[cmd.index("--out") + 1])
    t, partial = time.time(), 0
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and (kill_after is None or time.time() - t < kill_after):
        partial += sum(not complete(p) for p in (out / "volumes").glob("part-*.parquet"))
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    return partial, time.time() - t


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--kills", type=int, default=20)
    a.add_argument("--cases", type=int, default=60)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None)
    args = a.parse_args(argv)

    from med3dvlm.data.synthetic import write_m3d_tree

    work = Path(tempfile.mkdtemp(prefix="m3d-kills-"))
    write_m3d_tree(work / "raw", cases=args.cases, seed=1)
    cmd = lambda out: [sys.executable, "-m", "pipelines.preprocess", "--raw", str(work / "raw"), "--out", str(out),  # noqa: E731
                       "data.rows_per_shard=8"]
    _, whole_s = run(cmd(work / "whole"), None)
    rng, partial, moments = random.Random(args.seed), 0, []
    for _ in range(args.kills):
        moments.append(round(rng.uniform(0.5, whole_s), 2))
        partial += run(cmd(work / "killed"), moments[-1])[0]
    final_partial, _ = run(cmd(work / "killed"), None)
    want = sorted((work / "whole" / "volumes").glob("part-*.parquet"))
    got = sorted((work / "killed" / "volumes").glob("part-*.parquet"))
    same = [p.name for p in got] == [p.name for p in want] and all(x.read_bytes() == y.read_bytes()
                                                                   for x, y in zip(got, want))
    body = (f"A synthetic tree of {args.cases} cases ({len(want)} shards of up to 8 volumes); the uninterrupted command "
            f"took {whole_s:.1f} s. The driver (and the local Ray it started) SIGKILLed {args.kills} times, at "
            f"{', '.join(map(str, moments))} s (seed {args.seed}), then run to its end.\n\n"
            f"| figure | value |\n|---|---:|\n| kill points | {args.kills} |\n"
            f"| files seen under a final name without a footer (partial), all runs | {partial + final_partial} |\n"
            f"| the re-run's shards byte-identical to the uninterrupted run's | {same} |\n")
    f = write_markdown("preprocess_kills", "Preprocessing's driver killed at random moments", body,
                       Path(args.out) if args.out else None)
    print(f.read_text())


if __name__ == "__main__":
    main()
