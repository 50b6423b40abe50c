"""The verifier's core (rj_plugin.verify): sound stages, re-checked witnesses, deadlines, errors.

* The Jacobian stage's mean-value lower bound and its monotone collapse are checked on random
  small ReLU / tanh nets against sampled points, all box vertices included.
* Witnesses are re-checked with onnxruntime here too.
* On real VNN-COMP instances (../shared/data/vnncomp, skipped when absent): the `test` folder's
  5 instances get their known answers; ACAS Xu rows with a `witness` label never get unsat (and a
  sat comes with a valid witness); `consensus` unsat rows never get sat.  The ACAS Xu rows are
  the fastest few measured (each decided in a few seconds; 20 s budget).
* The deadline is honoured in wall-clock time (a tiny budget, and a deliberately slow PGD);
  missing files and variable counts that do not match the network give `error` + reason.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rj_plugin.io.vnnlib import read_vnnlib
from rj_plugin.verify import VerifyOptions, verify_instance
from rj_plugin.verify.network import Network
from rj_plugin.verify.prove import SpecBounder, collapse

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vnncomp"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"VNN-COMP data not found at {DATA} (../shared missing)")
ACAS = DATA / "acasxu"


def _net(act: type[nn.Module], n: int, m: int, seed: int) -> Network:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, 12), act(), nn.Linear(12, 10), act(),
                          nn.Linear(10, m)).double().eval()
    return Network(model, (n,), n, m, checker=None, rewritten=False, max_gap=0.0)


def _box_points(lo: torch.Tensor, hi: torch.Tensor, n_random: int, gen: torch.Generator
                ) -> torch.Tensor:
    """All vertices and random points of one box ``[n]`` -> ``[2^n + n_random, n]``."""
    n = lo.numel()
    corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=lo.dtype)
    u = torch.cat([corners, torch.rand(n_random, n, dtype=lo.dtype, generator=gen)])
    return lo + u * (hi - lo)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_mean_value_bound_and_collapse_are_sound(act: type[nn.Module], k: int) -> None:
    n, m, B = 4, 3, 8
    net = _net(act, n, m, seed=3)
    bounder = SpecBounder(net)
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(B, n, generator=gen, dtype=torch.float64)
    radius = torch.rand(B, n, generator=gen, dtype=torch.float64) * torch.tensor(
        [0.001, 0.01, 0.5, 1.0], dtype=torch.float64)  # narrow boxes: some inputs monotone
    lo, hi = centre - radius, centre + radius
    C = torch.randn(k, m, generator=gen, dtype=torch.float64)
    d = torch.randn(k, generator=gen, dtype=torch.float64)
    step = bounder.jacobian(lo, hi, C, d)
    new_lo, new_hi, _ = collapse(lo, hi, step.jac_lo, step.jac_hi)
    collapsed_any = False
    for b in range(B):
        pts = _box_points(lo[b], hi[b], 3000, gen)
        with torch.no_grad():
            g = net(pts) @ C.T - d                        # [N, k]
        true_min = g.min(dim=0).values
        assert (step.lower[b] <= true_min + 1e-12).all(), (b, step.lower[b], true_min)
        # collapse: every row is monotone in each fixed input, so moving that input of any
        # point onto the kept face never increases any row
        fixed = (new_hi[b] - new_lo[b] < hi[b] - lo[b])
        if fixed.any():
            collapsed_any = True
            face = torch.where(fixed, torch.where(new_hi[b] == lo[b], lo[b], hi[b]), pts)
            with torch.no_grad():
                g_face = net(face) @ C.T - d
            assert (g_face <= g + 1e-12 * (1 + g.abs())).all()
        # the per-row expansion point: the collapsed rows really are monotone
        signs_ok = (step.jac_lo[b] <= step.jac_hi[b]).all()
        assert signs_ok
    assert collapsed_any or k > 1  # a single row is monotone in a very narrow input


def test_mean_value_bound_at_a_point_box_is_the_value() -> None:
    net = _net(nn.ReLU, 3, 2, seed=1)
    bounder = SpecBounder(net)
    x = torch.tensor([[0.3, -0.2, 0.7]], dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    d = torch.tensor([0.25], dtype=torch.float64)
    step = bounder.jacobian(x, x, C, d)
    with torch.no_grad():
        g = net(x) @ C.T - d
    assert (step.lower <= g).all() and (step.lower >= g - 1e-8).all()


def _check_witness(onnx: Path, vnnlib: Path, witness: tuple[np.ndarray, np.ndarray]) -> None:
    import onnxruntime as ort

    spec = read_vnnlib(vnnlib)
    x, y = witness
    assert spec.input_index(x, tol=0.0) is not None
    assert spec.unsafe_index(y, tol=0.0) is not None
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x)  # x is exactly what was fed
    (out,) = sess.run(None, {inp.name: x32.reshape(shape)})
    assert np.array_equal(np.asarray(out, dtype=np.float64).reshape(-1), y)


KNOWN_TEST = [("test_nano", "test_nano", "unsat"), ("test_tiny", "test_tiny", "unsat"),
              ("test_small", "test_small", "unsat"), ("test_sat", "test_prop", "sat"),
              ("test_unsat", "test_prop", "unsat")]


@needs_data
@pytest.mark.parametrize(("net", "prop", "expected"), KNOWN_TEST)
def test_competition_test_folder(net: str, prop: str, expected: str) -> None:
    onnx = DATA / "test" / "onnx" / f"{net}.onnx"
    vnnlib = DATA / "test" / "vnnlib" / f"{prop}.vnnlib"
    verdict = verify_instance(onnx, vnnlib, 30)
    assert verdict.answer == expected, verdict.details
    if expected == "sat":
        _check_witness(onnx, vnnlib, verdict.witness)


# ACAS Xu rows measured to be decided within a few seconds (2-core machine).
ACAS_WITNESS = [("1_2", "2"), ("1_3", "2")]      # sat, confidence witness
ACAS_CONSENSUS = [("2_2", "3"), ("1_1", "1")]    # unsat, confidence consensus


def _acas(net: str, prop: str) -> tuple[Path, Path]:
    return (ACAS / "onnx" / f"ACASXU_run2a_{net}_batch_2000.onnx",
            ACAS / "vnnlib" / f"prop_{prop}.vnnlib")


def _label(onnx: Path, vnnlib: Path) -> tuple[str, str]:
    import csv

    with open(ACAS / "known_results.csv") as fh:
        for row in csv.DictReader(fh):
            if row["onnx"] == f"onnx/{onnx.name}" and row["vnnlib"] == f"vnnlib/{vnnlib.name}":
                return row["result"], row["confidence"]
    raise AssertionError("row not in known_results.csv")


@needs_data
@pytest.mark.parametrize(("net", "prop"), ACAS_WITNESS)
def test_acas_witness_rows_never_unsat(net: str, prop: str) -> None:
    onnx, vnnlib = _acas(net, prop)
    assert _label(onnx, vnnlib) == ("sat", "witness")
    verdict = verify_instance(onnx, vnnlib, 20)
    assert verdict.answer != "unsat", verdict.details
    assert verdict.answer == "sat", verdict.answer  # these are found quickly
    _check_witness(onnx, vnnlib, verdict.witness)


@needs_data
@pytest.mark.parametrize(("net", "prop"), ACAS_CONSENSUS)
def test_acas_consensus_unsat_rows_never_sat(net: str, prop: str) -> None:
    onnx, vnnlib = _acas(net, prop)
    assert _label(onnx, vnnlib) == ("unsat", "consensus")
    verdict = verify_instance(onnx, vnnlib, 20)
    assert verdict.answer != "sat", verdict.witness
    assert verdict.answer in ("unsat", "timeout"), verdict.details


@needs_data
def test_tiny_budget_is_honoured() -> None:
    onnx, vnnlib = _acas("1_1", "1")
    t0 = time.monotonic()
    verdict = verify_instance(onnx, vnnlib, 0.3)
    elapsed = time.monotonic() - t0
    assert verdict.answer == "timeout"
    assert elapsed <= 0.3 + 0.1, elapsed


@needs_data
def test_deadline_inside_a_slow_stage() -> None:
    onnx, vnnlib = _acas("1_1", "1")
    slow = VerifyOptions(random_points=0, pgd_steps=10**7, pgd_restarts=1)  # PGD never ends
    t0 = time.monotonic()
    verdict = verify_instance(onnx, vnnlib, 100, slow, deadline=time.monotonic() + 3.0)
    elapsed = time.monotonic() - t0
    assert verdict.answer == "timeout", verdict.details
    assert elapsed <= 3.1, elapsed


@needs_data
def test_missing_file_is_an_error(tmp_path: Path) -> None:
    verdict = verify_instance(tmp_path / "nope.onnx", ACAS / "vnnlib" / "prop_1.vnnlib", 10)
    assert verdict.answer == "error" and "nope.onnx" in verdict.details["error"]
    onnx, _ = _acas("1_1", "1")
    verdict = verify_instance(onnx, tmp_path / "nope.vnnlib", 10)
    assert verdict.answer == "error" and "nope.vnnlib" in verdict.details["error"]


@needs_data
def test_variable_count_mismatch_is_an_error(tmp_path: Path) -> None:
    text = "\n".join([*(f"(declare-const X_{i} Real)" for i in range(3)),
                      "(declare-const Y_0 Real)",
                      *(f"(assert (<= X_{i} 0.1))\n(assert (>= X_{i} -0.1))" for i in range(3)),
                      "(assert (>= Y_0 100.0))"])
    bad = tmp_path / "three_inputs.vnnlib"
    bad.write_text(text)
    onnx, _ = _acas("1_1", "1")
    verdict = verify_instance(onnx, bad, 10)
    assert verdict.answer == "error"
    assert "3 inputs" in verdict.details["error"] and "5 inputs" in verdict.details["error"]
