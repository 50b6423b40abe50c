"""The ``rj jacobian`` command line: a good run, and every kind of bad input.

Most runs go through :func:`rj_plugin.cli.main` in-process (fast); two go through a real
subprocess (``python -m rj_plugin.cli``) to check the exit status the shell sees.  A bad input must
give a non-zero exit status, exactly one ``rj: error: ...`` line on stderr naming the problem and
the offending value, and no output file.  (Option values that argparse rejects itself exit with
status 2 and argparse's own message.)  The same mistakes made through the Python API raise the
matching :mod:`rj_plugin.errors` classes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rj_plugin import bound_jacobian
from rj_plugin.api import JacobianBounder
from rj_plugin.cli import main
from rj_plugin.errors import InputError, ModelLoadError, RJError, UnsupportedLayerError
from rj_plugin.models import load_model
from tests import oracle

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
ACAS = SHARED / "data" / "vnncomp" / "acasxu"
EPS = 0.01


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files shared by the tests (written once)."""
    root = tmp_path_factory.mktemp("cli_inputs")
    center = np.linspace(0.1, 0.9, 64)
    out = {"center": root / "center.npy", "center10": root / "center10.npy",
           "center_nan": root / "center_nan.npy", "lower": root / "lower.npy",
           "upper": root / "upper.npy", "corrupt": root / "corrupt.onnx",
           "gelu": root / "gelu.pt", "maxpool": root / "maxpool.pt",
           "vnnlib3": root / "three_inputs.vnnlib"}
    np.save(out["center"], center)
    np.save(out["center10"], np.zeros(10))
    bad = center.copy()
    bad[3] = np.nan
    np.save(out["center_nan"], bad)
    lower, upper = center - 0.05, center + 0.05
    lower[5] = upper[5] + 0.5
    np.save(out["lower"], lower)
    np.save(out["upper"], upper)
    out["corrupt"].write_bytes(b"\x00\x17 this is not a protobuf \xff\xfe" * 20)
    gelu = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2))
    gelu.rj_input_shape = (4,)
    torch.save(gelu, out["gelu"])
    pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    pool.rj_input_shape = (1, 4, 4)
    torch.save(pool, out["maxpool"])
    lines = [f"(declare-const X_{i} Real)" for i in range(3)] + ["(declare-const Y_0 Real)"]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))" for i in range(3)]
    lines += ["(assert (<= Y_0 0.0))"]
    out["vnnlib3"].write_text("\n".join(lines) + "\n")
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse exits are caught."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error(code: int, err: str, *needles: str) -> str:
    """A non-zero exit and exactly one ``rj: error:`` line containing every needle."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("rj: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _assert_error(code: int, err: str, out_file: Path, *needles: str) -> None:
    _assert_one_error(code, err, *needles)
    assert not out_file.exists()


# ----------------------------------------------------------------------------------------------
# a good run


def test_good_run_in_process(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.json"
    code, stdout, err = _run(["jacobian", "--model", "digits-relu", "--center",
                              str(files["center"]), "--eps", str(EPS), "--output", str(out)],
                             capsys)
    assert code == 0, err
    assert "Lipschitz" in stdout and str(out) in stdout
    result = json.loads(out.read_text())
    region = result["region"]
    assert region["kind"] == "ball" and region["norm"] == "inf" and region["eps"] == EPS
    assert np.allclose(np.asarray(region["center"]).reshape(64), np.load(files["center"]))
    assert result["input_shape"] == [64]
    lower, upper = np.asarray(result["lower"]), np.asarray(result["upper"])
    assert lower.shape == upper.shape == (1, 10, 64)
    assert (lower <= upper).all()
    lip = result["lipschitz"]
    assert lip["dual_norm"] == "1"
    assert np.asarray(lip["per_row"]).shape == (1, 10)
    assert np.isfinite(lip["per_row"]).all() and (np.asarray(lip["per_row"]) > 0).all()
    opts = result["options"]
    assert opts["preact"] == "crown" and opts["method"] == "recurjac"
    assert opts["eps"] == EPS and opts["norm"] == "inf" and opts["dtype"] == "float64"
    assert {"build_s", "preact_s", "jacobian_s"} <= set(result["timings"])
    assert all(v >= 0 for v in result["timings"].values())
    versions = result["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["auto_LiRPA"] and versions["numpy"] and versions["python"]
    # the bounds in the file contain true Jacobians of the demo model in the ball
    model = load_model("digits-relu")
    x0 = torch.as_tensor(np.load(files["center"]))
    pts = oracle.region_points(model, x0, EPS, math.inf, 1000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        jac = oracle.jacobians(model, pts).numpy()
    assert (jac >= lower[0] - 1e-9).all() and (jac <= upper[0] + 1e-9).all()
    assert (np.abs(jac).sum(-1) <= np.asarray(lip["per_row"])[0] * (1 + 1e-9)).all()
    # and agree with the Python API
    jb = bound_jacobian("digits-relu", x0, EPS)
    assert np.allclose(jb.lower.numpy(), lower, rtol=0, atol=1e-12)
    assert np.allclose(jb.upper.numpy(), upper, rtol=0, atol=1e-12)


def _subprocess(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rj_plugin.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_exit_status_in_a_real_process(files: dict, tmp_path: Path) -> None:
    """A good run exits 0 and writes the file; a bad one exits non-zero, writes nothing, and
    prints one ``rj: error:`` line (no traceback)."""
    out = tmp_path / "good.json"
    good = _subprocess(["jacobian", "--model", "digits-relu", "--center", str(files["center"]),
                        "--eps", str(EPS), "--output", str(out)])
    assert good.returncode == 0, good.stderr
    assert json.loads(out.read_text())["rows"] == 10
    bad_out = tmp_path / "bad.json"
    bad = _subprocess(["jacobian", "--model", "digits-relu", "--center", str(files["center"]),
                       "--eps", "-0.5", "--output", str(bad_out)])
    assert bad.returncode != 0
    _assert_error(bad.returncode, bad.stderr, bad_out, "eps", "-0.5")


# ----------------------------------------------------------------------------------------------
# bad inputs, in-process


def _bad_cases(files: dict) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (argv after --model/--output, substrings the error line must contain)."""
    c = str(files["center"])
    return {
        "missing model": (["--model", "/nonexistent/net.onnx", "--center", c, "--eps", "0.1"],
                          ("/nonexistent/net.onnx", "no such file")),
        "corrupt onnx": (["--model", str(files["corrupt"]), "--center", c, "--eps", "0.1"],
                         (str(files["corrupt"]), "ONNX")),
        "unknown demo": (["--model", "digits-nope", "--center", c, "--eps", "0.1"],
                         ("digits-nope",)),
        "center shape": (["--model", "digits-relu", "--center", str(files["center10"]),
                          "--eps", "0.1"], ("(10,)", "(64,)")),
        "eps negative": (["--model", "digits-relu", "--center", c, "--eps", "-0.5"],
                         ("eps", "-0.5")),
        "eps nan": (["--model", "digits-relu", "--center", c, "--eps", "nan"], ("eps", "nan")),
        "center nan": (["--model", "digits-relu", "--center", str(files["center_nan"]),
                        "--eps", "0.1"], ("NaN", "[0, 3]")),
        "vnnlib inputs": (["--model", "digits-relu", "--vnnlib", str(files["vnnlib3"])],
                          ("3 inputs", "64")),
        "box lower > upper": (["--model", "digits-relu", "--lower", str(files["lower"]),
                               "--upper", str(files["upper"])], ("lower > upper", "[0, 5]")),
    }


BAD = ["missing model", "corrupt onnx", "unknown demo", "center shape", "eps negative",
       "eps nan", "center nan", "vnnlib inputs", "box lower > upper"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case: str, files: dict, tmp_path: Path,
                   capsys: pytest.CaptureFixture) -> None:
    argv, needles = _bad_cases(files)[case]
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", *argv, "--output", str(out)], capsys)
    _assert_error(code, err, out, *needles)


@pytest.mark.parametrize(("flag", "value"), [("--norm", "3"), ("--method", "newton"),
                                             ("--preact", "magic")])
def test_bad_choice_rejected_by_argparse(flag: str, value: str, files: dict, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", "digits-relu", "--center",
                         str(files["center"]), "--eps", "0.1", flag, value, "--output",
                         str(out)], capsys)
    assert code == 2
    assert flag in err and repr(value) in err
    assert not out.exists()


@pytest.mark.parametrize(("model", "op"), [("maxpool", "MaxPool"), ("gelu", "Erf")])
def test_unsupported_layer(model: str, op: str, files: dict, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    """A pickled whole module with an unsupported layer: the message names the node and the op
    (GELU reaches auto_LiRPA as ONNX Erf, MaxPool as MaxPool)."""
    shape = (1, 4, 4) if model == "maxpool" else (4,)
    center = tmp_path / "c.npy"
    np.save(center, np.full(shape, 0.5))
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", str(files[model]), "--center", str(center),
                         "--eps", "0.1", "--output", str(out)], capsys)
    _assert_error(code, err, out, op, "node")


# ----------------------------------------------------------------------------------------------
# the same mistakes through the Python API


def test_python_api_raises_rj_errors(files: dict) -> None:
    x0 = np.load(files["center"])
    with pytest.raises(ModelLoadError, match="no such file"):
        bound_jacobian("/nonexistent/net.onnx", x0, 0.1)
    with pytest.raises(ModelLoadError, match="ONNX"):
        bound_jacobian(str(files["corrupt"]), x0, 0.1)
    with pytest.raises(ModelLoadError, match="digits-nope"):
        JacobianBounder("digits-nope")
    bounder = JacobianBounder("digits-relu")
    with pytest.raises(InputError, match=r"\(10,\)"):
        bounder.region(np.zeros(10), 0.1)
    with pytest.raises(InputError, match="-0.5"):
        bounder.region(x0, -0.5)
    with pytest.raises(InputError, match="nan"):
        bounder.region(x0, float("nan"))
    bad = x0.copy()
    bad[3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        bounder.region(bad, 0.1)
    with pytest.raises(InputError, match="3"):
        bounder.region(x0, 0.1, norm=3)
    with pytest.raises(InputError, match="newton"):
        bounder.bound(bounder.region(x0, 0.1), method="newton")
    with pytest.raises(InputError, match="magic"):
        bounder.bound(bounder.region(x0, 0.1), preact="magic")
    with pytest.raises(InputError, match="lower > upper"):
        bounder.region(lower=np.load(files["lower"]), upper=np.load(files["upper"]))
    with pytest.raises(InputError, match="64"):
        bound_jacobian("digits-relu", np.zeros((1, 10)), 0.1)
    assert issubclass(InputError, RJError) and issubclass(UnsupportedLayerError, RJError)


@pytest.mark.parametrize("model", ["maxpool", "gelu"])
def test_python_api_unsupported_layer(model: str, files: dict) -> None:
    shape = (1, 4, 4) if model == "maxpool" else (4,)
    with pytest.raises(UnsupportedLayerError):
        bound_jacobian(str(files[model]), np.full((1, *shape), 0.5), 0.1)


# ----------------------------------------------------------------------------------------------
# a VNN-LIB box


@pytest.mark.skipif(not ACAS.is_dir(), reason=f"VNN-COMP data not found at {ACAS}")
def test_vnnlib_run_acasxu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net = ACAS / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"
    prop = ACAS / "vnnlib" / "prop_3.vnnlib"
    out = tmp_path / "acas.json"
    code, _, err = _run(["jacobian", "--model", str(net), "--vnnlib", str(prop),
                         "--output", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["region"]["kind"] == "box"
    lower, upper = np.asarray(result["lower"]), np.asarray(result["upper"])
    assert lower.shape == (1, 5, 1, 1, 5)
    box_lo = torch.as_tensor(result["region"]["lower"][0])
    box_hi = torch.as_tensor(result["region"]["upper"][0])
    assert (box_lo <= box_hi).all() and (box_lo < box_hi).any()
    model = load_model(net)
    gen = torch.Generator().manual_seed(0)
    pts = torch.cat([oracle.box_vertices(box_lo, box_hi, gen),
                     oracle.box_points(box_lo, box_hi, 500, gen)])
    with torch.no_grad():
        jac = oracle.jacobians(model, pts).numpy()
    assert (jac >= lower[0] - 1e-9).all() and (jac <= upper[0] + 1e-9).all()


class _Standardise(nn.Module):
    """``(x - 0.4) / 0.3``: an op on the raw input that is not Linear (issue 7)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.4) / 0.3


@pytest.mark.parametrize("norm", ["2", "1"])
def test_lp_ball_on_a_normalised_model_from_the_command_line(norm: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture
                                                              ) -> None:
    """`rj jacobian --norm 2` on a model that normalises its input once bounded the single point
    x0 (widths ~1e-15 whatever eps); the file's bounds must contain sampled Jacobians."""
    torch.manual_seed(5)
    net = nn.Sequential(_Standardise(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net.rj_input_shape = (5,)
    torch.save(net, tmp_path / "norm.pt")
    center = np.linspace(0.2, 0.6, 5)
    np.save(tmp_path / "c.npy", center)
    out = tmp_path / "out.json"
    code, _, err = _run(["jacobian", "--model", str(tmp_path / "norm.pt"), "--center",
                         str(tmp_path / "c.npy"), "--eps", "0.4", "--norm", norm,
                         "--output", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    lower, upper = np.asarray(result["lower"])[0], np.asarray(result["upper"])[0]
    assert (upper - lower).mean() > 1e-3
    p = float(norm)
    pts = oracle.region_points(net, torch.as_tensor(center), 0.4, p, 1000,
                               torch.Generator().manual_seed(0),
                               [(0, 0, 1.0), (0, 0, -1.0), (2, None, 1.0)])
    with torch.no_grad():
        jac = oracle.jacobians(net, pts).numpy()
    assert (jac >= lower).all() and (jac <= upper).all()
