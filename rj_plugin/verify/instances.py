"""Benchmark folders in the VNN-COMP layout: ``instances.csv`` and ``known_results.csv``.

* ``instances.csv``: no header; one instance per line, ``onnx,vnnlib,timeout`` with the paths
  relative to the benchmark folder and the timeout in seconds.  Blank lines are skipped.
* ``known_results.csv``: a header that names at least ``onnx``, ``vnnlib``, ``result`` and
  ``confidence``; one row per instance.  Only rows whose confidence is ``witness`` or
  ``consensus`` are *asserted* (``../shared/data/vnncomp/README.md``); the others are kept but
  never scored against.

Every problem is an :class:`~rj_plugin.errors.InputError` naming the file and the 1-based line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rj_plugin.errors import InputError

__all__ = [
    "ASSERTED_CONFIDENCE",
    "Instance",
    "KnownResult",
    "instance_key",
    "instance_stem",
    "read_instances",
    "read_known_results",
]

#: Confidence values of ``known_results.csv`` whose ``result`` is asserted by tests and scores.
ASSERTED_CONFIDENCE = ("witness", "consensus")
#: Results a ``known_results.csv`` row may give.
KNOWN_ANSWERS = ("sat", "unsat", "unknown")


def _norm_rel(path: str) -> str:
    """A relative path as written in the CSV files, normalised (``./a//b`` -> ``a/b``)."""
    return str(PurePosixPath(path.strip().replace("\\", "/")))


def instance_key(onnx: str, vnnlib: str) -> tuple[str, str]:
    """The key that matches an instance across ``instances.csv``, ``known_results.csv`` and a
    ``results.csv``: the two normalised relative paths."""
    return _norm_rel(onnx), _norm_rel(vnnlib)


def instance_stem(onnx: str, vnnlib: str) -> str:
    """File-name stem of an instance's output files: ``<onnx stem>__<vnnlib stem>`` (the
    naming of the shipped ``counterexamples/*.counterexample``)."""
    return f"{PurePosixPath(_norm_rel(onnx)).stem}__{PurePosixPath(_norm_rel(vnnlib)).stem}"


@dataclass(frozen=True)
class Instance:
    """One line of an ``instances.csv``.

    Attributes:
        benchmark: the benchmark (category) name: the folder's name.
        folder: the benchmark folder (absolute).
        onnx: the model path as written (relative to ``folder``, normalised).
        vnnlib: the property path as written (relative to ``folder``, normalised).
        timeout: seconds allowed for the instance.
        line: 1-based line in ``instances.csv``.
    """

    benchmark: str
    folder: Path
    onnx: str
    vnnlib: str
    timeout: float
    line: int

    @property
    def onnx_path(self) -> Path:
        """Absolute path of the model."""
        return self.folder / self.onnx

    @property
    def vnnlib_path(self) -> Path:
        """Absolute path of the property."""
        return self.folder / self.vnnlib

    @property
    def key(self) -> tuple[str, str]:
        """``(onnx, vnnlib)`` as used to match known results (:func:`instance_key`)."""
        return instance_key(self.onnx, self.vnnlib)

    @property
    def stem(self) -> str:
        """File-name stem of this instance's output files (:func:`instance_stem`)."""
        return instance_stem(self.onnx, self.vnnlib)


@dataclass(frozen=True)
class KnownResult:
    """One row of a ``known_results.csv``: the reference ``result`` and its ``confidence``."""

    onnx: str
    vnnlib: str
    result: str
    confidence: str
    line: int

    @property
    def asserted(self) -> bool:
        """Whether the result may be asserted (confidence ``witness`` or ``consensus``)."""
        return self.confidence in ASSERTED_CONFIDENCE


def _read_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-blank CSV row of ``path``."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found" if not path.exists()
                         else f"{path}: {what} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {what} is not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(text.splitlines())
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                rows.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None
    return rows


def read_instances(folder: str | Path, name: str = "instances.csv",
                   check_files: bool = True) -> list[Instance]:
    """Every instance of the benchmark folder ``folder``, in file order.

    Args:
        folder: the benchmark folder; its name is the benchmark (category) name.
        name: the instances file inside it.
        check_files: also check that each model and property file exists.

    Raises:
        InputError: the folder or file is missing, a line does not have three cells, the
            timeout is not a finite number > 0, a referenced file is missing, or an instance is
            listed twice (or two instances would share output file names); the message names
            the file and line.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: benchmark folder not found" if not root.exists()
                         else f"{folder}: not a folder (expected a benchmark folder)")
    root = root.resolve()
    path = root / name
    instances: list[Instance] = []
    seen_keys: dict[tuple[str, str], int] = {}
    seen_stems: dict[str, int] = {}
    for line, cells in _read_rows(path, "instances file"):
        if len(cells) != 3:
            raise InputError(f"{path}:{line}: expected 3 cells onnx,vnnlib,timeout (no header), "
                             f"got {len(cells)}: {','.join(cells)!r}")
        onnx, vnnlib, raw_timeout = cells
        try:
            timeout = float(raw_timeout)
        except ValueError:
            hint = " (instances.csv has no header line)" if line == 1 else ""
            raise InputError(f"{path}:{line}: timeout {raw_timeout!r} is not a number"
                             f"{hint}") from None
        if not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"{path}:{line}: timeout must be a finite number > 0, got "
                             f"{raw_timeout}")
        for rel, what in ((onnx, "model"), (vnnlib, "property")):
            if not rel:
                raise InputError(f"{path}:{line}: empty {what} path")
            if PurePosixPath(rel).is_absolute():
                raise InputError(f"{path}:{line}: {what} path {rel!r} must be relative to "
                                 f"{root}")
        inst = Instance(root.name, root, _norm_rel(onnx), _norm_rel(vnnlib), timeout, line)
        if check_files:
            for file, what in ((inst.onnx_path, "model"), (inst.vnnlib_path, "property")):
                if not file.is_file():
                    raise InputError(f"{path}:{line}: {what} file {file} not found")
        if inst.key in seen_keys:
            raise InputError(f"{path}:{line}: instance {onnx},{vnnlib} is already listed at line "
                             f"{seen_keys[inst.key]}")
        if inst.stem in seen_stems:
            raise InputError(f"{path}:{line}: instance {onnx},{vnnlib} would share its result "
                             f"file name {inst.stem} with line {seen_stems[inst.stem]}")
        seen_keys[inst.key] = seen_stems[inst.stem] = line
        instances.append(inst)
    if not instances:
        raise InputError(f"{path}: no instances listed")
    return instances


def read_known_results(folder: str | Path,
                       name: str = "known_results.csv") -> dict[tuple[str, str], KnownResult]:
    """The rows of ``folder/name`` keyed by :func:`instance_key`.

    Raises:
        InputError: a missing file or column, a result other than sat/unsat/unknown, an empty
            confidence, or an instance given twice (file and line named).
    """
    path = Path(folder) / name
    rows = _read_rows(path, "known results file")
    if not rows:
        raise InputError(f"{path}: empty (expected a header onnx,vnnlib,result,confidence,...)")
    header_line, header = rows[0]
    need = ("onnx", "vnnlib", "result", "confidence")
    missing = [c for c in need if c not in header]
    if missing:
        raise InputError(f"{path}:{header_line}: header lacks column(s) {', '.join(missing)} "
                         f"(has {', '.join(header)})")
    col = {c: header.index(c) for c in need}
    out: dict[tuple[str, str], KnownResult] = {}
    for line, cells in rows[1:]:
        if len(cells) < len(header):
            raise InputError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)}")
        onnx, vnnlib = cells[col["onnx"]], cells[col["vnnlib"]]
        result, confidence = cells[col["result"]].lower(), cells[col["confidence"]]
        if result not in KNOWN_ANSWERS:
            raise InputError(f"{path}:{line}: result {cells[col['result']]!r} is not one of "
                             f"{', '.join(KNOWN_ANSWERS)}")
        if not onnx or not vnnlib:
            raise InputError(f"{path}:{line}: empty onnx or vnnlib cell")
        if not confidence:
            raise InputError(f"{path}:{line}: empty confidence")
        if result == "unknown" and confidence in ASSERTED_CONFIDENCE:
            raise InputError(f"{path}:{line}: result unknown cannot have confidence "
                             f"{confidence}")
        key = instance_key(onnx, vnnlib)
        if key in out:
            raise InputError(f"{path}:{line}: {onnx},{vnnlib} is already given at line "
                             f"{out[key].line}")
        out[key] = KnownResult(key[0], key[1], result, confidence, line)
    return out
