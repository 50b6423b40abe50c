"""At eps = 0 the bounds collapse onto the true Jacobian; a hand-checkable closed form.

* eps = 0: for every activation, every norm p in {1, 2, inf}, every pre-activation method and
  every bound algorithm, ``lower == upper == autograd Jacobian`` (to 1e-9 in float64) and
  ``lipschitz()`` equals the dual norm of each autograd gradient row (to 1e-9 relative).
* Closed form: ``f(x) = W2 sigma(x + b1) + b2`` (first layer the identity), so hidden neuron k
  depends on x_k alone and the derivatives sigma'_k are independent.  Over an l_inf box the
  exact range of ``J[j, k] = W2[j, k] sigma'(x_k + b1_k)`` is ``W2[j, k] * [g_lo_k, g_hi_k]``
  with the closed-form derivative range of neuron k, and the exact l_inf Lipschitz constant of
  row j is ``sum_k |W2[j, k]| g_hi_k``.  The bounds must equal these (to 1e-12).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rj_plugin.api import METHODS, JacobianBounder
from rj_plugin.lirpa import PREACT_METHODS
from rj_plugin.models import build_mlp
from tests import oracle

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "arctan"]
NORMS = {"1": 1.0, "2": 2.0, "inf": math.inf}
DEPTHS = [[6, 5], [5, 6, 4]]  # hidden widths: 3 and 4 linear layers (2: the closed form)
TOL = 1e-9


def _dual(p: float) -> float:
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


@pytest.mark.parametrize("hidden", DEPTHS, ids=lambda h: f"{len(h) + 1}layers")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_eps_zero_collapses_to_autograd(activation: str, hidden: list[int]) -> None:
    """Every preact x method x norm: bounds == autograd Jacobian, lipschitz == dual norms."""
    seed = 17 * ACTIVATIONS.index(activation) + len(hidden)
    torch.manual_seed(seed)
    d, c = 5, 3
    net = build_mlp(d, hidden, c, activation, leaky_slope=0.2).double().eval()
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, d, generator=gen, dtype=torch.float64)
    jac = oracle.jacobians(net, centers).detach()  # [3, c, d]
    bounder = JacobianBounder(net, input_shape=(d,))
    failures = []
    for norm_name, p in NORMS.items():
        region = bounder.region(centers, 0.0, norm_name)
        true_lip = jac.norm(p=_dual(p), dim=-1)  # [3, c]
        for preact in PREACT_METHODS:
            for method in METHODS:
                # at eps = 0 every alpha is optimal: a few iterations suffice
                jb = bounder.bound(region, preact=preact, method=method, alpha_iterations=2)
                label = f"{activation} {hidden} p={norm_name} preact={preact} method={method}"
                assert jb.lower.shape == (3, c, d), label
                err = max(float((jb.lower - jac).abs().max()),
                          float((jb.upper - jac).abs().max()))
                if err > TOL:
                    failures.append(f"{label}: bounds off the Jacobian by {err:.3g}")
                lip = jb.lipschitz()
                rel = float(((lip - true_lip).abs() / true_lip.clamp(min=1e-300)).max())
                if rel > TOL:
                    failures.append(f"{label}: lipschitz off the dual norm by {rel:.3g} (rel)")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# closed form: identity first layer


def _derivative_range(activation: str, lo: torch.Tensor, hi: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range of sigma' on [lo, hi] (elementwise), written out by hand."""
    if activation == "relu":
        # the test keeps every interval away from 0, or straddling it
        g_lo = torch.where(lo >= 0, 1.0, 0.0).to(lo.dtype)
        g_hi = torch.where(hi > 0, 1.0, 0.0).to(lo.dtype)
        return g_lo, g_hi
    assert activation == "tanh"
    deriv = lambda z: 1.0 - torch.tanh(z) ** 2  # noqa: E731
    straddle = (lo < 0) & (hi > 0)
    nearest = torch.minimum(lo.abs(), hi.abs())
    farthest = torch.maximum(lo.abs(), hi.abs())
    g_hi = torch.where(straddle, torch.ones_like(lo), deriv(nearest))
    return deriv(farthest), g_hi


def _identity_first_layer_net(d: int, c: int, activation: str, gen: torch.Generator
                              ) -> nn.Sequential:
    net = build_mlp(d, [d], c, activation).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(d, dtype=torch.float64))
        net[1].bias.copy_(torch.linspace(-1.5, 1.5, d, dtype=torch.float64))
        net[3].weight.copy_(torch.randn(c, d, generator=gen, dtype=torch.float64))
        net[3].bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    return net


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_identity_first_layer_closed_form(activation: str) -> None:
    """Bounds == W2[j,k] * [sigma'-range of neuron k]; l_inf Lipschitz == sum_k |W2| g_hi."""
    d, c = 8, 3
    gen = torch.Generator().manual_seed(5)
    net = _identity_first_layer_net(d, c, activation, gen)
    w2 = net[3].weight.detach()
    b1 = net[1].bias.detach()
    # centers and radii chosen so that (x0 + b1) +- eps has neurons entirely negative, entirely
    # positive and straddling 0, with no endpoint exactly at 0
    x0 = torch.tensor([[0.3, -0.7, 0.2, 0.05, -0.4, 0.9, -0.1, 0.6],
                       [-0.8, 1.1, 0.45, -0.15, 0.25, -1.3, 0.7, 0.35]], dtype=torch.float64)
    bounder = JacobianBounder(net, input_shape=(d,))
    for eps in (0.1, 0.37, 1.0):
        lo_z, hi_z = x0 + b1 - eps, x0 + b1 + eps
        assert (lo_z.abs() > 1e-6).all() and (hi_z.abs() > 1e-6).all()
        g_lo, g_hi = _derivative_range(activation, lo_z, hi_z)  # [B, d]
        a, b = w2[None] * g_lo[:, None, :], w2[None] * g_hi[:, None, :]  # [B, c, d]
        exact_lo, exact_hi = torch.minimum(a, b), torch.maximum(a, b)
        exact_lip = (w2.abs()[None] * g_hi[:, None, :]).sum(-1)  # [B, c]
        region = bounder.region(x0, eps, "inf")
        for preact in PREACT_METHODS:
            for method in METHODS:
                jb = bounder.bound(region, preact=preact, method=method, alpha_iterations=5)
                label = f"{activation} eps={eps} preact={preact} method={method}"
                torch.testing.assert_close(jb.lower, exact_lo, rtol=0, atol=1e-12, msg=label)
                torch.testing.assert_close(jb.upper, exact_hi, rtol=0, atol=1e-12, msg=label)
                torch.testing.assert_close(jb.lipschitz(), exact_lip, rtol=1e-12, atol=1e-12,
                                           msg=label)
        # the same box given as lower/upper corners
        box = bounder.region(lower=x0 - eps, upper=x0 + eps)
        jb = bounder.bound(box)
        torch.testing.assert_close(jb.lower, exact_lo, rtol=0, atol=1e-12)
        torch.testing.assert_close(jb.upper, exact_hi, rtol=0, atol=1e-12)
        torch.testing.assert_close(jb.lipschitz(), exact_lip, rtol=1e-12, atol=1e-12)
        # the exact range is attained: the extreme derivatives are reached inside the box
        pts = oracle.box_points(x0[0] - eps, x0[0] + eps, 4000,
                                torch.Generator().manual_seed(1))
        jac = oracle.jacobians(net, pts).detach()
        assert (jac >= exact_lo[0] - 1e-12).all() and (jac <= exact_hi[0] + 1e-12).all()
