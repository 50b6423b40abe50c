"""``rj run``: one task over the inputs of a configuration, written to a results folder.

Steps: build the model and inputs (:mod:`~rj_plugin.tasks.context`,
:mod:`~rj_plugin.tasks.inputs`), run the task on every input under a tqdm progress bar (an
exception marks that input failed, with its reason, and the run goes on), then write

* ``results.json``: the resolved configuration (every option, defaults included), the config
  file and overrides, package versions, the model, per-input records (identity, label,
  prediction, status, error, seconds, result) and the task's summary;
* ``results.csv``: the task's table (when it has one);
* ``config.yaml``: the resolved configuration, runnable as is;
* the task's PNG plots;

and print a summary table.  The exit status is 0, or 1 when any input failed.

The results folder is checked before anything is computed (a file in its place, or a folder that
cannot be written, is a configuration error naming ``general.results_dir``).  A rerun into the
same folder replaces the previous run's outputs: after the new results are written, the files
the previous ``results.json`` lists (its plots, and ``results.csv``) that this run did not
write again are deleted, so the folder always matches its ``results.json``.  Nothing else in
the folder is touched.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from rj_plugin.config import RunConfig
from rj_plugin.io.results import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    package_versions,
)
from rj_plugin.tasks import TASK_CLASSES
from rj_plugin.tasks.base import Record, Task, short_id
from rj_plugin.tasks.context import RunContext
from rj_plugin.tasks.inputs import InputItem, load_inputs


def results_dir_for(cfg: RunConfig) -> Path:
    """``general.results_dir``, or ``results/<config file stem>``."""
    if cfg["general"]["results_dir"] is not None:
        return Path(cfg["general"]["results_dir"])
    stem = Path(cfg.source.split(" (with --set")[0]).stem or "run"
    return Path("results") / (stem if stem not in ("<dict>", "") else "run")


#: The files every run writes into its results folder (besides the task's plots).
OWN_FILES = ("results.json", "results.csv", "config.yaml")


def check_results_dir(cfg: RunConfig, results_dir: Path) -> None:
    """ConfigError naming ``general.results_dir`` when the results cannot be written there (a
    file in the folder's place or above it, a folder that is not writable, a folder where one of
    :data:`OWN_FILES` goes).  Creates nothing."""
    key = "general.results_dir"
    if cfg["general"]["results_dir"] is None:
        key += f" (default {results_dir})"
    problem = check_output_dir(results_dir)
    if problem is None:
        problem = next((f"{results_dir / name} is a folder, so the {name} of this run cannot be "
                        "written" for name in OWN_FILES if (results_dir / name).is_dir()), None)
    if problem is not None:
        raise cfg.error(key, f"cannot write the results: {problem}")


def previous_outputs(results_dir: Path) -> set[str]:
    """Names of the files that the previous run in ``results_dir`` wrote and may be stale: the
    plots its ``results.json`` lists, and ``results.csv``.  Empty when there is no readable
    ``results.json`` written by ``rj run`` (so files of other origin are never claimed)."""
    try:
        doc = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(doc, dict) and isinstance(doc.get("files"), list)
            and isinstance(doc.get("records"), list) and "task" in doc):
        return set()
    names = {n for n in doc["files"] if isinstance(n, str) and n and n == Path(n).name
             and not n.startswith(".") and n not in ("results.json", "config.yaml")}
    return names | {"results.csv"}


def remove_stale(results_dir: Path, previous: set[str], written: list[Path]) -> list[str]:
    """Delete the previous run's files (``previous``, from :func:`previous_outputs`) that this
    run did not write again; only plain files directly in ``results_dir``.  Returns their names."""
    keep = {p.name for p in written}
    removed = []
    for name in sorted(previous - keep):
        path = results_dir / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _run_one(task: Task, ctx: RunContext, item: InputItem) -> Record:
    start = time.perf_counter()
    record: Record = {"position": item.position, "input": item.identity, "label": item.label,
                      "label_source": "data" if item.label is not None else "predicted",
                      "predicted": None, "status": "ok", "error": None, "seconds": 0.0,
                      "result": None}
    try:
        if not torch.isfinite(item.x).all():
            raise ValueError("the input contains NaN or inf")
        pred = int(ctx.predict(item.x[None])[0].argmax())
        record["predicted"] = pred
        if record["label"] is None:
            record["label"] = pred
        record["result"] = task.run_input(item, record["label"])
    except Exception as exc:  # noqa: BLE001 - one input's failure must not stop the run
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    record["seconds"] = time.perf_counter() - start
    return record


def format_table(task: Task, records: list[Record]) -> str:
    """The summary table: one line per input (a failed input shows its error instead)."""
    cols = task.columns()
    header = ["#", "input", "label", *[c.header for c in cols]]
    lines: list[tuple[list[str], str | None]] = []
    for r in records:
        base = [str(r["position"]), short_id(r), str(r["label"])]
        if r["status"] == "ok":
            lines.append((base + [c.value(r) for c in cols], None))
        else:
            lines.append((base, f"FAILED: {r['error']}"))
    widths = [len(h) for h in header]
    for cells, _ in lines:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=False)] + widths[
            len(cells):]
    text = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
            "  ".join("-" * w for w in widths)]
    for cells, error in lines:
        line = "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=False))
        text.append(line + ("  " + error if error else ""))
    return "\n".join(text)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def run(cfg: RunConfig, out: TextIO | None = None) -> tuple[int, Path]:
    """Run the configured task; return ``(exit status, results folder)``."""
    out = out or sys.stdout
    wall = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results_dir = results_dir_for(cfg)
    check_results_dir(cfg, results_dir)
    previous = previous_outputs(results_dir)
    torch.manual_seed(cfg["general"]["seed"])
    ctx = RunContext(cfg, results_dir)
    items = load_inputs(cfg, ctx.input_shape, ctx.dtype, ctx.device)
    task = TASK_CLASSES[cfg.task](ctx)
    print(f"rj run: task {cfg.task}, model {ctx.model_info['source']}, {len(items)} input(s), "
          f"results in {results_dir}", file=out)
    from tqdm import tqdm

    records: list[Record] = []
    bar = tqdm(items, desc=cfg.task, unit="input", file=sys.stderr,
               disable=None if cfg["general"]["progress"] else True)
    for item in bar:
        records.append(_run_one(task, ctx, item))
    bar.close()
    finish_error = None
    try:
        summary, files = task.finish(records)
    except Exception as exc:  # noqa: BLE001 - keep the per-input results even so
        summary, files = {}, []
        finish_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    failed = [r for r in records if r["status"] != "ok"]
    document = {
        "task": cfg.task,
        "config_file": cfg.source.split(" (with --set")[0],
        "overrides": cfg.overrides,
        "config": cfg.to_dict(),
        "resolved_paths": {k: (v if isinstance(v, list) else str(v))
                           for k, v in cfg.paths.items()},
        "versions": package_versions(),
        "device": str(ctx.device),
        "model": ctx.model_info,
        "started": started,
        "wall_seconds": time.perf_counter() - wall,
        "inputs": len(records),
        "failed": len(failed),
        "summary": summary,
        "finish_error": finish_error,
        "files": [p.name for p in files],
        "records": records,
    }
    written = [atomic_write_json(results_dir / "results.json", document)]
    table = task.csv_table(records)
    if table is not None:
        written.append(atomic_write_text(results_dir / "results.csv", _csv_text(*table)))
    written.append(atomic_write_text(results_dir / "config.yaml",
                                     yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    removed = remove_stale(results_dir, previous, [*written, *files])
    print(format_table(task, records), file=out)
    if summary:
        print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()), file=out)
    if finish_error:
        print(f"plots/summary failed: {finish_error}", file=out)
    print(f"{len(records) - len(failed)}/{len(records)} inputs ok in "
          f"{time.perf_counter() - wall:.1f}s; wrote "
          + ", ".join(p.name for p in [*written, *files]) + f" to {results_dir}", file=out)
    if removed:
        print(f"removed the previous run's {', '.join(removed)}", file=out)
    return (1 if failed or finish_error else 0), results_dir
