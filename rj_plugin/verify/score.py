"""Score a ``results.csv`` against benchmark folders' ``known_results.csv`` (``rj score``).

Rules (VNN-COMP style):

* ``+10`` for a right answer, ``-150`` for a wrong one, ``0`` for unknown, timeout, error, a
  missing instance, and an ``unsat`` on an instance whose reference is not asserted.
* Only ``known_results.csv`` rows whose confidence is ``witness`` or ``consensus`` are
  asserted.
* A ``sat`` counts only with a witness that re-checks (:func:`check_witness`): ``x`` in the
  property's input box at tolerance 0, and the output recomputed by onnxruntime on the original
  ONNX file in the unsafe set.  A valid witness is right (+10) whatever the reference says (a
  witness is a proof; disagreeing with an asserted ``unsat`` is flagged as a conflict).  A
  ``sat`` whose witness is missing or fails the re-check is wrong (-150); with
  ``bad_witness="unknown"`` it scores 0 instead.
* ``unsat`` is right when the asserted reference is ``unsat``, wrong when it is ``sat``.

The witness of a row is read from the per-instance result file that ``rj vnncomp`` writes next
to ``results.csv``: ``<results dir>/<category>/<onnx stem>__<vnnlib stem>.result`` (the answer
line then the witness), or, failing a witness there, ``<same stem>.counterexample``.

``results.csv`` has the competition's columns ``category,onnx,vnnlib,prepare_time,result,
run_time`` without a header (a header line with these names is accepted).  ``onnx``/``vnnlib``
are matched to the benchmark's ``instances.csv`` as written there, or as paths ending with
them (so ``./benchmarks/acasxu/onnx/x.onnx`` matches ``onnx/x.onnx``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rj_plugin.errors import InputError, RJError
from rj_plugin.io.results import atomic_write_json, atomic_write_text
from rj_plugin.verify.instances import (
    Instance,
    KnownResult,
    instance_key,
    read_instances,
    read_known_results,
)
from rj_plugin.verify.results import ANSWERS, parse_witness, read_result
from rj_plugin.verify.witness_check import check_witness

__all__ = [
    "COLUMNS",
    "POINTS_RIGHT",
    "POINTS_WRONG",
    "BenchmarkScore",
    "ResultRow",
    "ScoreReport",
    "ScoredRow",
    "format_table",
    "read_results_csv",
    "score_results",
    "write_report",
]

POINTS_RIGHT = 10
POINTS_WRONG = -150
#: The competition's results.csv columns.
COLUMNS = ("category", "onnx", "vnnlib", "prepare_time", "result", "run_time")
OUTCOMES = ("right", "wrong", "unknown", "timeout", "error", "unchecked", "missing")


@dataclass(frozen=True)
class ResultRow:
    """One row of a results.csv (``result`` normalised to one of :data:`ANSWERS`; the text as
    written is in ``raw_result``)."""

    category: str
    onnx: str
    vnnlib: str
    prepare_time: float
    result: str
    run_time: float
    line: int
    raw_result: str = ""


def _normalise_answer(text: str) -> str:
    word = text.strip().lower()
    word = {"holds": "unsat", "violated": "sat"}.get(word, word)
    if word in ANSWERS:
        return word
    if "timeout" in word:
        return "timeout"
    return "error"


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text) if text.strip() else 0.0
    except ValueError:
        raise InputError(f"{path}:{line}: {column} {text!r} is not a number") from None
    if math.isnan(value) or value < 0:
        raise InputError(f"{path}:{line}: {column} must be a number >= 0, got {text}")
    return value


def read_results_csv(path: str | Path) -> list[ResultRow]:
    """The rows of a competition ``results.csv`` (see the module docstring).

    Raises:
        InputError: a missing file, a row without six cells, or a time that is not a number
            (file and line named).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: results file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the results file: {exc}") from None
    rows: list[ResultRow] = []
    reader = csv.reader(io.StringIO(text))
    for cells in reader:
        line = reader.line_num
        if not cells or not any(c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        if tuple(c.lower() for c in cells) == COLUMNS:
            continue
        if len(cells) != len(COLUMNS):
            raise InputError(f"{p}:{line}: expected {len(COLUMNS)} cells "
                             f"{','.join(COLUMNS)}, got {len(cells)}")
        cat, onnx, vnnlib, prep, result, run = cells
        rows.append(ResultRow(cat, onnx, vnnlib, _number(prep, p, line, "prepare_time"),
                              _normalise_answer(result), _number(run, p, line, "run_time"),
                              line, result))
    return rows


@dataclass
class ScoredRow:
    """One instance's score.

    Attributes:
        outcome: right | wrong | unknown (also a sat without a valid witness under
            ``bad_witness="unknown"``) | timeout | error | unchecked (an unsat that no asserted
            reference decides) | missing (in instances.csv, not in results.csv).
        expected: the reference result ('' when none); ``asserted``: whether it counts.
        witness: for sat answers, the re-check (``WitnessCheck.to_dict()``) or the reason no
            witness could be read.
        note: e.g. ``conflict`` when a valid witness contradicts an asserted unsat.
    """

    category: str
    onnx: str
    vnnlib: str
    result: str
    run_time: float
    outcome: str
    points: int
    expected: str = ""
    confidence: str = ""
    asserted: bool = False
    witness: dict[str, Any] | None = None
    note: str = ""


@dataclass
class BenchmarkScore:
    """Per-benchmark totals (times over the rows present in results.csv)."""

    category: str
    instances: int = 0
    sat: int = 0
    unsat: int = 0
    right: int = 0
    wrong: int = 0
    unknown: int = 0
    timeout: int = 0
    error: int = 0
    unchecked: int = 0
    missing: int = 0
    points: int = 0
    median_time: float = 0.0
    total_time: float = 0.0


@dataclass
class ScoreReport:
    """Everything ``rj score`` computes: per-instance rows, per-benchmark totals, and the
    results.csv rows that match no given benchmark folder."""

    rows: list[ScoredRow] = field(default_factory=list)
    benchmarks: list[BenchmarkScore] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def total_points(self) -> int:
        """Sum of the points of every benchmark."""
        return sum(b.points for b in self.benchmarks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"total_points": self.total_points,
                "benchmarks": [asdict(b) for b in self.benchmarks],
                "rows": [asdict(r) for r in self.rows], "unmatched": list(self.unmatched)}


def _suffix_match(given: str, written: str) -> bool:
    """``given`` is ``written`` or a longer path that ends with it (component-wise)."""
    g, w = PurePosixPath(given).parts, PurePosixPath(written).parts
    return len(g) >= len(w) and g[len(g) - len(w):] == w


def _find_instance(row: ResultRow, instances: list[Instance]) -> Instance | None:
    key = instance_key(row.onnx, row.vnnlib)
    for inst in instances:
        if inst.key == key:
            return inst
    for inst in instances:
        if _suffix_match(key[0], inst.key[0]) and _suffix_match(key[1], inst.key[1]):
            return inst
    return None


def _read_witness(base: Path, inst: Instance) -> tuple[Any, Any] | str:
    """The witness of an instance's sat answer, or why there is none."""
    folder = base / inst.benchmark
    result_file = folder / f"{inst.stem}.result"
    ce_file = folder / f"{inst.stem}.counterexample"
    problems = []
    if result_file.is_file():
        try:
            parsed = read_result(result_file)
        except RJError as exc:
            problems.append(str(exc))
        else:
            if parsed.answer != "sat":
                problems.append(f"{result_file} says {parsed.answer}, not sat")
            elif parsed.witness is not None:
                return parsed.witness
            else:
                problems.append(f"{result_file} has no witness after sat")
    if ce_file.is_file():
        try:
            return parse_witness(ce_file.read_text(encoding="utf-8"), str(ce_file))
        except (RJError, OSError, UnicodeDecodeError) as exc:
            problems.append(str(exc))
    if not problems:
        problems.append(f"no witness file ({result_file.name} or {ce_file.name} in {folder})")
    return "; ".join(problems)


def _score_row(row: ResultRow, inst: Instance, known: KnownResult | None, base: Path,
               bad_witness: str) -> ScoredRow:
    expected = known.result if known else ""
    asserted = bool(known and known.asserted)
    out = ScoredRow(row.category, inst.onnx, inst.vnnlib, row.result, row.run_time, "", 0,
                    expected, known.confidence if known else "", asserted)
    if row.result == "sat":
        witness = _read_witness(base, inst)
        if isinstance(witness, str):
            out.witness = {"ok": False, "reason": witness}
        else:
            try:
                out.witness = check_witness(inst.onnx_path, inst.vnnlib_path, *witness).to_dict()
            except RJError as exc:
                out.witness = {"ok": False, "reason": str(exc)}
        if out.witness["ok"]:
            out.outcome, out.points = "right", POINTS_RIGHT
            if asserted and expected == "unsat":
                out.note = "conflict: a valid witness contradicts the asserted unsat"
        elif bad_witness == "wrong":
            out.outcome, out.points = "wrong", POINTS_WRONG
            out.note = "sat without a valid witness"
        else:
            out.outcome, out.points = ("unknown", 0)
            out.note = "sat without a valid witness (not counted)"
    elif row.result == "unsat":
        if not asserted:
            out.outcome = "unchecked"
        elif expected == "unsat":
            out.outcome, out.points = "right", POINTS_RIGHT
        else:
            out.outcome, out.points = "wrong", POINTS_WRONG
    else:
        out.outcome = row.result
    return out


def score_results(results_csv: str | Path, bench_dirs: list[str | Path],
                  results_dir: str | Path | None = None,
                  bad_witness: str = "wrong") -> ScoreReport:
    """Score ``results_csv`` against the benchmark folders ``bench_dirs``.

    Args:
        results_csv: the competition results file.
        bench_dirs: benchmark folders; a row's category is matched to a folder's name.
        results_dir: where the per-instance result files are (default: the folder of
            ``results_csv``).
        bad_witness: what a sat without a valid witness scores: ``"wrong"`` (-150) or
            ``"unknown"`` (0).

    Raises:
        InputError: unreadable files, two folders with the same name, an instance answered
            twice.
    """
    if bad_witness not in ("wrong", "unknown"):
        raise InputError(f"bad_witness must be wrong or unknown, got {bad_witness!r}")
    results_csv = Path(results_csv)
    base = Path(results_dir) if results_dir is not None else results_csv.parent
    rows = read_results_csv(results_csv)
    benches: dict[str, tuple[list[Instance], dict]] = {}
    for folder in bench_dirs:
        instances = read_instances(folder, check_files=False)
        name = instances[0].benchmark
        if name in benches:
            raise InputError(f"{folder}: two benchmark folders are named {name}")
        known_path = Path(folder) / "known_results.csv"
        known = read_known_results(folder) if known_path.exists() else {}
        benches[name] = (instances, known)
    report = ScoreReport()
    answered: dict[str, dict[tuple[str, str], ResultRow]] = {n: {} for n in benches}
    for row in rows:
        if row.category not in benches:
            report.unmatched.append(f"{results_csv}:{row.line}: category {row.category!r} is "
                                    "not among the benchmark folders given")
            continue
        inst = _find_instance(row, benches[row.category][0])
        if inst is None:
            report.unmatched.append(f"{results_csv}:{row.line}: {row.onnx},{row.vnnlib} is not "
                                    f"in {row.category}/instances.csv")
            continue
        if inst.key in answered[row.category]:
            first = answered[row.category][inst.key].line
            raise InputError(f"{results_csv}:{row.line}: {inst.onnx},{inst.vnnlib} is already "
                             f"answered at line {first}")
        answered[row.category][inst.key] = row
    for name, (instances, known) in benches.items():
        total = BenchmarkScore(name, instances=len(instances))
        times = []
        for inst in instances:
            row = answered[name].get(inst.key)
            if row is None:
                scored = ScoredRow(name, inst.onnx, inst.vnnlib, "", 0.0, "missing", 0)
            else:
                scored = _score_row(row, inst, known.get(inst.key), base, bad_witness)
                times.append(row.run_time)
                if row.result in ("sat", "unsat"):
                    setattr(total, row.result, getattr(total, row.result) + 1)
            report.rows.append(scored)
            setattr(total, scored.outcome, getattr(total, scored.outcome) + 1)
            total.points += scored.points
        total.median_time = float(statistics.median(times)) if times else 0.0
        total.total_time = float(sum(times))
        report.benchmarks.append(total)
    return report


_TABLE_COLUMNS = ("category", "instances", "sat", "unsat", "right", "wrong", "unknown",
                  "timeout", "error", "unchecked", "missing", "points", "median_time",
                  "total_time")


def format_table(report: ScoreReport) -> str:
    """A fixed-width table: one line per benchmark and a total line."""
    def cells(b: BenchmarkScore) -> list[str]:
        d = asdict(b)
        return [f"{d[c]:.2f}" if isinstance(d[c], float) else str(d[c]) for c in _TABLE_COLUMNS]

    lines = [list(_TABLE_COLUMNS)] + [cells(b) for b in report.benchmarks]
    if len(report.benchmarks) > 1:
        total = BenchmarkScore("TOTAL")
        for b in report.benchmarks:
            for c in _TABLE_COLUMNS[1:-2]:
                setattr(total, c, getattr(total, c) + getattr(b, c))
            total.total_time += b.total_time
        total.median_time = float("nan")
        row = cells(total)
        row[-2] = "-"
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(_TABLE_COLUMNS))]
    text = "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in lines)
    return text + "\n"


def write_report(report: ScoreReport, csv_path: str | Path | None = None,
                 json_path: str | Path | None = None) -> None:
    """Write the per-instance scores as CSV and the whole report as JSON (atomically)."""
    if csv_path is not None:
        buf = io.StringIO()
        names = ["category", "onnx", "vnnlib", "result", "expected", "confidence", "asserted",
                 "outcome", "points", "run_time", "witness_ok", "note"]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        for r in report.rows:
            ok = "" if r.witness is None else str(bool(r.witness.get("ok"))).lower()
            note = r.note or ("" if r.witness is None or r.witness.get("ok")
                              else r.witness.get("reason", ""))
            writer.writerow([r.category, r.onnx, r.vnnlib, r.result, r.expected, r.confidence,
                             str(r.asserted).lower(), r.outcome, r.points, repr(r.run_time), ok,
                             note])
        atomic_write_text(csv_path, buf.getvalue())
    if json_path is not None:
        atomic_write_json(json_path, report.to_dict())
