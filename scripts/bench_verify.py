"""Run ``verify_instance`` over a VNN-COMP benchmark folder and score it against known results.

    .venv/bin/python scripts/bench_verify.py ../shared/data/vnncomp/acasxu --timeout 10 --first 30

For each instance of ``instances.csv`` (or the first N, or a comma-separated list of row
indices) it prints the answer, the deciding stage and the time, then a summary: right / wrong /
unknown / timeout / error against ``known_results.csv``.  Only rows whose confidence is
``witness`` or ``consensus`` are scored (the others are counted apart).  A ``wrong`` answer on a
scored row, or a sat whose witness does not re-check, makes the exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rj_plugin.io.vnnlib import read_vnnlib
from rj_plugin.verify import VerifyOptions, verify_instance

SCORED = ("witness", "consensus")


def _known(folder: Path) -> dict[tuple[str, str], tuple[str, str]]:
    path = folder / "known_results.csv"
    if not path.is_file():
        return {}
    with open(path) as fh:
        return {(r["onnx"], r["vnnlib"]): (r["result"], r["confidence"])
                for r in csv.DictReader(fh)}


def _witness_ok(onnx: Path, vnnlib: Path, witness: tuple[np.ndarray, np.ndarray]) -> bool:
    """Independent re-check: x in the box and y = onnxruntime(x) unsafe, tolerance 0."""
    import onnxruntime as ort

    spec = read_vnnlib(vnnlib)
    x, y = witness
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    (out,) = sess.run(None, {inp.name: x.astype(dtype).reshape(shape)})
    y2 = np.asarray(out, dtype=np.float64).reshape(-1)
    return (spec.input_index(x, 0.0) is not None and np.array_equal(y, y2)
            and spec.unsafe_index(y2, 0.0) is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--csv", default="instances.csv")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per instance (default: the csv's timeout)")
    ap.add_argument("--first", type=int, default=None, help="only the first N instances")
    ap.add_argument("--rows", default=None, help="comma-separated row indices instead")
    ap.add_argument("--no-jacobian", action="store_true")
    ap.add_argument("--lirpa", default="crown,alpha-crown")
    args = ap.parse_args(argv)

    lines = [r for r in csv.reader(open(args.folder / args.csv)) if r]
    if args.rows:
        picked = [(int(i), lines[int(i)]) for i in args.rows.split(",")]
    else:
        picked = list(enumerate(lines))[: args.first]
    known = _known(args.folder)
    options = VerifyOptions(jacobian=not args.no_jacobian,
                            lirpa_methods=tuple(m for m in args.lirpa.split(",") if m))
    tally: Counter[str] = Counter()
    failures = 0
    t_all = time.monotonic()
    for idx, (onnx, vnnlib, timeout) in picked:
        budget = args.timeout if args.timeout is not None else float(timeout)
        v = verify_instance(args.folder / onnx, args.folder / vnnlib, budget, options)
        label, conf = known.get((onnx, vnnlib), ("?", "?"))
        if v.answer in ("sat", "unsat"):
            outcome = ("right" if v.answer == label else "wrong") if conf in SCORED else \
                "unscored"
        else:
            outcome = v.answer
        if v.answer == "sat" and not _witness_ok(args.folder / onnx, args.folder / vnnlib,
                                                  v.witness):
            outcome = "bad-witness"
        if outcome in ("wrong", "bad-witness"):
            failures += 1
        tally[outcome] += 1
        extra = v.details.get("error", "") or ""
        bab = v.details.get("bab", {})
        print(f"{idx:4d} {Path(onnx).stem[:28]:28s} {Path(vnnlib).stem:14s} "
              f"known={label}/{conf:9s} -> {v.answer:7s} {v.stage:15s} {v.seconds:6.2f}s "
              f"boxes={bab.get('boxes_bounded', 0):6d} {outcome} {extra[:80]}", flush=True)
    total = sum(tally.values())
    print(f"\n{total} instances in {time.monotonic() - t_all:.1f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
