"""The verifier's front ends: instances.csv / known_results.csv, result files, witness re-checks,
scoring, ``rj verify``, ``rj vnncomp`` (serial and Ray, wall-clock timeouts), the VNN-COMP
shell scripts and the per-benchmark configurations.

The verifier core is replaced by the fake verifiers below (named ``module:function`` through the
runner's testing hook), so these tests do not depend on it; the tests at the end run the real
``rj_plugin.verify.pipeline`` on the tiny ``test`` benchmark when it exists.  Parts that need
``../shared/data/vnncomp`` are skipped, with the reason, when it is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from rj_plugin.cli import main
from rj_plugin.config import (
    VERIFY_OPTION_KEYS,
    VNNCOMP_SCHEMA,
    load_vnncomp_config,
)
from rj_plugin.errors import ConfigError, InputError
from rj_plugin.verify.instances import (
    read_instances,
    read_known_results,
)
from rj_plugin.verify.results import (
    ANSWERS,
    format_result,
    parse_result,
    parse_witness,
    read_result,
    write_result,
)
from rj_plugin.verify.runner import KILL_GRACE_S, run_vnncomp
from rj_plugin.verify.score import POINTS_RIGHT, POINTS_WRONG, score_results
from rj_plugin.verify.witness_check import check_witness

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "vnncomp"
SCRIPTS = REPO / "scripts" / "vnncomp"
HERE = "tests.test_verify_frontends"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"VNN-COMP data not found at {DATA} "
                                "(../shared missing)")


# -- fake verifiers (the runner's module:function hook; run in child processes) ---------------


def oracle_verifier(onnx: str, vnnlib: str, timeout_s: float, options: dict) -> object:
    """Answers from the benchmark folder itself: sat with the shipped counterexample, unsat for
    an asserted unsat, unknown otherwise (deterministic, so serial and Ray must agree)."""
    onnx_p, vnnlib_p = Path(onnx), Path(vnnlib)
    folder = onnx_p.parents[1]
    ce = folder / "counterexamples" / f"{onnx_p.stem}__{vnnlib_p.stem}.counterexample"
    if ce.is_file():
        x, y = parse_witness(ce.read_text(), str(ce))
        return SimpleNamespace(answer="sat", witness=(x, y), stage="oracle", seconds=0.0,
                               details={"source": ce.name, "seed": options["seed"]})
    key = (f"{onnx_p.parent.name}/{onnx_p.name}", f"{vnnlib_p.parent.name}/{vnnlib_p.name}")
    known = read_known_results(folder).get(key)
    answer = "unsat" if known is not None and known.asserted and known.result == "unsat" \
        else "unknown"
    return {"answer": answer, "witness": None, "stage": "oracle", "seconds": 0.0,
            "details": {}}


def slow_verifier(onnx: str, vnnlib: str, timeout_s: float, options: dict) -> object:
    """Ignores its budget: sleeps (test_nano) or holds the GIL in one C call (others)."""
    if "nano" in onnx:
        time.sleep(600)
    return sum(range(10**13))  # a builtin loop that never releases the GIL


def error_verifier(onnx: str, vnnlib: str, timeout_s: float, options: dict) -> object:
    raise RuntimeError("the fake verifier broke on purpose")


def lying_verifier(onnx: str, vnnlib: str, timeout_s: float, options: dict) -> object:
    """Claims sat with a point outside the input box."""
    return {"answer": "sat", "witness": (np.full(5, 9.0), np.zeros(5)), "stage": "lie",
            "seconds": 0.0, "details": {}}


@pytest.fixture
def hook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes can import this module (for ``--verifier tests...``)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def options_echo_verifier(onnx: str, vnnlib: str, timeout_s: float, options: dict) -> object:
    """Answers unknown and records the options the instance process was given."""
    return {"answer": "unknown", "witness": None, "stage": "echo", "seconds": 0.0,
            "details": {"options_seen": options}}


def _tiny_bench(tmp_path: Path, names: tuple[str, ...], timeout: float = 60,
                folder: str = "test") -> Path:
    """A benchmark folder in tmp_path with some instances of ../shared/data/vnncomp/test."""
    src = DATA / "test"
    dst = tmp_path / folder
    for sub in ("onnx", "vnnlib", "counterexamples"):
        shutil.copytree(src / sub, dst / sub)
    lines = [ln for ln in (src / "instances.csv").read_text().splitlines()
             if any(f"/{n}.onnx" in ln for n in names)]
    (dst / "instances.csv").write_text("".join(
        f"{ln.rsplit(',', 1)[0]},{timeout}\n" for ln in lines))
    shutil.copy(src / "known_results.csv", dst / "known_results.csv")
    return dst


# -- instances.csv and known_results.csv ------------------------------------------------------


@needs_data
def test_every_shipped_benchmark_folder_parses() -> None:
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
        instances = read_instances(folder)
        known = read_known_results(folder)
        assert {i.key for i in instances} == set(known), folder.name
        assert all(i.timeout > 0 and i.onnx_path.is_file() for i in instances)
    acas = read_instances(DATA / "acasxu")
    assert len(acas) == 186 and acas[0].benchmark == "acasxu" and acas[0].timeout == 116
    known = read_known_results(DATA / "test")
    assert [k.asserted for k in known.values()] == [False, False, False, True, True]


BAD_INSTANCES = [
    ("header", "onnx,vnnlib,timeout\n", ":1: timeout 'timeout' is not a number (instances.csv "
                                        "has no header"),
    ("two-cells", "onnx/a.onnx,vnnlib/p.vnnlib\n", ":1: expected 3 cells"),
    ("negative", "onnx/a.onnx,vnnlib/p.vnnlib,-3\n", ":1: timeout must be a finite number > 0"),
    ("missing", "onnx/a.onnx,vnnlib/p.vnnlib,5\n\nonnx/b.onnx,vnnlib/p.vnnlib,5\n",
     ":3: model file"),
    ("twice", "onnx/a.onnx,vnnlib/p.vnnlib,5\n./onnx/a.onnx,vnnlib/p.vnnlib,9\n",
     ":2: instance ./onnx/a.onnx,vnnlib/p.vnnlib is already listed at line 1"),
    ("empty", "\n\n", "no instances listed"),
]


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BAD_INSTANCES],
                         ids=[b[0] for b in BAD_INSTANCES])
def test_instances_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "onnx").mkdir()
    (tmp_path / "vnnlib").mkdir()
    (tmp_path / "onnx" / "a.onnx").write_bytes(b"")
    (tmp_path / "vnnlib" / "p.vnnlib").write_text("")
    (tmp_path / "instances.csv").write_text(text)
    with pytest.raises(InputError) as info:
        read_instances(tmp_path)
    assert str(tmp_path / "instances.csv") in str(info.value)
    assert message in str(info.value)
    with pytest.raises(InputError, match="benchmark folder not found"):
        read_instances(tmp_path / "nope")


def test_known_results_errors(tmp_path: Path) -> None:
    path = tmp_path / "known_results.csv"
    path.write_text("onnx,vnnlib,result\n")
    with pytest.raises(InputError, match=r"known_results.csv:1: header lacks column\(s\) "
                                         "confidence"):
        read_known_results(tmp_path)
    path.write_text("onnx,vnnlib,result,confidence\na.onnx,p.vnnlib,holds,witness\n")
    with pytest.raises(InputError, match=":2: result 'holds' is not one of"):
        read_known_results(tmp_path)
    path.write_text("onnx,vnnlib,result,confidence\na.onnx,p.vnnlib,sat,witness\n"
                    "a.onnx,p.vnnlib,unsat,consensus\n")
    with pytest.raises(InputError, match=":3: a.onnx,p.vnnlib is already given at line 2"):
        read_known_results(tmp_path)


# -- result files ------------------------------------------------------------------------------


def test_result_file_round_trip_is_exact(tmp_path: Path) -> None:
    x = np.array([0.1 + 0.2, -0.0, 1e-300, 5e-324, -1.7976931348623157e308, 1 / 3])
    y = np.array([np.nextafter(1.0, 2.0), -2.5])
    path = write_result(tmp_path / "r" / "out.txt", "sat", (x.reshape(2, 3), y))
    text = path.read_text()
    assert text.splitlines()[0] == "sat" and "(X_5 0.3333333333333333)" in text
    back = read_result(path)
    assert back.answer == "sat"
    assert back.x.tobytes() == x.tobytes() and back.y.tobytes() == y.tobytes()
    for answer in ANSWERS[1:]:
        assert read_result(write_result(path, answer)).answer == answer
        assert path.read_text() == answer + "\n"
    assert parse_result("violated\n").answer == "sat"
    assert parse_result("holds").answer == "unsat"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]  # no temporary left


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty result file"),
    ("proved\n", ":1: 'proved' is not one of"),
    ("unsat\n((X_0 1))\n", ":2: unexpected text after unsat"),
    ("sat\n((X_0 1)\n (X_2 2)\n (Y_0 3))\n", "lacks X_1"),
    ("sat\n((X_0 1)\n (Y_0 abc))\n", ":3: Y_0: 'abc' is not a number"),
    ("sat\n((X_0 1)\n (X_0 2)\n (Y_0 3))\n", ":3: X_0 given twice"),
    ("sat\n((X_0 1) junk (Y_0 3))\n", "unexpected text 'junk'"),
    ("sat\n((X_0 nan) (Y_0 3))\n", "must be finite"),
])
def test_bad_result_files(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_result(text, "res.txt")


def test_format_result_refuses_inconsistent_answers() -> None:
    with pytest.raises(InputError, match="needs a witness"):
        format_result("sat")
    with pytest.raises(InputError, match="only a sat result"):
        format_result("unsat", (np.zeros(1), np.zeros(1)))
    with pytest.raises(InputError, match="not one of"):
        format_result("holds")
    with pytest.raises(InputError, match="witness X_1 is inf"):
        format_result("sat", (np.array([0.0, np.inf]), np.zeros(1)))


# -- witness re-check --------------------------------------------------------------------------


@needs_data
def test_shipped_counterexamples_recheck_and_a_perturbed_one_fails() -> None:
    checked = 0
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
        by_stem = {i.stem: i for i in read_instances(folder)}
        for ce in sorted((folder / "counterexamples").glob("*.counterexample")):
            inst = by_stem[ce.stem]
            x, y = parse_witness(ce.read_text(), str(ce))
            res = check_witness(inst.onnx_path, inst.vnnlib_path, x, y)
            assert res.ok, f"{ce}: {res.reason}"
            assert res.margin is None or res.margin <= 0
            checked += 1
    assert checked >= 80
    inst = {i.stem: i for i in read_instances(DATA / "test")}["test_sat__test_prop"]
    x, y = parse_witness((DATA / "test" / "counterexamples" /
                          "test_sat__test_prop.counterexample").read_text())
    lo, hi = read_result_box(inst.vnnlib_path)
    outside = x.copy()
    outside[0] = np.nextafter(hi[0], np.inf)  # one ulp outside the box: tolerance 0
    res = check_witness(inst.onnx_path, inst.vnnlib_path, outside, y)
    assert not res.ok and "outside every input box" in res.reason
    safe_net = inst.folder / "onnx" / "test_unsat.onnx"  # same property, a safe network
    res = check_witness(safe_net, inst.vnnlib_path, x, y)
    assert not res.ok and "not in the unsafe set" in res.reason and res.margin > 0
    assert lo.shape == x.shape
    assert not check_witness(inst.onnx_path, inst.vnnlib_path, x[:3]).ok


def read_result_box(vnnlib: Path) -> tuple[np.ndarray, np.ndarray]:
    from rj_plugin.io.vnnlib import read_vnnlib

    return read_vnnlib(vnnlib).input_boxes[0]


# -- scoring -----------------------------------------------------------------------------------


def _write_results_csv(path: Path, rows: list[tuple[str, str, float]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        for name, result, seconds in rows:
            vnnlib = "test_prop" if name in ("test_sat", "test_unsat") else name
            writer.writerow(["test", f"onnx/{name}.onnx", f"vnnlib/{vnnlib}.vnnlib", "0.0",
                             result, seconds])


@needs_data
def test_score_arithmetic(tmp_path: Path) -> None:
    bench = _tiny_bench(tmp_path, ("test_nano", "test_tiny", "test_small", "test_sat",
                                   "test_unsat"))
    runs = tmp_path / "run"
    (runs / "test").mkdir(parents=True)
    ce = (bench / "counterexamples" / "test_sat__test_prop.counterexample").read_text()
    (runs / "test" / "test_sat__test_prop.result").write_text("sat\n" + ce)
    x, y = parse_witness(ce)
    x[0] += 1.0  # outside the box
    write_result(runs / "test" / "test_unsat__test_prop.result", "sat", (x, y))
    results = runs / "results.csv"
    # sat + valid witness: right; sat + bad witness: wrong; unsat, unasserted: 0; timeout: 0;
    # test_small missing
    _write_results_csv(results, [("test_sat", "sat", 1.0), ("test_unsat", "sat", 3.0),
                                 ("test_nano", "unsat", 2.0), ("test_tiny", "timeout", 60.0)])
    report = score_results(results, [bench])
    b = report.benchmarks[0]
    assert (b.right, b.wrong, b.unchecked, b.timeout, b.missing) == (1, 1, 1, 1, 1)
    assert b.points == POINTS_RIGHT + POINTS_WRONG == -140
    assert b.median_time == 2.5 and b.total_time == 66.0
    rows = {r.onnx: r for r in report.rows}
    assert "outside every input box" in rows["onnx/test_unsat.onnx"].witness["reason"]
    # the same bad witness not counted
    assert score_results(results, [bench], bad_witness="unknown").total_points == POINTS_RIGHT
    # unsat right, sat without any witness file wrong, unknown 0; a header line is accepted
    (runs / "test" / "test_sat__test_prop.result").unlink()
    _write_results_csv(results, [("test_unsat", "unsat", 1.0), ("test_sat", "sat", 1.0),
                                 ("test_small", "unknown", 1.0)])
    results.write_text("category,onnx,vnnlib,prepare_time,result,run_time\n"
                       + results.read_text())
    report = score_results(results, [bench])
    b = report.benchmarks[0]
    assert (b.right, b.wrong, b.unknown, b.missing, b.points) == (1, 1, 1, 2, -140)
    assert "no witness file" in {r.onnx: r for r in report.rows}["onnx/test_sat.onnx"].note + \
        {r.onnx: r for r in report.rows}["onnx/test_sat.onnx"].witness["reason"]
    # unsat on an asserted sat: wrong
    _write_results_csv(results, [("test_sat", "unsat", 1.0)])
    assert score_results(results, [bench]).total_points == POINTS_WRONG
    # rj score: table on stdout, CSV and JSON written
    code = main(["score", str(results), str(bench)])
    assert code == 0
    assert (runs / "score.csv").is_file() and (runs / "score.json").is_file()


# -- rj verify -------------------------------------------------------------------------------


def test_rj_verify_missing_file_is_a_named_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    prop = tmp_path / "p.vnnlib"
    prop.write_text("")
    out = tmp_path / "result.txt"
    code = main(["verify", "--model", str(tmp_path / "missing.onnx"), "--vnnlib", str(prop),
                 "--results", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("rj: error: --model ")
    assert "missing.onnx: model file not found" in err
    code = main(["vnncomp", str(tmp_path / "nobench"), "--output", str(tmp_path / "o")])
    assert code == 2 and "nobench: benchmark folder not found" in capsys.readouterr().err
    code = main(["score", str(tmp_path / "none.csv"), str(tmp_path)])
    assert code == 2 and "none.csv: results file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: net.onnx\n")
    code = main(["verify", "--model", str(prop), "--vnnlib", str(prop), "--config", str(bad)])
    assert code == 2 and "model.path: a per-instance key" in capsys.readouterr().err


@needs_data
def test_rj_verify_answers_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = DATA / "test"
    out, js = tmp_path / "r.txt", tmp_path / "r.json"
    args = ["verify", "--model", str(test / "onnx" / "test_sat.onnx"), "--vnnlib",
            str(test / "vnnlib" / "test_prop.vnnlib"), "--results", str(out), "--json", str(js)]
    assert main([*args, "--verifier", f"{HERE}:oracle_verifier"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("sat  ") and "stage=oracle" in line and line.count("\n") == 0
    assert read_result(out).witness is not None
    # a witness that fails the onnxruntime re-check is never written as sat
    assert main([*args, "--verifier", f"{HERE}:lying_verifier"]) == 0
    assert read_result(out).answer == "unknown"
    assert "outside every input box" in js.read_text()
    capsys.readouterr()
    assert main([*args, "--verifier", f"{HERE}:error_verifier"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "rj: error: RuntimeError: the fake verifier broke on purpose\n"
    assert read_result(out).answer == "error"


# -- rj vnncomp ------------------------------------------------------------------------------


@needs_data
def test_runner_kills_at_the_deadline(tmp_path: Path, hook_env: None) -> None:
    """One instance sleeps (the child's watchdog answers), one holds the GIL in C (only the
    parent's kill can stop it): both are timeouts within budget + grace of wall clock."""
    bench = _tiny_bench(tmp_path, ("test_nano", "test_tiny"), timeout=2.5)
    start = time.perf_counter()
    summary = run_vnncomp([bench], tmp_path / "out", timeout_scale=1.5, jobs=2,
                          verifier=f"{HERE}:slow_verifier", progress=False,
                          out=open(os.devnull, "w"))  # noqa: SIM115
    wall = time.perf_counter() - start
    budget = 2.5 * 1.5
    assert [r["result"] for r in summary.rows] == ["timeout", "timeout"]
    # the kill comes at budget + grace; allow for a loaded machine's process start and reaping
    assert all(r["run_time"] <= budget + KILL_GRACE_S + 1.5 for r in summary.rows), summary.rows
    assert wall < budget + KILL_GRACE_S + 20  # + scoring and the plot
    assert read_result(tmp_path / "out" / "test" / "test_tiny__test_tiny.result").answer \
        == "timeout"
    import json

    info = json.loads((tmp_path / "out" / "test" / "test_tiny__test_tiny.json").read_text())
    assert info["budget"] == budget
    # the GIL holder can only be stopped by the kill, unless a loaded machine started the
    # process so late that the watchdog fired before the verifier was called
    assert info["killed"] or info["stage"] == "watchdog", info


@needs_data
def test_serial_and_ray_give_the_same_answers(tmp_path: Path, hook_env: None) -> None:
    ray = pytest.importorskip("ray")
    bench = _tiny_bench(tmp_path, ("test_sat", "test_unsat"))
    quiet = open(os.devnull, "w")  # noqa: SIM115
    serial = run_vnncomp([bench], tmp_path / "serial", jobs=2, label="serial",
                         verifier=f"{HERE}:oracle_verifier", progress=False, out=quiet)
    assert [r["result"] for r in serial.rows] == ["sat", "unsat"]
    assert serial.score.total_points == 2 * POINTS_RIGHT
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        par = run_vnncomp([bench], tmp_path / "ray", executor="ray", label="ray",
                          compare=[tmp_path / "serial"], verifier=f"{HERE}:oracle_verifier",
                          progress=False, out=quiet)
    finally:
        ray.shutdown()
    assert par.answers() == serial.answers()
    for run in ("serial", "ray"):
        folder = tmp_path / run
        rows = list(csv.reader((folder / "results.csv").open()))
        assert [r[0] for r in rows] == ["test", "test"] and len(rows[0]) == 6
        assert [r[4] for r in rows] == ["sat", "unsat"]
        res = read_result(folder / "test" / "test_sat__test_prop.result")
        assert res.witness is not None
        assert (folder / "test" / "test_sat__test_prop.counterexample").is_file()
        assert (folder / "cactus.png").stat().st_size > 1000
        assert (folder / "run.json").is_file() and (folder / "score.json").is_file()
    # rj score on the runner's output agrees with the runner's own summary
    assert score_results(tmp_path / "ray" / "results.csv", [bench]).total_points == 20


@needs_data
def test_suite_overrides_reach_every_instance_process(tmp_path: Path, hook_env: None) -> None:
    """``rj vnncomp --set`` must reach each instance's own process (it once stopped at the
    suite's summary: a "LiRPA only" run still ran the Jacobian stage)."""
    bench = _tiny_bench(tmp_path, ("test_sat",))
    quiet = open(os.devnull, "w")  # noqa: SIM115
    run_vnncomp([bench], tmp_path / "out", jobs=1, verifier=f"{HERE}:options_echo_verifier",
                overrides=["solver.jacobian=false", "attack.random_points=7"], progress=False,
                out=quiet)
    record = json.loads((tmp_path / "out" / "test" / "test_sat__test_prop.json").read_text())
    seen = record["details"]["options_seen"]
    assert seen["jacobian"] is False and seen["random_points"] == 7


# -- the VNN-COMP shell scripts -----------------------------------------------------------------


def test_scripts_are_executable_bash() -> None:
    for name in ("install_tool.sh", "prepare_instance.sh", "run_instance.sh"):
        path = SCRIPTS / name
        assert os.access(path, os.X_OK), name
        assert path.read_text().startswith("#!/usr/bin/env bash\n")
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    bad = subprocess.run([str(SCRIPTS / "install_tool.sh"), "v2"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "usage: install_tool.sh v1" in bad.stderr


@needs_data
def test_run_instance_writes_a_valid_first_line(tmp_path: Path, hook_env: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    test = DATA / "test"
    onnx, prop = test / "onnx" / "test_sat.onnx", test / "vnnlib" / "test_prop.vnnlib"
    prep = subprocess.run([str(SCRIPTS / "prepare_instance.sh"), "v1", "test", str(onnx),
                           str(prop)], capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    prep = subprocess.run([str(SCRIPTS / "prepare_instance.sh"), "v1", "test", "nope.onnx",
                           str(prop)], capture_output=True, text=True)
    assert prep.returncode == 1 and "file not found: nope.onnx" in prep.stderr
    out = tmp_path / "out.txt"
    monkeypatch.setenv("RJ_VERIFIER", f"{HERE}:oracle_verifier")
    run = subprocess.run([str(SCRIPTS / "run_instance.sh"), "v1", "test", str(onnx), str(prop),
                          str(out), "30"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_text().splitlines()[0] == "sat" and read_result(out).witness is not None
    monkeypatch.setenv("RJ_VERIFIER", f"{HERE}:slow_verifier")
    start = time.perf_counter()
    run = subprocess.run([str(SCRIPTS / "run_instance.sh"), "v1", "test", str(onnx), str(prop),
                          str(out), "3"], capture_output=True, text=True)
    assert time.perf_counter() - start < 3 + 1.5
    assert run.returncode == 0 and out.read_text() == "timeout\n"


# -- per-benchmark configurations --------------------------------------------------------------


def test_shipped_vnncomp_configs_load_and_map_onto_options() -> None:
    names = {p.stem for p in (REPO / "configs" / "vnncomp").glob("*.yaml")}
    assert {"acasxu", "mnist_fc", "eran", "test", "tllverifybench",
            "reach_prob_density"} <= names
    for name in names:
        cfg = load_vnncomp_config(REPO / "configs" / "vnncomp" / f"{name}.yaml")
        options = cfg.verify_options()
        assert set(options) == set(VERIFY_OPTION_KEYS)
        assert isinstance(options["lirpa_methods"], tuple)
    cfg = load_vnncomp_config(REPO / "configs" / "vnncomp" / "mnist_fc.yaml",
                              ["bab.enabled=true", "attack.pgd_steps=7"])
    assert cfg.verify_options()["bab"] is True and cfg.verify_options()["pgd_steps"] == 7


@pytest.mark.parametrize(("raw", "message"), [
    ({"model": {"path": "net.onnx"}}, "model.path: a per-instance key"),
    ({"specification": {"vnnlib": "p.vnnlib"}}, "specification.vnnlib: a per-instance key"),
    ({"general": {"timeout": 5}}, "general.timeout: a per-instance key"),
    ({"attack": {"pgd_step": 5}}, "attack.pgd_step: unknown key"),
    ({"solver": {"lirpa_methods": ["crown", "zonotope"]}}, "solver.lirpa_methods: item 1"),
    ({"bab": {"batch": 0}}, "bab.batch: must be >= 1"),
    ({"task": {"name": "jacobian"}}, "task: unknown section"),
])
def test_vnncomp_config_errors_name_the_key(tmp_path: Path, raw: dict, message: str) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_vnncomp_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_configs_readme_documents_every_vnncomp_key() -> None:
    text = (REPO / "configs" / "README.md").read_text()
    part = text[text.index("## Verifier configurations"):]
    for section, keys in VNNCOMP_SCHEMA.items():
        assert f"`{section}`" in part
        for key in keys:
            assert f"| `{key}` |" in part, f"{section}.{key} not documented"


# -- the real verifier core (when it exists) ---------------------------------------------------

try:
    from rj_plugin.verify import pipeline as _pipeline
except ImportError:  # the core is built in parallel
    _pipeline = None
needs_core = pytest.mark.skipif(_pipeline is None or not DATA.is_dir(),
                                reason="rj_plugin.verify.pipeline not available yet, or "
                                       "../shared missing")


@needs_core
def test_config_defaults_equal_verify_options_defaults() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(_pipeline.VerifyOptions)
                if f.default is not dataclasses.MISSING}
    ours = load_vnncomp_config().verify_options()
    assert set(ours) <= {f.name for f in dataclasses.fields(_pipeline.VerifyOptions)}
    differ = {k: (v, defaults[k]) for k, v in ours.items() if k in defaults and
              defaults[k] != v and not (isinstance(v, tuple) and tuple(defaults[k]) == v)}
    assert not differ, f"config default vs VerifyOptions default: {differ}"


@needs_core
def test_real_verifier_on_the_test_benchmark(tmp_path: Path) -> None:
    bench = _tiny_bench(tmp_path, ("test_sat", "test_unsat"), timeout=60)
    summary = run_vnncomp([bench], tmp_path / "out", jobs=2, progress=False,
                          out=open(os.devnull, "w"))  # noqa: SIM115
    answers = {r["onnx"]: r["result"] for r in summary.rows}
    assert answers == {"onnx/test_sat.onnx": "sat", "onnx/test_unsat.onnx": "unsat"}, \
        summary.rows
    assert summary.score.total_points == 2 * POINTS_RIGHT  # the sat witness re-checks
    assert all(0 < r["run_time"] < 60 for r in summary.rows)
