"""Real VNN-COMP networks (ONNX) get sound Jacobian bounds on the boxes of their vnnlib files.

The data live outside the repository, in ``../shared/data/vnncomp`` (see its README); the tests
are skipped when it is missing.  For each network and box, the true Jacobians (torch.func on the
loaded model) at box vertices, uniform random points and, for the smooth sigmoid network,
gradient-ascent points on the entries whose bounds are the most extreme, must lie inside the
element-wise bounds, and their l_1 row norms (the dual of the box's l_inf) below the per-row
Lipschitz bound.

* ACAS Xu (5 inputs, 6 x 50 ReLU): all 32 vertices + 3000 random points, three nets; the
  prop_6 file is a union of two boxes and is bounded as a batch of two.
* mnist_fc 256x2 (784 inputs, ReLU): 2000 random points + 512 random vertices.
* eran 6x200 sigmoid (784 inputs): random points, random vertices and ascent points.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rj_plugin import bound_jacobian
from rj_plugin.api import JacobianBounds
from rj_plugin.io.vnnlib import read_vnnlib
from rj_plugin.models import load_model
from tests import oracle

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vnncomp"
pytestmark = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"VNN-COMP data not found at {DATA} (../shared missing)")
TOL = 1e-9


def _box(vnnlib: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All input boxes of a vnnlib file as a batch ``[B, *shape]`` (lower, upper)."""
    spec = read_vnnlib(vnnlib)
    lower = torch.stack([torch.as_tensor(lo) for lo, _ in spec.input_boxes])
    upper = torch.stack([torch.as_tensor(hi) for _, hi in spec.input_boxes])
    return lower.reshape(-1, *shape), upper.reshape(-1, *shape)


def _jacobians(model: nn.Module, pts: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([oracle.jacobians(model, pts[i:i + chunk])
                          for i in range(0, len(pts), chunk)])


def _check(jb: JacobianBounds, b: int, jac: torch.Tensor, label: str) -> None:
    """Jacobians ``[N, n_out, *in]`` at points of box b inside the bounds; l_1 norms under
    the Lipschitz bound."""
    lo, hi = jb.lower[b].flatten(1), jb.upper[b].flatten(1)
    jac = jac.flatten(2)
    scale = TOL * (1 + jac.abs())
    outside = (jac < lo - scale) | (jac > hi + scale)
    assert not outside.any(), (
        f"{label}: {int(outside.sum())} Jacobian entries outside the bounds; worst excess "
        f"{float(torch.maximum(lo - jac, jac - hi).max()):.3g}")
    norms = jac.abs().sum(-1)  # [N, n_out]
    lip = jb.lipschitz()[b]
    assert (norms <= lip * (1 + TOL) + TOL).all(), (
        f"{label}: sampled l1 gradient norm above the Lipschitz bound")


def _box_ascent(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor,
                objectives: list[tuple[int, int | None, float]], gen: torch.Generator,
                steps: int = 20, starts: int = 2) -> torch.Tensor:
    """Projected sign-gradient ascent inside a box on ``sign * J[row, col]`` (col a flat input
    index) or, with col None, on the l_1 norm of row ``row``: ``[len(objectives)*starts, *in]``."""
    found = []
    for row, col, sign in objectives:
        x = oracle.box_points(lower, upper, starts, gen).requires_grad_(True)
        step = (upper - lower) / 4
        for _ in range(steps):
            jac = torch.func.vmap(torch.func.jacrev(lambda z: model(z[None])[0]))(x)
            jac = jac.flatten(2)[:, row]
            val = jac[:, col] * sign if col is not None else jac.abs().sum(-1)
            (grad,) = torch.autograd.grad(val.sum(), x)
            with torch.no_grad():
                x = torch.clamp(x + step * grad.sign(), lower, upper).requires_grad_(True)
            step = step * 0.8
        found.append(x.detach())
    return torch.cat(found)


ACAS = [("ACASXU_run2a_1_1_batch_2000.onnx", "prop_3.vnnlib"),
        ("ACASXU_run2a_2_3_batch_2000.onnx", "prop_4.vnnlib"),
        ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_6.vnnlib")]


@pytest.mark.parametrize(("net", "prop"), ACAS, ids=[f"{n[13:16]}-{p[:-7]}" for n, p in ACAS])
def test_acasxu(net: str, prop: str) -> None:
    path = DATA / "acasxu" / "onnx" / net
    model = load_model(path)
    shape = model.rj_input_shape
    assert shape == (1, 1, 5)
    lower, upper = _box(DATA / "acasxu" / "vnnlib" / prop, shape)
    if prop == "prop_6.vnnlib":
        assert lower.shape[0] == 2  # a union of two boxes: one batch entry each
    gen = torch.Generator().manual_seed(0)
    for method in ("recurjac", "fastlip", "interval"):
        jb = bound_jacobian(path, lower=lower, upper=upper, preact="crown", method=method)
        assert jb.lower.shape == (lower.shape[0], 5, *shape)
        assert torch.isfinite(jb.lower).all() and torch.isfinite(jb.upper).all()
        for b in range(lower.shape[0]):
            verts = oracle.box_vertices(lower[b], upper[b], gen)
            assert len(verts) == 32
            pts = torch.cat([verts, oracle.box_points(lower[b], upper[b], 3000, gen)])
            _check(jb, b, _jacobians(model, pts), f"{net} {prop} box {b} {method}")


def test_mnist_fc_256x2() -> None:
    path = DATA / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx"
    model = load_model(path)
    shape = model.rj_input_shape
    lower, upper = _box(DATA / "mnist_fc" / "vnnlib" / "prop_0_0.03.vnnlib", shape)
    jb = bound_jacobian(path, lower=lower, upper=upper, preact="crown")
    assert jb.lower.shape == (1, 10, *shape)
    gen = torch.Generator().manual_seed(1)
    pts = torch.cat([oracle.box_points(lower[0], upper[0], 2000, gen),
                     oracle.box_vertices(lower[0], upper[0], gen, limit=512)])
    assert len(pts) == 2512
    _check(jb, 0, _jacobians(model, pts), "mnist_fc 256x2 prop_0_0.03")


def test_eran_sigmoid_6x200() -> None:
    path = DATA / "eran" / "onnx" / "ffnnSIGMOID__Point_6x200.onnx"
    model = load_model(path)
    shape = model.rj_input_shape
    lower, upper = _box(DATA / "eran" / "vnnlib" / "mnist_spec_idx_7167_eps_0.01200.vnnlib",
                        shape)
    jb = bound_jacobian(path, lower=lower, upper=upper, preact="crown")
    assert jb.lower.shape == (1, 10, *shape)
    assert torch.isfinite(jb.lower).all() and torch.isfinite(jb.upper).all()
    gen = torch.Generator().manual_seed(2)
    lo, hi = lower[0], upper[0]
    flat_hi, flat_lo = jb.upper[0].flatten(1), jb.lower[0].flatten(1)
    j_hi, k_hi = divmod(int(flat_hi.argmax()), flat_hi.shape[1])
    j_lo, k_lo = divmod(int(flat_lo.argmin()), flat_lo.shape[1])
    lip = jb.lipschitz()[0]
    objectives = [(j_hi, k_hi, 1.0), (j_lo, k_lo, -1.0), (int(lip.argmax()), None, 1.0)]
    pts = torch.cat([oracle.box_points(lo, hi, 1000, gen),
                     oracle.box_vertices(lo, hi, gen, limit=256),
                     _box_ascent(model, lo, hi, objectives, gen)])
    _check(jb, 0, _jacobians(model, pts), "eran sigmoid 6x200 idx 7167")


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("name", ["acasxu", "eran"])
def test_lp_balls_on_nets_that_start_with_a_non_linear_op(name: str, p: float) -> None:
    """ACAS Xu starts with Sub (input normalisation), the ERAN net with Sub/Div: under an l_1 or
    l_2 ball every pre-activation method once saw the single point x0 (issue 7).  The bounds
    must contain sampled Jacobians (random, vertices, ascent on entries and row norms) and
    widen with eps."""
    if name == "acasxu":
        path = DATA / "acasxu" / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"
        box, eps = DATA / "acasxu" / "vnnlib" / "prop_3.vnnlib", 0.02
    else:
        path = DATA / "eran" / "onnx" / "ffnnSIGMOID__Point_6x200.onnx"
        box, eps = DATA / "eran" / "vnnlib" / "mnist_spec_idx_7167_eps_0.01200.vnnlib", 0.5
    model = load_model(path)
    shape = model.rj_input_shape
    lower, upper = _box(box, shape)
    center = ((lower + upper) / 2)[:1]
    gen = torch.Generator().manual_seed(5)
    jb = bound_jacobian(path, center, eps, p, preact="crown")
    small = bound_jacobian(path, center, eps / 100, p, preact="crown")
    assert (jb.upper - jb.lower).mean() > 10 * (small.upper - small.lower).mean()
    flat_hi, flat_lo = jb.upper[0].flatten(1), jb.lower[0].flatten(1)
    j_hi, k_hi = divmod(int(flat_hi.argmax()), flat_hi.shape[1])
    j_lo, k_lo = divmod(int(flat_lo.argmin()), flat_lo.shape[1])
    objectives = [(j_hi, k_hi, 1.0), (j_lo, k_lo, -1.0), (0, None, 1.0)]
    pts = oracle.region_points(model, center[0], eps, p, 1000, gen, objectives)
    jac = _jacobians(model, pts).flatten(2)
    lo, hi = jb.lower[0].flatten(1), jb.upper[0].flatten(1)
    excess = float(torch.maximum(lo - jac, jac - hi).max())
    assert excess <= 0, f"{name} l_{p}: a sampled Jacobian lies outside by {excess:.3g}"
    dual = 2.0 if p == 2.0 else float("inf")
    assert (jac.norm(p=dual, dim=-1) <= jb.lipschitz()[0] * (1 + TOL)).all()
