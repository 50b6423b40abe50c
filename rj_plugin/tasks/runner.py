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
"""

from __future__ import annotations

import csv
import datetime
import io
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from rj_plugin.config import RunConfig
from rj_plugin.io.results import atomic_write_json, atomic_write_text, package_versions
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
    print(format_table(task, records), file=out)
    if summary:
        print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()), file=out)
    if finish_error:
        print(f"plots/summary failed: {finish_error}", file=out)
    print(f"{len(records) - len(failed)}/{len(records)} inputs ok in "
          f"{time.perf_counter() - wall:.1f}s; wrote "
          + ", ".join(p.name for p in [*written, *files]) + f" to {results_dir}", file=out)
    return (1 if failed or finish_error else 0), results_dir
