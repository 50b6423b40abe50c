"""One cactus plot (instances solved against time) from several ``rj vnncomp`` output folders.

    python scripts/cactus.py OUT.png DIR[=LABEL] [DIR[=LABEL] ...] [--title TEXT]

Each DIR holds a ``results.csv`` in the competition's columns; its line is labelled LABEL, or the
``label`` of the folder's ``run.json``, or the folder name.  Only ``sat`` / ``unsat`` answers
count as solved (score them with ``rj score`` for right / wrong).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rj_plugin.verify.runner import cactus_plot, run_label
from rj_plugin.verify.score import read_results_csv


def solved_times(folder: Path) -> list[float]:
    """Run times of the sat / unsat answers in ``folder/results.csv``."""
    return [r.run_time for r in read_results_csv(folder / "results.csv")
            if r.result in ("sat", "unsat")]



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("runs", nargs="+", metavar="DIR[=LABEL]")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    lines: dict[str, list[float]] = {}
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        path = Path(folder)
        if not (path / "results.csv").is_file():
            print(f"error: {path / 'results.csv'} does not exist", file=sys.stderr)
            return 2
        lines[label or run_label(path)] = solved_times(path)
    cactus_plot(lines, args.output, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
