"""`make demo` as a measurement: the whole demo (synthetic tree, preprocessing, the three stages, the held-out check
on test cases nothing else read) with the table it prints, written to bench/results/demo.md with its provenance.

    .venv/bin/python bench/demo.py [--out out/demo-bench] [--cases 120]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_markdown  # noqa: E402


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default="out/demo-bench")
    a.add_argument("--cases", type=int, default=120)
    a.add_argument("--results", default=None, help="default bench/results/demo.md")
    args = a.parse_args(argv)

    from med3dvlm.demo import DEMO_OVERRIDES, run_demo
    from med3dvlm.runtime import user_config

    lines, t = [], time.time()
    res = run_demo(user_config("tiny", DEMO_OVERRIDES), args.out, args.cases,
                   log=lambda s: (print(s), lines.append(str(s))))
    table = [x for x in "\n".join(lines).splitlines() if x.startswith(("|", "[demo] held-out", "blind", "closed VQA"))]
    body = (f"`make demo`'s run ({args.cases} synthetic cases, the `tiny` preset with the demo's overrides), "
            f"{time.time() - t:.0f} s; verdict: " + ("every target met" if res["passed"] else
                                                    f"targets NOT met: {', '.join(res['missed'])}") + "\n\n"
            + "\n".join(table) + "\n")
    f = write_markdown("demo", "The demo's held-out check", body, Path(args.results) if args.results else None)
    print(f"-> {f}")


if __name__ == "__main__":
    main()
