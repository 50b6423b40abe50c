"""Bad input reported as configuration/input errors before anything is computed (issue #7,
items 10-14): devices, output paths, alpha-CROWN settings, ``--input-shape``, file modes and
reruns into one results folder, target indices and duplicate YAML keys.

Every CLI error must be one ``rj: error: ...`` line naming the option and the value, a non-zero
exit status, and no result file; the checks that need no model must run before the model is
even loaded (the tests replace the loaders by functions that fail the test when called).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from rj_plugin import models
from rj_plugin.api import JacobianBounder
from rj_plugin.config import load_config
from rj_plugin.errors import ConfigError, InputError
from rj_plugin.io.results import atomic_write_json, atomic_write_text
from rj_plugin.tasks import runner
from tests.test_cli import _assert_one_error, _run


def _no_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded although the options are invalid")


@pytest.fixture
def center(tmp_path: Path) -> Path:
    """A center for the 64-input digits model."""
    path = tmp_path / "center.npy"
    np.save(path, np.linspace(0.1, 0.9, 64))
    return path


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test (the option checks must come first)."""
    monkeypatch.setattr(models, "load_model", _no_load)


@pytest.fixture
def shapeless_pt(tmp_path: Path) -> Path:
    """A pickled 5-3-2 ReLU net that records no input shape."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    path = tmp_path / "shapeless.pt"
    torch.save(net, path)
    return path


@pytest.fixture
def umask_022() -> Iterator[int]:
    """Run with umask 022 (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_yaml(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------
# 10: devices and output paths


@pytest.mark.parametrize(("device", "needles"), [
    ("foo", ("--device", "'foo'", "not a torch device")),
    ("cpu,", ("--device", "'cpu,'")),
    ("cuda", ("--device", "'cuda'", "CUDA is not available")),
    ("cuda:1", ("--device", "'cuda:1'", "CUDA is not available")),
    ("meta", ("--device", "'meta'")),
])
def test_cli_bad_device(device: str, needles: tuple[str, ...], center: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, no_model_load: None,
                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--center", str(center),
                         "--eps", "0.01", "--device", device, "--output", str(out)], capsys)
    _assert_one_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize(("device", "fragment"), [("foo", "not a torch device"),
                                                  ("cuda", "CUDA is not available"),
                                                  ("cuda:0", "CUDA is not available")])
def test_config_bad_device(device: str, fragment: str, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _write_yaml(tmp_path, {"general": {"device": device}, "model": {"name": "digits-relu"},
                                  "task": {"name": "jacobian"}}, "dev.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "dev.yaml" in msg and "general.device" in msg and fragment in msg, msg


def test_config_cuda_index_beyond_the_devices(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = _write_yaml(tmp_path, {"general": {"device": "cuda:3"},
                                  "model": {"name": "digits-relu"}, "task": {"name": "jacobian"}})
    with pytest.raises(ConfigError, match=r"general\.device.*no CUDA device 3"):
        load_config(path)


def test_cli_output_is_a_folder(center: Path, tmp_path: Path, no_model_load: None,
                                capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "existing"
    folder.mkdir()
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--center", str(center),
                         "--eps", "0.01", "--output", str(folder)], capsys)
    _assert_one_error(code, err, "--output", str(folder), "is a folder")
    assert list(folder.iterdir()) == []


def test_cli_output_under_a_file(center: Path, tmp_path: Path, no_model_load: None,
                                 capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "plain.txt"
    blocker.write_text("user data\n")
    out = blocker / "out.json"
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--center", str(center),
                         "--eps", "0.01", "--output", str(out)], capsys)
    _assert_one_error(code, err, "--output", str(blocker), "is a file")
    assert blocker.read_text() == "user data\n"


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_results_dir_is_a_file_fails_before_computing(under: bool, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "results_file"
    blocker.write_text("not a folder\n")
    target = blocker / "sub" if under else blocker

    def no_context(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started although its results folder is unusable")

    monkeypatch.setattr(runner, "RunContext", no_context)
    path = _write_yaml(tmp_path, {"general": {"results_dir": str(target)},
                                  "model": {"name": "digits-relu"}, "task": {"name": "jacobian"}},
                       "resdir.yaml")
    code, _, err = _run(["run", str(path)], capsys)
    line = _assert_one_error(code, err, "resdir.yaml", "general.results_dir", str(blocker))
    assert "is a file" in line or "is not a folder" in line, line
    assert blocker.read_text() == "not a folder\n"


# ----------------------------------------------------------------------------------------------
# 11: alpha-CROWN settings


@pytest.mark.parametrize(("flag", "value"), [
    ("--alpha-iterations", "0"), ("--alpha-iterations", "-3"),
    ("--alpha-lr", "nan"), ("--alpha-lr", "inf"), ("--alpha-lr", "0"), ("--alpha-lr", "-0.1"),
])
def test_cli_bad_alpha_settings(flag: str, value: str, center: Path, tmp_path: Path,
                                no_model_load: None, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--center", str(center),
                         "--eps", "0.01", "--preact", "alpha-crown", flag, value,
                         "--output", str(out)], capsys)
    _assert_one_error(code, err, flag, value)
    assert not out.exists()


@pytest.mark.parametrize(("key", "value"), [
    ("alpha_iterations", 0), ("alpha_iterations", -1), ("alpha_iterations", 2.5),
    ("alpha_lr", float("nan")), ("alpha_lr", float("inf")), ("alpha_lr", 0), ("alpha_lr", -1),
])
def test_config_bad_alpha_settings(key: str, value: float, tmp_path: Path) -> None:
    path = _write_yaml(tmp_path, {"model": {"name": "digits-relu"},
                                  "bounds": {"method": "alpha-crown", key: value},
                                  "task": {"name": "jacobian"}})
    with pytest.raises(ConfigError, match=f"bounds.{key}"):
        load_config(path)


def test_api_bad_alpha_settings() -> None:
    bounder = JacobianBounder(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
                              input_shape=(3,))
    region = bounder.region(np.zeros(3), 0.1)
    for bad in (0, -2, 2.5, True, "5", None):
        with pytest.raises(InputError, match="alpha_iterations"):
            bounder.bound(region, preact="alpha-crown", alpha_iterations=bad)
    for bad in (math.nan, math.inf, 0.0, -0.1, "fast", None, False):
        with pytest.raises(InputError, match="alpha_lr"):
            bounder.bound(region, preact="alpha-crown", alpha_lr=bad)
    # the valid extremes still run
    jb = bounder.bound(region, preact="alpha-crown", alpha_iterations=np.int64(1), alpha_lr=1e-3)
    assert (jb.lower <= jb.upper).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_api_bounder_refuses_weights_changed_after_it_was_built(dtype: torch.dtype) -> None:
    """A bounder's linear maps are taken at build time: after an in-place weight change it
    refuses to bound (the old network's bounds would be reported for the new one), whether it
    holds the caller's module (float32 = the bounder's dtype) or a converted copy (float64)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    bounder = JacobianBounder(net, input_shape=(3,), dtype=dtype)
    region = bounder.region(np.zeros(3), 0.1)
    assert bounder.is_current()
    bounder.bound(region)
    built = net[0].weight[0, 0].item()
    with torch.no_grad():
        net[0].weight[0, 0] += 1.0
    assert not bounder.is_current()
    with pytest.raises(InputError, match="changed .*build a new JacobianBounder"):
        bounder.bound(region)
    with torch.no_grad():
        net[0].weight[0, 0] = built  # back to the values it was built from
    assert bounder.is_current()
    bounder.bound(region)


# ----------------------------------------------------------------------------------------------
# 12: --input-shape / model.input_shape


def test_cli_shapeless_model_names_the_option(shapeless_pt: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    center = tmp_path / "c5.npy"
    np.save(center, np.full(5, 0.5))
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", str(shapeless_pt), "--center", str(center),
                         "--eps", "0.1", "--output", str(out)], capsys)
    _assert_one_error(code, err, str(shapeless_pt), "--input-shape")
    assert not out.exists()
    code, stdout, err = _run(["jacobian", "--model", str(shapeless_pt), "--input-shape", "5",
                              "--center", str(center), "--eps", "0.1", "--output", str(out)],
                             capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["input_shape"] == [5]
    assert np.asarray(result["lower"]).shape == (1, 2, 5)


@pytest.mark.parametrize(("value", "needles"), [
    ("8,8", ("--input-shape", "[64]", "[8, 8]")),   # the model records (64,)
    ("0,3", ("--input-shape", "'0,3'")),
    ("a,b", ("--input-shape", "'a,b'")),
    ("", ("--input-shape",)),
])
def test_cli_bad_input_shape(value: str, needles: tuple[str, ...], center: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--input-shape", value,
                         "--center", str(center), "--eps", "0.01", "--output", str(out)], capsys)
    _assert_one_error(code, err, *needles)
    assert not out.exists()


def test_config_model_input_shape(shapeless_pt: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    raw = {"general": {"results_dir": str(tmp_path / "res"), "plots": False,
                       "progress": False},
           "model": {"path": str(shapeless_pt)},
           "data": {"source": "random", "num_points": 1},
           "bounds": {"method": "ibp"},
           "task": {"name": "jacobian"}}
    path = _write_yaml(tmp_path, raw, "shape.yaml")
    with pytest.raises(ConfigError, match=r"shape\.yaml.*model\.input_shape"):
        runner.run(load_config(path))
    assert not (tmp_path / "res").exists()
    code, _ = runner.run(load_config(path, ["model.input_shape=[5]"]))
    assert code == 0
    doc = json.loads((tmp_path / "res" / "results.json").read_text())
    assert doc["model"]["input_shape"] == [5] and doc["failed"] == 0


# ----------------------------------------------------------------------------------------------
# 13: file modes, and reruns into one results folder


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_atomic_write_respects_the_umask(mask: int, tmp_path: Path) -> None:
    old = os.umask(mask)
    try:
        text_file = atomic_write_text(tmp_path / "a.txt", "x")
        json_file = atomic_write_json(tmp_path / "b.json", {"v": 1})
    finally:
        os.umask(old)
    assert _mode(text_file) == 0o666 & ~mask
    assert _mode(json_file) == 0o666 & ~mask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path,
                                                            umask_022: int) -> None:
    target = tmp_path / "kept.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    atomic_write_json(target, {"v": 2})
    assert _mode(target) == 0o640 and json.loads(target.read_text()) == {"v": 2}


def _lipschitz_config(tmp_path: Path, results: Path, plot_inputs: int) -> Path:
    """A quick lipschitz run on 2 random points of a tiny net (one plot per input)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    net.rj_input_shape = (3,)
    torch.save(net, tmp_path / "tiny.pt")
    raw = {"general": {"results_dir": str(results), "progress": False},
           "model": {"path": str(tmp_path / "tiny.pt")},
           "data": {"source": "random", "num_points": 2},
           "bounds": {"method": "ibp"},
           "task": {"name": "lipschitz", "margins": False, "log_steps": 2,
                    "global_reference": False, "plot_inputs": plot_inputs}}
    return _write_yaml(tmp_path, raw, f"lip{plot_inputs}.yaml")


def test_rerun_replaces_the_previous_outputs(tmp_path: Path, umask_022: int,
                                             capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "res"
    code, _ = runner.run(load_config(_lipschitz_config(tmp_path, results, 2)))
    assert code == 0
    first = json.loads((results / "results.json").read_text())
    assert first["files"] == ["lipschitz_curve_0.png", "lipschitz_curve_1.png"]
    for name in ["results.json", "results.csv", "config.yaml", *first["files"]]:
        assert _mode(results / name) == 0o644, name
    # files the tool did not write are never touched, even with a name like its own
    (results / "notes.txt").write_text("mine\n")
    (results / "lipschitz_curve_7.png").write_bytes(b"mine")
    code, _ = runner.run(load_config(_lipschitz_config(tmp_path, results, 1)))
    assert code == 0
    second = json.loads((results / "results.json").read_text())
    assert second["files"] == ["lipschitz_curve_0.png"]
    on_disk = sorted(p.name for p in results.iterdir())
    assert on_disk == ["config.yaml", "lipschitz_curve_0.png", "lipschitz_curve_7.png",
                       "notes.txt", "results.csv", "results.json"]
    assert "lipschitz_curve_1.png" in capsys.readouterr().out  # reported as removed


# ----------------------------------------------------------------------------------------------
# 14: target out of range, duplicate YAML keys


def test_target_out_of_range_is_a_config_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_input(*args: object, **kwargs: object) -> None:
        raise AssertionError("an input was processed although the target is out of range")

    monkeypatch.setattr(runner, "_run_one", no_input)
    raw = {"general": {"results_dir": str(tmp_path / "res"), "progress": False},
           "model": {"name": "digits-relu"}, "data": {"end": 1},
           "specification": {"output": "margins", "target": 10},
           "task": {"name": "jacobian"}}
    path = _write_yaml(tmp_path, raw, "target.yaml")
    with pytest.raises(ConfigError) as info:
        runner.run(load_config(path))
    msg = str(info.value)
    assert "target.yaml" in msg and "specification.target" in msg and "10 outputs" in msg, msg
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(("text", "needles"), [
    ("model:\n  name: digits-relu\ntask:\n  name: jacobian\ntask:\n  name: lipschitz\n",
     ("task", "line 3", "line 5")),
    ("general:\n  seed: 1\n  seed: 2\nmodel:\n  name: digits-relu\ntask:\n  name: jacobian\n",
     ("general.seed", "line 2", "line 3")),
    ("model: {name: digits-relu, name: digits-tanh}\ntask: {name: jacobian}\n",
     ("model.name", "line 1")),
])
def test_duplicate_yaml_keys(text: str, needles: tuple[str, ...], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "dup.yaml" in msg and "twice" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    code, _, err = _run(["run", str(path)], capsys)
    assert code == 2
    _assert_one_error(code, err, "dup.yaml", needles[0])


def test_duplicate_key_in_an_override(tmp_path: Path) -> None:
    path = _write_yaml(tmp_path, {"model": {"name": "digits-relu"}, "task": {"name": "jacobian"}})
    with pytest.raises(ConfigError, match="twice"):
        load_config(path, ["model.mean={a: 1, a: 2}"])


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    """``<<`` merges are not duplicates: an explicit key may override a merged one."""
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  <<: {name: digits-tanh}\n  name: digits-relu\n"
                    "task: {name: jacobian}\n")
    assert load_config(path)["model"]["name"] == "digits-relu"
