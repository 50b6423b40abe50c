"""Side-by-side table of ``rj vnncomp`` runs, one row per (benchmark, configuration).

    python scripts/vnncomp_table.py DIR[=LABEL] [DIR[=LABEL] ...]

Each DIR is an ``rj vnncomp --output`` folder; its ``score.json`` (written by the run, or by
``rj score``) gives right / wrong / unknown / timeout / unscored answers, points and times per
benchmark.  The label is LABEL, the ``label`` of the folder's ``run.json``, or the folder name.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rj_plugin.verify.runner import run_label

COLUMNS = ("instances", "right", "wrong", "unknown", "timeout", "error", "unchecked", "points",
           "median_time", "total_time")



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="DIR[=LABEL]")
    args = ap.parse_args(argv)
    rows = []
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        path = Path(folder) / "score.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"error: cannot read {path}: {err}", file=sys.stderr)
            return 2
        for bench in report["benchmarks"]:
            rows.append((bench["category"], label or run_label(Path(folder)), bench))
    rows.sort(key=lambda r: r[0])
    print("| benchmark | configuration | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for category, label, bench in rows:
        cells = [f"{bench[c]:.1f} s" if c.endswith("_time") else str(bench[c]) for c in COLUMNS]
        print(f"| {category} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
