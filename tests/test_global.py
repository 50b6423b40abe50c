"""Global bounds (the whole input space): soundness far from the data, and orderings.

* Jacobians at points drawn far and wide (normal with std 1, 10 and 100 around the data) lie
  inside the global bounds, for every activation and on the digits demo models; the dual norms
  of their rows lie under the global Lipschitz values.
* The global RecurJac Lipschitz value of every row is at least every local one (any center,
  radius and norm): the local regions are subsets of the whole space.
* ``operator_norm_product()`` (||W_m[j,:]||_q prod ||W_l||_{p->p} max|sigma'|) is at least the
  global RecurJac value for p = 1 and p = inf on the digits models.  For p = 2 it is NOT:
  element-wise bounds give ||M[j,:]||_2 with M >= |W_m| G |W_{m-1}| ... G |W_1| entrywise, and
  taking absolute values inside the product destroys the cancellations that the spectral norms
  keep, so on both digits models the product of spectral norms is about 1.7x smaller (documented
  in ``test_operator_norm_product_can_beat_elementwise_l2``).
"""

from __future__ import annotations

import math

import pytest
import torch

from rj_plugin import bound_jacobian
from rj_plugin.api import JacobianBounder
from rj_plugin.data import load_digits_split
from rj_plugin.models import build_mlp
from tests import oracle

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "arctan"]
NORMS = {"inf": math.inf, "2": 2.0, "1": 1.0}
TOL = 1e-9


def _dual(p: float) -> float:
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


def _far_points(center: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``3n`` points: normal around ``center`` with std 1, 10 and 100."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([center + std * torch.randn(n, *center.shape, generator=gen,
                                                 dtype=center.dtype)
                      for std in (1.0, 10.0, 100.0)])


def _check_contains(jb, jac: torch.Tensor, label: str) -> None:
    """jac ``[N, rows, *in]`` inside the (batch-0) bounds; row dual norms under lipschitz()."""
    lo, hi = jb.lower[0].flatten(1), jb.upper[0].flatten(1)
    jac = jac.flatten(2)
    scale = TOL * (1 + jac.abs())
    outside = (jac < lo - scale) | (jac > hi + scale)
    assert not outside.any(), f"{label}: {int(outside.sum())} entries outside the global bounds"
    norms = jac.norm(p=_dual(jb.region.norm), dim=-1)
    assert (norms <= jb.lipschitz()[0] * (1 + TOL) + TOL).all(), label


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_global_bounds_contain_far_jacobians_random(activation: str) -> None:
    seed = ACTIVATIONS.index(activation)
    torch.manual_seed(seed)
    d = 5
    net = build_mlp(d, [12, 10, 8], 3, activation, leaky_slope=0.2).double().eval()
    bounder = JacobianBounder(net, input_shape=(d,))
    x0 = torch.zeros(d, dtype=torch.float64)
    with torch.no_grad():
        jac = oracle.jacobians(net, _far_points(x0, 1000, seed))
    for name in NORMS:
        region = bounder.region(x0[None], norm=name, unbounded=True)
        assert region.unbounded
        for method in ("recurjac", "fastlip", "interval"):
            jb = bounder.bound(region, method=method)
            assert jb.preact == "none"
            _check_contains(jb, jac, f"{activation} p={name} {method}")
    # the same through bound_jacobian(global_bounds=True)
    jb = bound_jacobian(net, x0, global_bounds=True)
    _check_contains(jb, jac, f"{activation} bound_jacobian(global_bounds=True)")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_global_lipschitz_at_least_every_local_random(activation: str) -> None:
    seed = 10 + ACTIVATIONS.index(activation)
    torch.manual_seed(seed)
    d = 6
    net = build_mlp(d, [10, 10], 4, activation, leaky_slope=0.2).double().eval()
    bounder = JacobianBounder(net, input_shape=(d,))
    centers = 3 * torch.randn(4, d, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
    for name in NORMS:
        glob = bounder.bound(bounder.region(centers[:1], norm=name, unbounded=True))
        g_lip = glob.lipschitz()[0]
        for eps in (0.01, 0.3, 3.0, 30.0):
            local = bounder.bound(bounder.region(centers, eps, name)).lipschitz()
            assert (local <= g_lip * (1 + TOL) + TOL).all(), (
                f"{activation} p={name} eps={eps}: local {local.max(0).values.tolist()} > "
                f"global {g_lip.tolist()}")


@pytest.fixture(scope="module")
def digits() -> dict:
    x, _ = load_digits_split("test")
    return {"x": x[:10], "relu": JacobianBounder("digits-relu"),
            "tanh": JacobianBounder("digits-tanh")}


@pytest.mark.parametrize("model", ["relu", "tanh"])
def test_digits_global(digits: dict, model: str) -> None:
    """Far points inside; global >= local at the test images; the operator-norm product is
    above the global value for p = 1 and p = inf."""
    bounder = digits[model]
    x = digits["x"]
    with torch.no_grad():
        jac = oracle.jacobians(bounder.model, _far_points(x[0], 500, 7))
    for name in NORMS:
        glob = bounder.bound(bounder.region(x[:1], norm=name, unbounded=True))
        _check_contains(glob, jac, f"digits-{model} p={name}")
        g_lip = glob.lipschitz()[0]
        for eps in (0.01, 0.1, 1.0):
            local = bounder.bound(bounder.region(x, eps, name)).lipschitz()
            assert (local <= g_lip * (1 + TOL)).all(), f"digits-{model} p={name} eps={eps}"
        if name != "2":
            op = glob.operator_norm_product()
            assert op.shape[-1] == 10
            assert (g_lip <= op.reshape(-1) * (1 + TOL)).all(), (
                f"digits-{model} p={name}: global RecurJac {g_lip.tolist()} above the "
                f"operator-norm product {op.tolist()}")


@pytest.mark.parametrize("model", ["relu", "tanh"])
def test_operator_norm_product_can_beat_elementwise_l2(digits: dict, model: str) -> None:
    """Documented: at p = 2 the product of spectral norms is below the global RecurJac value on
    every row of both digits models (see the module docstring); both remain sound."""
    bounder = digits[model]
    glob = bounder.bound(bounder.region(digits["x"][:1], norm="2", unbounded=True))
    g_lip = glob.lipschitz()[0]
    op = glob.operator_norm_product().reshape(-1)
    assert (op < g_lip).all(), (op.tolist(), g_lip.tolist())
    # the product is still a valid bound: sampled gradient norms lie under it
    with torch.no_grad():
        jac = oracle.jacobians(bounder.model, _far_points(digits["x"][0], 300, 3))
    assert (jac.flatten(2).norm(dim=-1) <= op * (1 + TOL)).all()
