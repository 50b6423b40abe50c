"""The interface every task implements, and what the runner records per input.

A task is constructed once per run with the :class:`~rj_plugin.tasks.context.RunContext`
(``__init__`` checks the task options against the model and raises ``ConfigError``), then:

* ``run_input(item, label)`` computes one input's result, a JSON-friendly dict (an exception
  marks that input failed; the others go on);
* ``columns()`` gives the summary table's columns, read from the per-input records;
* ``csv_table(records)`` the tabular part of the results (header, rows) or None;
* ``finish(records)`` writes the plots and returns a run-level summary and the files written.

A record (one per input) is ``{"position", "input" (identity), "label", "label_source",
"predicted", "status" ("ok" | "failed"), "error", "seconds", "result"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem

Record = dict[str, Any]


@dataclass
class Column:
    """A summary-table column: a header and a formatter of one (successful) record."""

    header: str
    value: Callable[[Record], str]


def fmt(x: Any, digits: int = 4) -> str:
    """Compact number formatting for tables (``-`` for None, ``inf`` for infinity)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


class Task:
    """Base class of the tasks (see the module doc)."""

    name = "task"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.opts = ctx.cfg["task"]

    def run_input(self, item: InputItem, label: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def columns(self) -> list[Column]:
        return []

    def csv_table(self, records: list[Record]) -> tuple[list[str], list[list[Any]]] | None:
        return None

    def finish(self, records: list[Record]) -> tuple[dict[str, Any], list[Path]]:
        return {}, []

    # helpers -------------------------------------------------------------------------------

    @property
    def plots(self) -> bool:
        return bool(self.ctx.cfg["general"]["plots"])

    def spec_rows(self) -> int | None:
        """Rows of the output specification (None when it depends on a missing label)."""
        kind = self.ctx.cfg["specification"]["output"]
        if kind == "all":
            return self.ctx.n_out
        if kind == "matrix":
            return self.ctx.spec(None).rows
        return 1 if self.ctx.cfg["specification"]["target"] is not None else self.ctx.n_out - 1

    def check_row(self, key: str, index: int | None) -> None:
        """ConfigError naming ``task.<key>`` when ``index`` is not a row of the specification."""
        rows = self.spec_rows()
        if index is not None and rows is not None and index >= rows:
            raise self.ctx.cfg.error(f"task.{key}", f"row {index} does not exist: the output "
                                                    f"specification has {rows} rows")


def ok_records(records: list[Record]) -> list[Record]:
    """The records of inputs that did not fail."""
    return [r for r in records if r["status"] == "ok"]


def short_id(record: Record) -> str:
    """A short name of an input for tables and plots (``test#7``, ``prop_1.vnnlib#0``)."""
    ident = record["input"]
    if ident.get("source") == "digits":
        return f"{ident['split']}#{ident['index']}"
    if ident.get("source") == "vnnlib":
        suffix = f"/{ident['box']}" if ident.get("box") else ""
        return f"{Path(ident['file']).name}{suffix}"
    if "file" in ident:
        return f"{Path(ident['file']).name}#{ident['index']}"
    return f"{ident.get('source', '?')}#{ident.get('index', record['position'])}"
