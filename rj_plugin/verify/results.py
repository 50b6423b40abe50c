"""The VNN-COMP result file of one instance: write it atomically, read it back.

Format (what the competition's ``run_instance.sh`` must leave in ``RESULTS_FILE``)::

    sat
    ((X_0 0.1)
     (X_1 -0.25)
     (Y_0 1.5)
     (Y_1 2.0))

The first line is one of ``sat``, ``unsat``, ``unknown``, ``timeout``, ``error``.  After ``sat``
comes the witness: every input ``X_i`` (the ONNX input flattened in C order) and every output
``Y_j``, each value written with Python's ``repr`` of the float64 (the shortest text that reads
back to the same double).  Other answers have nothing after the first line.

The reader also accepts the 2021 spellings ``holds`` (= unsat) and ``violated`` (= sat), and a
bare witness file (``counterexamples/*.counterexample``: no answer line) via
:func:`parse_witness`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rj_plugin.errors import InputError
from rj_plugin.io.results import atomic_write_text

__all__ = [
    "ANSWERS",
    "ResultFile",
    "format_result",
    "format_witness",
    "parse_result",
    "parse_witness",
    "read_result",
    "write_result",
]

#: The answers a result file may start with.
ANSWERS = ("sat", "unsat", "unknown", "timeout", "error")
_ALIASES = {"holds": "unsat", "violated": "sat"}
_PAIR = re.compile(r"\(\s*([XY])_(\d+)\s+([^\s()]+)\s*\)")


@dataclass(frozen=True)
class ResultFile:
    """A parsed result file: the ``answer`` and, after ``sat``, the witness ``x``, ``y``
    (float64 vectors; None when the file has no witness)."""

    answer: str
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    @property
    def witness(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(x, y)`` or None."""
        return None if self.x is None or self.y is None else (self.x, self.y)


def _flat(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise InputError(f"witness {name} is empty")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InputError(f"witness {name}_{bad} is {arr[bad]} (a witness must be finite)")
    return arr


def format_witness(x: object, y: object) -> str:
    """The witness ``((X_0 v) ... (Y_0 v) ...)`` of flat (or flattenable, C order) inputs and
    outputs, one pair per line, values as ``repr(float64)``."""
    xs, ys = _flat(x, "X"), _flat(y, "Y")
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(xs)]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(ys)]
    return "(" + "\n ".join(pairs) + ")\n"


def format_result(answer: str, witness: tuple[object, object] | None = None) -> str:
    """The text of a result file: the answer line, then the witness after ``sat``.

    Raises:
        InputError: an unknown answer, ``sat`` without a witness, or a witness with any other
            answer.
    """
    if answer not in ANSWERS:
        raise InputError(f"answer {answer!r} is not one of {', '.join(ANSWERS)}")
    if answer == "sat":
        if witness is None:
            raise InputError("a sat result needs a witness (x, y)")
        return "sat\n" + format_witness(*witness)
    if witness is not None:
        raise InputError(f"only a sat result carries a witness, not {answer}")
    return answer + "\n"


def write_result(path: str | Path, answer: str,
                 witness: tuple[object, object] | None = None) -> Path:
    """Write the result file atomically (:func:`format_result`); returns the path."""
    return atomic_write_text(path, format_result(answer, witness))


def parse_witness(text: str, source: str = "<string>") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a witness ``((X_0 v) ... (Y_0 v) ...)``.

    The indices of each of X and Y must be exactly 0..n-1 (each once); every value a finite
    number.  Raises :class:`InputError` naming ``source`` and the line otherwise.
    """
    body = text.strip()
    if not (body.startswith("(") and body.endswith(")")):
        raise InputError(f"{source}: the witness must be one parenthesised list "
                         "((X_0 v) ... (Y_0 v) ...)")
    inner = body[1:-1]
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    pos = 0
    line_of = _line_counter(text, text.index("(") + 1)
    for m in _PAIR.finditer(inner):
        gap = inner[pos:m.start()]
        if gap.strip():
            raise InputError(f"{source}:{line_of(pos)}: unexpected text {gap.strip()[:40]!r} "
                             "(expected (X_i value) or (Y_j value))")
        pos = m.end()
        kind, idx, raw = m.group(1), int(m.group(2)), m.group(3)
        try:
            value = float(raw)
        except ValueError:
            raise InputError(f"{source}:{line_of(m.start())}: {kind}_{idx}: {raw!r} is not a "
                             "number") from None
        if not math.isfinite(value):
            raise InputError(f"{source}:{line_of(m.start())}: {kind}_{idx} is {raw} (a witness "
                             "must be finite)")
        if idx in values[kind]:
            raise InputError(f"{source}:{line_of(m.start())}: {kind}_{idx} given twice")
        values[kind][idx] = value
    if inner[pos:].strip():
        raise InputError(f"{source}:{line_of(pos)}: unexpected text {inner[pos:].strip()[:40]!r}"
                         " (expected (X_i value) or (Y_j value))")
    arrays = []
    for kind in ("X", "Y"):
        table = values[kind]
        if not table:
            raise InputError(f"{source}: the witness has no {kind}_i values")
        if sorted(table) != list(range(len(table))):
            missing = min(set(range(max(table) + 1)) - set(table))
            raise InputError(f"{source}: the witness lacks {kind}_{missing} (indices must be "
                             f"0..n-1)")
        arrays.append(np.array([table[i] for i in range(len(table))], dtype=np.float64))
    return arrays[0], arrays[1]


def _line_counter(text: str, offset: int):  # noqa: ANN202 - a small closure
    """A function mapping a position in ``text[offset:]`` to a 1-based line of ``text``."""
    def line_of(pos: int) -> int:
        return text.count("\n", 0, offset + pos) + 1
    return line_of


def parse_result(text: str, source: str = "<string>") -> ResultFile:
    """Parse a result file's text (see the module docstring).

    Raises:
        InputError: an empty file, an unknown first line, a sat result whose witness does not
            parse, or text after any other answer (``source`` and the line named).
    """
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        raise InputError(f"{source}: empty result file (expected one of {', '.join(ANSWERS)})")
    word = lines[first].strip().lower()
    answer = _ALIASES.get(word, word)
    if answer not in ANSWERS:
        raise InputError(f"{source}:{first + 1}: {lines[first].strip()[:40]!r} is not one of "
                         f"{', '.join(ANSWERS)}")
    rest = "\n".join(lines[first + 1:])
    if answer == "sat":
        if not rest.strip():
            return ResultFile("sat")
        # keep line numbers of the whole file in messages
        x, y = parse_witness("\n" * (first + 1) + rest, source)
        return ResultFile("sat", x, y)
    if rest.strip():
        extra = next(i for i in range(first + 1, len(lines)) if lines[i].strip())
        raise InputError(f"{source}:{extra + 1}: unexpected text after {answer} (only sat is "
                         "followed by a witness)")
    return ResultFile(answer)


def read_result(path: str | Path) -> ResultFile:
    """Read and parse the result file at ``path`` (:func:`parse_result`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: result file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not a text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read the result file: {exc.strerror or exc}") from None
    return parse_result(text, str(p))
