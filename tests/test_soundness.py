"""Soundness sweeps: every bound path against true Jacobians at many points of the region.

Each case is a random MLP (depth 2-6 linear layers, widths 2-64, one activation), a batch of two
centers, an l_p ball (p in 1, 2, inf; eps log-uniform in [1e-4, 10]); every pre-activation method
and every bound algorithm is run on it.  The true Jacobians (torch.func) at random points,
vertices and gradient-ascent points (on Jacobian entries and on gradient-row dual norms) must lie
inside the element-wise bounds, and every sampled dual norm under the reported Lipschitz bound;
the same for a random specification matrix C.
"""

from __future__ import annotations

import math

import pytest
import torch

from rj_plugin.api import METHODS, JacobianBounder
from rj_plugin.lirpa import PREACT_METHODS
from rj_plugin.models import build_mlp
from tests import oracle

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "arctan"]
NORMS = [math.inf, 2.0, 1.0]
N_CASES = 30
TOL = 1e-9


def _case(seed: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    depth = 2 + seed % 5  # linear layers
    widths = [max(2, int(2 ** (1 + 5 * torch.rand(1, generator=gen).item())))
              for _ in range(depth - 1)]
    return {
        "seed": seed,
        "activation": ACTIVATIONS[seed % len(ACTIVATIONS)],
        "norm": NORMS[(seed // len(ACTIVATIONS)) % 3],
        "in_features": r(2, 8),
        "widths": widths,
        "out_features": r(1, 5),
        "eps": float(10 ** (-4 + 5 * torch.rand(1, generator=gen).item())),
    }


def _dual(p: float) -> float:
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]


def _check(jb, jac: torch.Tensor, label: str) -> None:
    """jac: [B, N, rows, d] must lie in the bounds; its row dual norms under lipschitz()."""
    scale = TOL * (1 + jac.abs())
    lo, hi = jb.lower.flatten(2)[:, None], jb.upper.flatten(2)[:, None]
    below = (jac < lo - scale)
    above = (jac > hi + scale)
    assert not below.any() and not above.any(), (
        f"{label}: {int(below.sum() + above.sum())} Jacobian entries outside the bounds; worst "
        f"excess {float(torch.maximum(lo - jac, jac - hi).max()):.3g}")
    norms = jac.norm(p=_dual(jb.region.norm), dim=-1)  # [B, N, rows]
    lip = jb.lipschitz()[:, None]
    assert (norms <= lip * (1 + TOL) + TOL).all(), (
        f"{label}: sampled gradient norm {float(norms.max()):.6g} above the Lipschitz bound "
        f"{float(lip.min()):.6g}")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_every_path_contains_the_true_jacobian(seed: int) -> None:
    case = _case(seed)
    torch.manual_seed(seed)
    net = build_mlp(case["in_features"], case["widths"], case["out_features"],
                    case["activation"], leaky_slope=0.1).double().eval()
    gen = torch.Generator().manual_seed(seed)
    d, c = case["in_features"], case["out_features"]
    centers = torch.rand(2, d, generator=gen, dtype=torch.float64)
    bounder = JacobianBounder(net, input_shape=(d,))
    region = bounder.region(centers, case["eps"], case["norm"])
    smooth = case["activation"] in ("tanh", "sigmoid", "arctan")
    jac = []
    for b in range(2):
        objectives = None
        if smooth:
            objectives = [(0, 0, 1.0), (0, d - 1, -1.0), (c - 1, d // 2, 1.0),
                          (c - 1, 0, -1.0), (0, None, 1.0), (c - 1, None, 1.0)]
        pts = oracle.region_points(net, centers[b], case["eps"], case["norm"], 1500, gen,
                                   objectives)
        jac.append(oracle.jacobians(net, pts))
    jac = torch.stack(jac)  # [2, N, c, d]
    spec = torch.randn(3, c, generator=gen, dtype=torch.float64)
    for preact in PREACT_METHODS:
        for method in METHODS:
            label = f"case {case} preact={preact} method={method}"
            jb = bounder.bound(region, preact=preact, method=method, alpha_iterations=8)
            _check(jb, jac, label)
            if method == "recurjac":
                _check(jb.with_spec(spec), spec @ jac, label + " with C")
