"""``rj verify`` (one instance) and ``rj vnncomp`` (benchmark folders, serial or on Ray).

One instance (:func:`run_verify`, the body of ``rj verify``): read the per-benchmark
configuration, call the verifier with the time left of the instance's budget, re-check a ``sat``
witness with onnxruntime, write the VNN-COMP result file and a JSON record (both atomically).  A
watchdog thread writes ``timeout`` and ends the process when the verifier overruns its budget
(``hard_exit``, what the command line uses).

Benchmark folders (:func:`run_vnncomp`, the body of ``rj vnncomp``): every line of each folder's
``instances.csv`` runs as a separate ``rj verify`` process in a new session, started with the
instance's budget (``timeout x scale``, counted from the moment the process is started, so
Python start-up and model loading are inside it) and killed with its whole process group at the
budget plus :data:`KILL_GRACE_S`; a killed instance is answered ``timeout``.  The ``serial``
executor runs ``--jobs`` processes at a time from threads; the ``ray`` executor runs each
instance as a Ray task (one CPU each by default) that starts the same process, so both give the
same answers.  A Ray task returns the result text and record to the driver, which writes every
file, so the output folder needs to exist on the driver only (the benchmark folders must be
readable at the same path on every node).

Output folder::

    results.csv                 competition columns, no header (category,onnx,vnnlib,
                                prepare_time,result,run_time), instances.csv order
    <category>/<stem>.result    the result file (answer line, witness after sat)
    <category>/<stem>.counterexample   the witness alone (sat only)
    <category>/<stem>.json      the verdict's details, times, options, versions, process info
    run.json                    the run: folders, configurations, executor, label, versions
    score.csv, score.json       rj score's report (when the folders have known_results.csv)
    cactus.png                  instances solved vs time, one line per configuration

``<stem>`` is ``<onnx stem>__<vnnlib stem>`` (:func:`~rj_plugin.verify.instances.instance_stem`).

Testing hook: a verifier other than ``rj_plugin.verify.pipeline:verify_instance`` can be named
as ``module:function`` (``rj verify --verifier`` or the environment variable ``RJ_VERIFIER``); it
is called as ``function(onnx_path, vnnlib_path, timeout_s, options)`` with ``options`` the dict
of ``VerifyOptions`` fields, and returns an object (or dict) with ``answer``, ``witness``,
``stage``, ``seconds``, ``details``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import importlib
import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rj_plugin.config import VerifyConfig, load_vnncomp_config
from rj_plugin.errors import ConfigError, InputError, RJError
from rj_plugin.io.results import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    package_versions,
    to_jsonable,
)
from rj_plugin.verify.instances import Instance, read_instances
from rj_plugin.verify.results import ANSWERS, format_result, format_witness

__all__ = [
    "DEFAULT_VERIFIER",
    "KILL_GRACE_S",
    "RunSummary",
    "benchmark_config_path",
    "cactus_plot",
    "run_instance_job",
    "run_verify",
    "run_vnncomp",
]

DEFAULT_VERIFIER = "rj_plugin.verify.pipeline:verify_instance"
VERIFIER_ENV = "RJ_VERIFIER"
#: Seconds past an instance's budget before ``rj vnncomp`` kills its process.
KILL_GRACE_S = 1.0
#: The folder of the per-benchmark configurations shipped with the repository.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "vnncomp"


# -- one instance: rj verify -----------------------------------------------------------------


def _load_verifier(spec: str) -> Callable[..., Any]:
    """The callable named ``module:function``."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"verifier {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if spec == DEFAULT_VERIFIER:
            raise RJError(f"the verifier core {module_name} is not available: {exc}") from None
        raise ConfigError(f"verifier {spec!r}: cannot import {module_name}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"verifier {spec!r}: {module_name} has no function {func_name}")
    return func


def _verdict_dict(verdict: Any) -> dict[str, Any]:
    """``answer, witness, stage, seconds, details`` of a Verdict (any object or mapping)."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    answer = get("answer")
    if answer not in ANSWERS:
        raise RJError(f"the verifier answered {answer!r}, not one of {', '.join(ANSWERS)}")
    witness = get("witness")
    if witness is not None:
        x, y = witness
        witness = (np.asarray(x, dtype=np.float64).reshape(-1),
                   np.asarray(y, dtype=np.float64).reshape(-1))
    details = get("details") or {}
    return {"answer": answer, "witness": witness, "stage": str(get("stage") or ""),
            "seconds": float(get("seconds") or 0.0), "details": dict(details)}


def _call_verifier(spec: str, onnx: Path, vnnlib: Path, timeout_s: float,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Run the verifier; exceptions become an ``error`` verdict naming them."""
    start = time.perf_counter()
    try:
        func = _load_verifier(spec)
        if spec == DEFAULT_VERIFIER:
            from rj_plugin.verify.pipeline import VerifyOptions

            fields = {f.name for f in dataclasses.fields(VerifyOptions)}
            unknown = sorted(set(options) - fields)
            if unknown:
                raise RJError(f"VerifyOptions has no field(s) {', '.join(unknown)} (config "
                              "mapping out of date)")
            verdict = func(str(onnx), str(vnnlib), timeout_s, VerifyOptions(**options))
        else:
            verdict = func(str(onnx), str(vnnlib), timeout_s, dict(options))
        return _verdict_dict(verdict)
    except RJError as exc:
        reason = str(exc)
        trace = None
    except Exception as exc:  # noqa: BLE001 - any verifier failure is an error answer
        reason = f"{type(exc).__name__}: {exc}"
        trace = traceback.format_exc(limit=8)
    details: dict[str, Any] = {"error": reason}
    if trace:
        details["traceback"] = trace
    return {"answer": "error", "witness": None, "stage": "error",
            "seconds": time.perf_counter() - start, "details": details}


def _summary_line(answer: str, seconds: float, stage: str, onnx: Path, vnnlib: Path) -> str:
    return f"{answer}  {seconds:.2f}s  stage={stage or '-'}  {onnx.name} {vnnlib.name}"


def run_verify(onnx: str | Path, vnnlib: str | Path, timeout: float,
               config: VerifyConfig | None = None, results_file: str | Path | None = None,
               json_file: str | Path | None = None, verifier: str | None = None,
               clock_start: float | None = None, category: str | None = None,
               hard_exit: bool = False, out: Any = None) -> dict[str, Any]:
    """Verify one instance and write its result file and JSON record (see the module doc).

    Args:
        onnx, vnnlib: the instance.
        timeout: its budget in seconds, counted from ``clock_start`` (``time.time()``; default
            now).
        config: the verifier configuration (default: every default).
        results_file: the VNN-COMP result file to write (optional).
        json_file: the JSON record to write (optional).
        verifier: ``module:function`` (default: ``$RJ_VERIFIER``, else the pipeline).
        category: the benchmark name recorded.
        hard_exit: arm the watchdog that writes ``timeout`` and ends the process (``os._exit``)
            when the budget is spent; only for a process that does nothing else.
        out: where the one-line summary goes (default: stdout).

    Returns:
        The JSON record (``answer`` among its keys).

    Raises:
        InputError: a missing model or property file, a bad timeout, or an output path that
            cannot be written (checked before anything runs; nothing is written then).
    """
    onnx, vnnlib = Path(onnx), Path(vnnlib)
    start = time.time() if clock_start is None else float(clock_start)
    for path, what, opt in ((onnx, "model", "--model"), (vnnlib, "property", "--vnnlib")):
        if not path.is_file():
            raise InputError(f"{opt} {path}: {what} file not found" if not path.exists()
                             else f"{opt} {path}: not a file")
    if not (math.isfinite(timeout) and timeout > 0):
        raise InputError(f"--timeout must be a finite number > 0, got {timeout}")
    for path, opt in ((results_file, "--results"), (json_file, "--json")):
        if path is not None:
            problem = check_output_file(path)
            if problem is not None:
                raise InputError(f"{opt} {path}: cannot write it: {problem}")
    config = config or load_vnncomp_config()
    spec = verifier or os.environ.get(VERIFIER_ENV) or DEFAULT_VERIFIER
    options = config.verify_options()
    out = out if out is not None else sys.stdout
    base = {"onnx": str(onnx), "vnnlib": str(vnnlib), "category": category,
            "timeout": timeout, "config": {"source": config.source, **config.to_dict()},
            "options": options, "verifier": spec, "versions": package_versions()}
    lock = threading.Lock()
    finished = threading.Event()

    def write(record: dict[str, Any], text: str) -> None:
        if results_file is not None:
            atomic_write_text(results_file, text)
        if json_file is not None:
            atomic_write_json(json_file, record)

    def watchdog() -> None:
        with lock:
            if finished.is_set():
                return
            finished.set()
            wall = time.time() - start
            record = {**base, "answer": "timeout", "stage": "watchdog", "seconds": wall,
                      "wall_seconds": wall, "details": {"reason": "budget spent; the verifier "
                                                        "was still running"}}
            try:
                write(record, format_result("timeout"))
                print(_summary_line("timeout", wall, "watchdog", onnx, vnnlib), file=out,
                      flush=True)
            finally:
                os._exit(0)

    remaining = timeout - (time.time() - start)
    timer = None
    if hard_exit:
        timer = threading.Timer(max(remaining, 0.0), watchdog)
        timer.daemon = True
        timer.start()
    budget = max(remaining - min(0.5, 0.1 * max(remaining, 0.0)), 0.01)
    verdict = _call_verifier(spec, onnx, vnnlib, budget, options)
    witness_check = None
    if verdict["answer"] == "sat" and config["specification"]["check_witness"]:
        from rj_plugin.verify.witness_check import check_witness

        if verdict["witness"] is None:
            witness_check = {"ok": False, "reason": "the verifier gave no witness"}
        else:
            try:
                witness_check = check_witness(onnx, vnnlib, *verdict["witness"]).to_dict()
            except RJError as exc:
                witness_check = {"ok": False, "reason": str(exc)}
        if not witness_check["ok"]:
            verdict["details"]["rejected_sat"] = witness_check["reason"]
            verdict["answer"], verdict["witness"] = "unknown", None
    wall = time.time() - start
    if wall > timeout and verdict["answer"] != "error":
        verdict["details"]["late_answer"] = verdict["answer"]
        verdict["answer"], verdict["witness"] = "timeout", None
    if verdict["answer"] == "sat" and verdict["witness"] is None:
        verdict["details"]["rejected_sat"] = "the verifier gave no witness"
        verdict["answer"] = "unknown"
    record = {**base, "answer": verdict["answer"], "stage": verdict["stage"],
              "seconds": verdict["seconds"], "wall_seconds": wall,
              "witness": (None if verdict["witness"] is None else
                          {"x": verdict["witness"][0], "y": verdict["witness"][1]}),
              "witness_check": witness_check, "details": verdict["details"]}
    with lock:
        if finished.is_set():  # the watchdog won: it is ending the process
            time.sleep(60)
        finished.set()
        if timer is not None:
            timer.cancel()
        try:
            text = format_result(verdict["answer"], verdict["witness"])
        except RJError as exc:  # e.g. a non-finite witness
            record["details"]["rejected_sat"] = str(exc)
            record["answer"], record["witness"] = "unknown", None
            text = format_result("unknown")
        write(to_jsonable(record), text)
    print(_summary_line(record["answer"], wall, record["stage"], onnx, vnnlib), file=out,
          flush=True)
    return record


# -- benchmark folders: rj vnncomp -------------------------------------------------------------


def benchmark_config_path(benchmark: str, config_dir: Path | None = None) -> Path | None:
    """``configs/vnncomp/<benchmark>.yaml`` when it exists, else None."""
    path = (config_dir or CONFIG_DIR) / f"{benchmark}.yaml"
    return path if path.is_file() else None


#: Instance processes running now (serial executor), killed if the run is interrupted.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _kill_live() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_instance_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one instance as an ``rj verify`` process with a hard wall-clock limit.

    ``job`` (plain data, so that it travels to Ray workers): ``onnx_path``, ``vnnlib_path``,
    ``timeout`` (the scaled budget), ``category``, ``config`` (a path or None), ``overrides``
    (``section.key=value`` strings for ``--set``), ``verifier``
    (None: the default), ``grace`` (seconds past the budget before the kill), ``threads``,
    ``pythonpath`` (prepended to the child's PYTHONPATH, or None).

    Returns ``answer``, ``result_text``, ``record`` (the child's JSON record or None),
    ``run_time`` (wall seconds from start to exit), ``killed``, ``returncode``,
    ``stderr_tail``.
    """
    with tempfile.TemporaryDirectory(prefix="rj-instance-") as tmp:
        result_file, json_file = Path(tmp) / "result.txt", Path(tmp) / "record.json"
        err_file = Path(tmp) / "stderr.txt"
        start = time.time()
        cmd = [sys.executable, "-m", "rj_plugin.cli", "verify", "--model", job["onnx_path"],
               "--vnnlib", job["vnnlib_path"], "--timeout", repr(float(job["timeout"])),
               "--results", str(result_file), "--json", str(json_file),
               "--clock-start", repr(start), "--category", job["category"]]
        if job.get("config"):
            cmd += ["--config", job["config"]]
        if job.get("overrides"):  # --set of the suite run: every instance gets it
            cmd += ["--set", *job["overrides"]]
        if job.get("verifier"):
            cmd += ["--verifier", job["verifier"]]
        env = dict(os.environ)
        threads = str(job.get("threads") or 1)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   OPENBLAS_NUM_THREADS=threads)
        if job.get("pythonpath"):
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (job["pythonpath"], env.get("PYTHONPATH")) if p)
        killed = False
        with open(err_file, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            with _LIVE_LOCK:
                _LIVE.add(proc)
            try:
                proc.wait(timeout=max(float(job["timeout"]) - (time.time() - start), 0.0)
                          + float(job.get("grace", KILL_GRACE_S)))
            except subprocess.TimeoutExpired:
                killed = True
                _kill_group(proc)
                proc.wait()
            except BaseException:
                _kill_group(proc)
                proc.wait()
                raise
            finally:
                with _LIVE_LOCK:
                    _LIVE.discard(proc)
        run_time = time.time() - start
        stderr_tail = err_file.read_text(errors="replace")[-2000:]
        record = None
        if json_file.is_file():
            import json

            try:
                record = json.loads(json_file.read_text())
            except ValueError:
                record = None
        text = result_file.read_text() if result_file.is_file() else None
    if killed:
        answer, text = "timeout", format_result("timeout")
    elif (proc.returncode in (0, 1) and record is not None and text is not None
          and record.get("answer") in ANSWERS):
        answer = record["answer"]
    else:  # the process failed before it could answer (its stderr says why)
        answer, text = "error", format_result("error")
        lines = [ln for ln in stderr_tail.splitlines() if ln.strip()]
        record = {**(record or {}), "details": {
            "error": lines[-1] if lines else f"rj verify exited with status {proc.returncode}"}}
    return {"answer": answer, "result_text": text, "record": record, "run_time": run_time,
            "killed": killed, "returncode": proc.returncode, "stderr_tail": stderr_tail}


@dataclasses.dataclass
class RunSummary:
    """What :func:`run_vnncomp` did: the output folder, one row per instance (results.csv
    order), the score report (None without known results) and the files written."""

    output: Path
    rows: list[dict[str, Any]]
    score: Any = None
    files: list[str] = dataclasses.field(default_factory=list)

    def answers(self) -> dict[tuple[str, str, str], str]:
        """``{(category, onnx, vnnlib): answer}``."""
        return {(r["category"], r["onnx"], r["vnnlib"]): r["result"] for r in self.rows}


def _results_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in rows:
        writer.writerow([r["category"], r["onnx"], r["vnnlib"], f"{r['prepare_time']:.6f}",
                         r["result"], f"{r['run_time']:.6f}"])
    return buf.getvalue()


def _solved_times(csv_path: Path) -> list[float]:
    from rj_plugin.verify.score import read_results_csv

    return sorted(r.run_time for r in read_results_csv(csv_path) if r.result in ("sat", "unsat"))


def cactus_plot(lines: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Instances solved (y) vs time (x, log scale): for each configuration, the k-th point is
    the k-th smallest run time among its solved instances."""
    from rj_plugin.plots import _figure, _save

    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for label, times in lines.items():
        ts = sorted(times)
        if ts:
            ax.step([0.0, *ts], range(len(ts) + 1), where="post", label=f"{label} ({len(ts)})")
        else:
            ax.plot([], [], label=f"{label} (0)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("instances solved")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "cactus plot")
    return _save(fig, path)


def run_label(run_dir: Path) -> str:
    """The ``label`` of an output folder's ``run.json``, or the folder's name."""
    import json

    try:
        return str(json.loads((run_dir / "run.json").read_text())["label"])
    except (OSError, ValueError, KeyError):
        return run_dir.name


def run_vnncomp(bench_dirs: Sequence[str | Path], output: str | Path | None = None,
                config: str | Path | None = None, overrides: Sequence[str] = (),
                timeout_scale: float = 1.0, jobs: int = 1, executor: str = "serial",
                address: str | None = None, limit: int | None = None,
                verifier: str | None = None, progress: bool | None = None,
                label: str | None = None, compare: Sequence[str | Path] = (),
                cpus_per_task: float = 1.0, grace: float = KILL_GRACE_S,
                config_dir: Path | None = None, out: Any = None) -> RunSummary:
    """Run every instance of the benchmark folders ``bench_dirs`` (see the module docstring).

    Args:
        bench_dirs: benchmark folders (each with an instances.csv).
        output: the output folder (default: ``general.results_dir`` of the configuration).
        config: one configuration for every benchmark; default: ``configs/vnncomp/<name>.yaml``
            per benchmark when it exists, else the defaults.
        overrides: ``section.key=value`` applied to every configuration.
        timeout_scale: each instance's timeout is multiplied by this (> 0).
        jobs: serial executor: instances run at the same time.
        executor: ``serial`` or ``ray``.
        address: Ray cluster address (None: a local Ray started here, or the one running).
        limit: run only the first ``limit`` instances of each folder.
        verifier: ``module:function`` instead of the pipeline (testing hook).
        progress: tqdm bar (default: the configurations' ``general.progress``).
        label: the configuration's name in the cactus plot (default: the config file stem, or
            ``per-benchmark``).
        compare: earlier output folders drawn in the cactus plot too.
        cpus_per_task: Ray CPUs per instance (also the threads each instance may use).
        grace: seconds past the budget before an instance is killed.
        out: where the tables go (default: stdout).

    Raises:
        InputError / ConfigError: every folder, configuration and option is checked before any
            instance runs.
    """
    out = out if out is not None else sys.stdout
    if not bench_dirs:
        raise InputError("give at least one benchmark folder")
    if not (math.isfinite(timeout_scale) and timeout_scale > 0):
        raise InputError(f"--timeout-scale must be a finite number > 0, got {timeout_scale}")
    if jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {jobs}")
    if executor not in ("serial", "ray"):
        raise InputError(f"--executor must be serial or ray, got {executor!r}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if not (math.isfinite(cpus_per_task) and cpus_per_task > 0):
        raise InputError(f"--cpus-per-task must be a number > 0, got {cpus_per_task}")
    benches: list[tuple[list[Instance], VerifyConfig, str | None]] = []
    names: set[str] = set()
    for folder in bench_dirs:
        instances = read_instances(folder)
        name = instances[0].benchmark
        if name in names:
            raise InputError(f"{folder}: a benchmark folder named {name} is already given")
        names.add(name)
        cfg_path = Path(config) if config is not None else benchmark_config_path(name,
                                                                                 config_dir)
        cfg = load_vnncomp_config(cfg_path, list(overrides))
        benches.append((instances[:limit] if limit else instances, cfg,
                        str(cfg_path.resolve()) if cfg_path else None))
    if output is None:
        dirs = {c["general"]["results_dir"] for _, c, _ in benches}
        if None in dirs or len(dirs) != 1:
            raise InputError("give --output (or one general.results_dir in the configuration)")
        output = dirs.pop()
    output = Path(output)
    problem = check_output_dir(output)
    if problem is not None:
        raise InputError(f"--output {output}: cannot use it: {problem}")
    compare_dirs = [Path(c) for c in compare]
    for c in compare_dirs:
        if not (c / "results.csv").is_file():
            raise InputError(f"--compare {c}: no results.csv there")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--executor ray: the ray package is not installed") from None
    if label is None:
        label = Path(config).stem if config is not None else "per-benchmark"
    if progress is None:
        progress = all(c["general"]["progress"] for _, c, _ in benches)
    output.mkdir(parents=True, exist_ok=True)
    pythonpath = os.environ.get("PYTHONPATH") if verifier else None

    jobs_list: list[tuple[Instance, VerifyConfig, dict[str, Any], float]] = []
    for instances, cfg, cfg_path in benches:
        for inst in instances:
            t0 = time.perf_counter()
            for suffix in (".result", ".counterexample", ".json"):
                (output / inst.benchmark / f"{inst.stem}{suffix}").unlink(missing_ok=True)
            job = {"onnx_path": str(inst.onnx_path), "vnnlib_path": str(inst.vnnlib_path),
                   "timeout": inst.timeout * timeout_scale, "category": inst.benchmark,
                   "config": cfg_path, "overrides": list(overrides), "verifier": verifier,
                   "grace": grace, "threads": max(1, int(cpus_per_task)),
                   "pythonpath": pythonpath}
            jobs_list.append((inst, cfg, job, time.perf_counter() - t0))
    run_started = time.time()
    done: dict[int, dict[str, Any]] = {}
    files: list[str] = []
    csv_path = output / "results.csv"

    from tqdm import tqdm

    bar = tqdm(total=len(jobs_list), desc="vnncomp", unit="instance", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    counts: dict[str, int] = {}

    def finish(index: int, res: dict[str, Any]) -> None:
        inst, cfg, job, prep = jobs_list[index]
        folder = output / inst.benchmark
        result_path = folder / f"{inst.stem}.result"
        atomic_write_text(result_path, res["result_text"])
        record = res["record"] or {}
        witness = record.get("witness") if res["answer"] == "sat" else None
        if witness:
            atomic_write_text(folder / f"{inst.stem}.counterexample",
                              format_witness(witness["x"], witness["y"]))
        info = {"category": inst.benchmark, "onnx": inst.onnx, "vnnlib": inst.vnnlib,
                "line": inst.line, "timeout": inst.timeout, "timeout_scale": timeout_scale,
                "budget": job["timeout"], "answer": res["answer"], "run_time": res["run_time"],
                "prepare_time": prep, "killed": res["killed"], "returncode": res["returncode"],
                "stage": record.get("stage"), "verifier_seconds": record.get("seconds"),
                "details": record.get("details"), "witness_check": record.get("witness_check"),
                "witness": record.get("witness"), "config": {"source": cfg.source,
                                                            **cfg.to_dict()},
                "options": cfg.verify_options(), "versions": record.get("versions")
                or package_versions(), "executor": executor, "stderr_tail": res["stderr_tail"]}
        atomic_write_json(folder / f"{inst.stem}.json", info)
        done[index] = {"category": inst.benchmark, "onnx": inst.onnx, "vnnlib": inst.vnnlib,
                       "prepare_time": prep, "result": res["answer"],
                       "run_time": res["run_time"]}
        atomic_write_text(csv_path, _results_csv([done[i] for i in sorted(done)]))
        counts[res["answer"]] = counts.get(res["answer"], 0) + 1
        bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        bar.update(1)

    try:
        if executor == "serial":
            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(run_instance_job, j[2]): i
                           for i, j in enumerate(jobs_list)}
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        finish(futures[fut], fut.result())
                except BaseException:  # interrupted: stop what runs, start nothing new
                    for fut in futures:
                        fut.cancel()
                    _kill_live()
                    raise
        else:
            import ray

            started_here = False
            if not ray.is_initialized():
                if address is None:
                    ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
                started_here = True
            try:
                remote = ray.remote(num_cpus=cpus_per_task, max_retries=0)(run_instance_job)
                refs = {remote.remote(j[2]): i for i, j in enumerate(jobs_list)}
                pending = list(refs)
                try:
                    while pending:
                        ready, pending = ray.wait(pending, num_returns=1)
                        for ref in ready:
                            finish(refs[ref], ray.get(ref))
                except BaseException:  # interrupted: cancel the rest (each instance process
                    for ref in pending:  # also ends itself at its own deadline)
                        ray.cancel(ref, force=True)
                    raise
            finally:
                if started_here:
                    ray.shutdown()
    finally:
        bar.close()
    rows = [done[i] for i in sorted(done)]
    atomic_write_text(csv_path, _results_csv(rows))
    files.append(str(csv_path))

    # summary: the score (right/wrong/points) where known results exist, else plain counts
    from rj_plugin.verify.score import format_table, score_results, write_report

    report = score_results(csv_path, [b[0][0].folder for b in benches], results_dir=output)
    write_report(report, output / "score.csv", output / "score.json")
    files += [str(output / "score.csv"), str(output / "score.json")]
    print(format_table(report), file=out, end="")
    print(f"total points: {report.total_points}", file=out)

    lines = {label: [r["run_time"] for r in rows if r["result"] in ("sat", "unsat")]}
    others = [d for d in sorted(output.iterdir()) if d.is_dir() and (d / "run.json").is_file()
              and (d / "results.csv").is_file()] + compare_dirs
    for d in others:
        name = run_label(d)
        while name in lines:
            name += "'"
        lines[name] = _solved_times(d / "results.csv")
    cactus_plot(lines, output / "cactus.png", title=", ".join(sorted(names)))
    files.append(str(output / "cactus.png"))
    atomic_write_json(output / "run.json", {
        "label": label, "benchmarks": [{"folder": str(b[0][0].folder), "instances": len(b[0]),
                                        "config": b[2], "resolved": b[1].to_dict(),
                                        "options": b[1].verify_options()} for b in benches],
        "overrides": list(overrides), "timeout_scale": timeout_scale, "executor": executor,
        "jobs": jobs, "address": address, "limit": limit, "cpus_per_task": cpus_per_task,
        "grace": grace, "verifier": verifier or DEFAULT_VERIFIER, "started": run_started,
        "wall_seconds": time.time() - run_started, "points": report.total_points,
        "versions": package_versions(), "files": files})
    files.append(str(output / "run.json"))
    print(f"wrote {csv_path} ({len(rows)} instances), cactus.png, score.csv, run.json in "
          f"{output}", file=out)
    return RunSummary(output, rows, report, files)
