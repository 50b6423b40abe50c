"""Tightness orderings between the bound algorithms and between pre-activation methods.

What is a theorem and what is not:

* RecurJac (``intersect=True``, the default) keeps at every level the intersection with the
  Fast-Lip step, so its element-wise bounds lie inside Fast-Lip's; its per-row Lipschitz values
  are then no larger (checked here on random MLPs and on the digits demo models).
* RecurJac *without* the intersection is, by the paper's argument, no looser than Fast-Lip but
  this is not a clean theorem of the implementation (the fold is not linear in the pushed
  vector); it is checked empirically on the seeded cases below and never found looser.
* ``interval`` is the plain interval product evaluated from the INPUT side (forward,
  Z_{k+1} = W_{k+1} [S_k] [Z_k]); Fast-Lip is the same product from the OUTPUT side
  (Y_l = [Y_{l+1}] [S_l] W_l).  Neither dominates.  The first step of each is exact (the last two
  layers for Fast-Lip, the first two for forward), and every later step loses the correlation
  through the derivatives already multiplied in.  So Fast-Lip wins when the derivative
  uncertainty sits in the EARLY layers (deeper layers certain, e.g. stable ReLUs, or
  contracting nets whose pre-activation ranges shrink with depth), and forward intervals win when
  it grows with depth, which is the usual case for trained nets at small radii (the first layer's
  pre-activation bounds are exact, later ones are looser).  On the digits demo models the
  forward interval is below Fast-Lip on many rows, on digits-tanh on every row, and there even
  below RecurJac at eps >= 0.03 (see the ``test_forward_interval_*`` tests).
* alpha-CROWN pre-activation bounds are intersected with CROWN, so they are never looser; on a
  ReLU net where CROWN's adaptive lower slope is the wrong choice they are strictly tighter.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rj_plugin.api import JacobianBounder
from rj_plugin.data import load_digits_split
from rj_plugin.lirpa import make_perturbation
from rj_plugin.models import build_mlp
from tests import oracle

RTOL = 1e-9
NORMS = ["inf", "2", "1"]


def _le(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise a <= b up to a relative tolerance."""
    return a <= b * (1 + RTOL) + RTOL


def _random_net(seed: int, d: int, hidden: list[int], c: int, activation: str,
                scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = build_mlp(d, hidden, c, activation, leaky_slope=0.1).double().eval()
    if scale != 1.0:
        with torch.no_grad():
            for prm in net.parameters():
                prm.mul_(scale)
    return net


def _all_methods(bounder: JacobianBounder, region) -> dict:
    out = {m: bounder.bound(region, method=m) for m in ("recurjac", "fastlip", "interval")}
    out["recurjac_raw"] = bounder.bound(region, method="recurjac", intersect=False)
    return out


# ----------------------------------------------------------------------------------------------
# RecurJac <= Fast-Lip

RANDOM_CASES = [  # (seed, in, hidden, out, activation, scale)
    (0, 6, [12, 12], 3, "relu", 1.0),
    (1, 4, [16, 16, 16], 2, "relu", 2.0),
    (2, 20, [10, 10, 10], 4, "leaky_relu", 1.0),
    (3, 5, [8, 8, 8, 8], 3, "tanh", 2.0),
    (4, 12, [16, 16], 5, "sigmoid", 3.0),
    (5, 8, [10, 12, 10], 2, "arctan", 2.0),
    (6, 30, [16, 16, 16], 1, "relu", 1.0),
]


@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: f"{c[4]}-{len(c[2]) + 1}L-s{c[0]}")
def test_recurjac_no_looser_than_fastlip_random(case: tuple) -> None:
    """Element-wise inside Fast-Lip, per-row Lipschitz <= Fast-Lip's, for p in {1, 2, inf};
    the raw recursion (no intersection) is also never looser than Fast-Lip here."""
    seed, d, hidden, c, act, scale = case
    net = _random_net(seed, d, hidden, c, act, scale)
    bounder = JacobianBounder(net, input_shape=(d,))
    x0 = torch.rand(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for p, eps in (("inf", 0.02), ("inf", 0.3), ("2", 0.3), ("1", 1.0)):
        res = _all_methods(bounder, bounder.region(x0, eps, p))
        rj, fl, raw = res["recurjac"], res["fastlip"], res["recurjac_raw"]
        label = f"{case} p={p} eps={eps}"
        tol = RTOL * (1 + fl.upper.abs() + fl.lower.abs())
        assert (rj.lower >= fl.lower - tol).all() and (rj.upper <= fl.upper + tol).all(), label
        assert _le(rj.lipschitz(), fl.lipschitz()).all(), label
        raw_lo_bad = int((raw.lower < fl.lower - RTOL * (1 + fl.lower.abs())).sum())
        raw_hi_bad = int((raw.upper > fl.upper + RTOL * (1 + fl.upper.abs())).sum())
        assert raw_lo_bad == 0 and raw_hi_bad == 0, (
            f"{label}: RecurJac without intersection looser than Fast-Lip in "
            f"{raw_lo_bad + raw_hi_bad} entries")
        assert _le(raw.lipschitz(), fl.lipschitz()).all(), label


@pytest.fixture(scope="module")
def digits() -> dict:
    x, _ = load_digits_split("test")
    return {"x": x[:12], "relu": JacobianBounder("digits-relu"),
            "tanh": JacobianBounder("digits-tanh")}


@pytest.mark.parametrize("model", ["relu", "tanh"])
def test_recurjac_no_looser_than_fastlip_digits(digits: dict, model: str) -> None:
    """On the digits demo models: RecurJac <= Fast-Lip per row, and strictly below at some
    radius (it is the point of the method)."""
    bounder = digits[model]
    strictly = 0
    for p, radii in (("inf", (0.003, 0.01, 0.03)), ("2", (0.1, 0.3)), ("1", (0.3, 1.0))):
        for eps in radii:
            res = _all_methods(bounder, bounder.region(digits["x"], eps, p))
            rj, fl = res["recurjac"].lipschitz(), res["fastlip"].lipschitz()
            assert _le(rj, fl).all(), f"digits-{model} p={p} eps={eps}"
            assert _le(res["recurjac_raw"].lipschitz(), fl).all(), f"raw, p={p} eps={eps}"
            strictly += int((rj < fl * (1 - 1e-6)).sum())
    assert strictly > 0


# ----------------------------------------------------------------------------------------------
# Fast-Lip vs forward intervals


def _stabilise(net: nn.Sequential, layers: list[int], shift: float) -> None:
    """Add ``shift`` to the biases of the given Linear layers (indices into the Sequential),
    making their ReLU neurons stable (all active) over small regions, and subtract its effect
    from the next layer's bias, so that later pre-activations keep their scale."""
    with torch.no_grad():
        for i in layers:
            net[i].bias.add_(shift)
            nxt = net[i + 2]
            nxt.bias.sub_(nxt.weight.sum(1) * shift)


def test_fastlip_no_looser_than_interval_when_deeper_layers_are_certain() -> None:
    """Every hidden layer but the first is stable (ReLU, all active): Y_2 = W_m S ... W_2 is a
    point, so Fast-Lip's single interval step is exact, while the forward product treats the
    entries of Z_2 = W_2 S_1 W_1 (correlated through S_1) as independent.  Fast-Lip must be
    inside the forward interval bounds."""
    for seed, (d, hidden, c) in enumerate([(4, [16, 16, 16], 2), (64, [16, 16], 1),
                                           (10, [20, 20, 20], 5)]):
        net = _random_net(seed, d, hidden, c, "relu")
        _stabilise(net, [3 + 2 * k for k in range(len(hidden) - 1)], 50.0)
        bounder = JacobianBounder(net, input_shape=(d,))
        x0 = torch.rand(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for p in NORMS:
            region = bounder.region(x0, 0.2, p)
            g_lo, g_hi = bounder.derivative_ranges(region, "crown")
            assert all((lo == hi).all() for lo, hi in zip(g_lo[1:], g_hi[1:], strict=True))
            assert any((lo != hi).any() for lo, hi in zip(g_lo[:1], g_hi[:1], strict=True))
            fl = bounder.bound(region, method="fastlip")
            iv = bounder.bound(region, method="interval")
            tol = RTOL * (1 + iv.upper.abs())
            assert (fl.lower >= iv.lower - tol).all() and (fl.upper <= iv.upper + tol).all()
            assert _le(fl.lipschitz(), iv.lipschitz()).all(), f"seed {seed} p={p}"


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "arctan"])
def test_fastlip_no_looser_than_interval_on_contracting_smooth_nets(activation: str) -> None:
    """Default-initialised smooth MLPs contract (weights ~ U(+-1/sqrt(n))), so pre-activation
    ranges, and with them the derivative uncertainty, shrink with depth: the regime where the
    backward product is the better one.  Empirical (no counter-example in a sweep of 6 shapes x
    3 seeds x 3 norms x 3 radii); checked on seeded nets with many inputs, few outputs and the
    reverse."""
    for seed, (d, hidden, c) in enumerate([(64, [32, 32], 10), (8, [32, 32, 32], 8),
                                           (4, [16, 16, 16], 2)]):
        net = _random_net(seed, d, hidden, c, activation)
        bounder = JacobianBounder(net, input_shape=(d,))
        x0 = torch.rand(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for p in NORMS:
            for eps in (0.03, 0.3):
                region = bounder.region(x0, eps, p)
                fl = bounder.bound(region, method="fastlip").lipschitz()
                iv = bounder.bound(region, method="interval").lipschitz()
                assert _le(fl, iv).all(), f"{activation} {d}-{hidden}-{c} p={p} eps={eps}"


def test_forward_interval_beats_fastlip_when_first_layer_is_certain() -> None:
    """The mirror image of the test above: the FIRST hidden layer is stable and the deeper ones
    are not.  Then Z_2 = W_2 S_1 W_1 is a point and the forward product is exact (each later
    derivative appears once per entry), while Fast-Lip treats the entries of the row Y_2, which
    share all deeper derivatives, as independent.  The forward interval is inside Fast-Lip's
    bounds, strictly narrower somewhere, and its Lipschitz values strictly smaller on some
    rows."""
    d, hidden, c = 4, [16, 16, 16], 2
    net = _random_net(1, d, hidden, c, "relu", scale=2.0)
    _stabilise(net, [1], 50.0)
    bounder = JacobianBounder(net, input_shape=(d,))
    x0 = torch.rand(4, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    region = bounder.region(x0, 0.2, "inf")
    g_lo, g_hi = bounder.derivative_ranges(region, "crown")
    assert (g_lo[0] == g_hi[0]).all()
    assert any((lo != hi).any() for lo, hi in zip(g_lo[1:], g_hi[1:], strict=True))
    fl = bounder.bound(region, method="fastlip")
    iv = bounder.bound(region, method="interval")
    tol = RTOL * (1 + fl.upper.abs())
    assert (iv.lower >= fl.lower - tol).all() and (iv.upper <= fl.upper + tol).all()
    assert ((iv.upper - iv.lower) < (fl.upper - fl.lower) - 1e-6).any()
    for p in NORMS:
        region = bounder.region(x0, 0.2, p)
        fl_lip = bounder.bound(region, method="fastlip").lipschitz()
        iv_lip = bounder.bound(region, method="interval").lipschitz()
        assert (iv_lip < fl_lip * (1 - 1e-6)).any(), p
    # the forward bounds are exact here: attained by Jacobians at sampled points
    pts = oracle.region_points(net, x0[0], 0.2, math.inf, 3000, torch.Generator().manual_seed(2))
    jac = oracle.jacobians(net, pts).detach()
    assert (jac >= iv.lower[0] - 1e-9).all() and (jac <= iv.upper[0] + 1e-9).all()


def test_forward_interval_can_beat_fastlip_on_narrow_nets() -> None:
    """A random ReLU net with few inputs and outputs (4-16-16-16-2, PyTorch default init, seed
    3): no layer is made stable by hand, and still the forward interval's Lipschitz value is
    below Fast-Lip's on some rows for every p (instability grows with depth).  At l_2, eps = 1
    it is even below RecurJac's on every row."""
    d = 4
    torch.manual_seed(3)
    net = build_mlp(d, [16, 16, 16], 2, "relu").double().eval()
    bounder = JacobianBounder(net, input_shape=(d,))
    x0 = torch.rand(4, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    beaten = {}
    for p in NORMS:
        rows = 0
        for eps in (0.1, 1.0):
            region = bounder.region(x0, eps, p)
            fl = bounder.bound(region, method="fastlip").lipschitz()
            iv = bounder.bound(region, method="interval").lipschitz()
            rows += int((iv < fl * (1 - 1e-6)).sum())
        beaten[p] = rows
    assert all(v > 0 for v in beaten.values()), beaten
    region = bounder.region(x0, 1.0, "2")
    # element-wise: the joint l_2 bound of lipschitz() (one more sweep) is not the comparison
    raw = bounder.bound(region, method="recurjac",
                        intersect=False).lipschitz_candidates()["elementwise"]
    iv = bounder.bound(region, method="interval").lipschitz()
    assert (iv < raw * (1 - 1e-6)).all(), (iv, raw)
    # which is why RecurJac (by default) also intersects with the forward product
    rj = bounder.bound(region, method="recurjac").lipschitz()
    assert _le(rj, iv).all(), (rj, iv)


@pytest.mark.parametrize("model", ["relu", "tanh"])
def test_forward_interval_beats_fastlip_on_digits(digits: dict, model: str) -> None:
    """Documented surprise: on both digits demo models (64-32-32-10, trained), the forward
    interval product gives smaller per-row Lipschitz values than Fast-Lip on many rows (on
    digits-tanh at l_inf eps = 0.01, on nearly every row), because the second hidden layer's
    derivative ranges are wider than the first's (mean sigma'-range width at eps = 0.03, digits-
    tanh: 0.29 in layer 1, 0.46 in layer 2).  The raw recursion (``intersect=False``) never loses
    to the interval product on digits-relu at these radii, but on digits-tanh it does for every
    row at l_inf eps = 0.03; the default RecurJac intersects with the forward product.  (The
    comparisons of Fast-Lip and the raw recursion with the interval product are of the
    element-wise bounds; lipschitz() adds joint norm bounds on top.)"""
    bounder = digits[model]
    x = digits["x"]
    region = bounder.region(x, 0.01, "inf")
    fl = bounder.bound(region, method="fastlip").lipschitz_candidates()["merged"]
    iv = bounder.bound(region, method="interval").lipschitz()
    rj = bounder.bound(region, method="recurjac").lipschitz()
    beaten = (iv < fl * (1 - 1e-6)).double().mean().item()
    if model == "relu":
        assert 0.05 < beaten < 1.0, beaten
        for p, eps in (("inf", 0.01), ("inf", 0.03), ("2", 0.3), ("1", 0.3)):
            region = bounder.region(x, eps, p)
            rj = bounder.bound(region, method="recurjac").lipschitz()
            iv = bounder.bound(region, method="interval").lipschitz()
            assert _le(rj, iv).all(), (p, eps)
    else:
        assert beaten > 0.9, beaten
        assert _le(rj, iv).any()
        region = bounder.region(x, 0.03, "inf")
        raw = bounder.bound(region, method="recurjac",
                            intersect=False).lipschitz_candidates()["merged"]
        iv = bounder.bound(region, method="interval").lipschitz()
        assert (iv < raw).all()
        rj = bounder.bound(region, method="recurjac").lipschitz()  # intersects with it
        assert _le(rj, iv).all()


# ----------------------------------------------------------------------------------------------
# alpha-CROWN vs CROWN pre-activation bounds


def _preact(bounder: JacobianBounder, x0: torch.Tensor, eps: float, p: float, method: str
            ) -> dict:
    ptb = make_perturbation(p, eps)
    return bounder.graph.preactivation_bounds(x0, ptb, bounder.preact_nodes, method, 10, 0.1)


def _compare_alpha(bounder: JacobianBounder, x0: torch.Tensor, eps: float, p: float) -> float:
    """Assert alpha-CROWN inside CROWN at every pre-activation node; return the total gain."""
    crown = _preact(bounder, x0, eps, p, "crown")
    alpha = _preact(bounder, x0, eps, p, "alpha-crown")
    gain = 0.0
    for name in bounder.preact_nodes:
        (c_lo, c_hi), (a_lo, a_hi) = crown[name], alpha[name]
        assert (a_lo >= c_lo).all() and (a_hi <= c_hi).all(), name
        assert (a_lo <= a_hi).all(), name
        gain += float(((a_lo - c_lo) + (c_hi - a_hi)).sum())
    return gain


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_alpha_crown_no_looser_than_crown_random(activation: str) -> None:
    net = _random_net(11, 6, [16, 16, 16], 3, activation, scale=2.0)
    bounder = JacobianBounder(net, input_shape=(6,))
    x0 = torch.rand(2, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for p in (math.inf, 2.0) if activation == "relu" else (math.inf,):
        _compare_alpha(bounder, x0, 0.1, p)


@pytest.mark.parametrize("model", ["relu", "tanh"])
def test_alpha_crown_no_looser_than_crown_digits(digits: dict, model: str) -> None:
    gain = _compare_alpha(digits[model], digits["x"][:3], 0.03, math.inf)
    if model == "relu":
        assert gain > 0


def _slope_trap_net(b2: float) -> nn.Sequential:
    """y = relu(x + 1/2) + 3 relu(x + 2) - relu(x + 2) - 4 + b2 = relu(x + 1/2) + 2x + b2 on
    x in [-1, 1], then relu(y), then the identity.  The first neuron's pre-activation is in
    [-1/2, 3/2]; CROWN's adaptive lower slope picks 1 (u > |l|), which gives y >= -2.5 + b2,
    while the optimal slope 0 gives the exact minimum -2 + b2 (at x = -1).  IBP gives
    -4 + b2."""
    net = build_mlp(1, [3, 1], 1, "relu").double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0], [1.0], [1.0]]))
        net[1].bias.copy_(torch.tensor([0.5, 2.0, 2.0]))
        net[3].weight.copy_(torch.tensor([[1.0, 3.0, -1.0]]))
        net[3].bias.fill_(-4.0 + b2)
        net[5].weight.fill_(1.0)
        net[5].bias.zero_()
    return net


def test_alpha_crown_strictly_tighter_where_it_must_be() -> None:
    """The slope trap: CROWN's lower bound on y is -2.5; alpha-CROWN moves towards the exact -2
    (the optimum, slope 0, is reached in the limit of its iterations)."""
    bounder = JacobianBounder(_slope_trap_net(0.0), input_shape=(1,))
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    crown = _preact(bounder, x0, 1.0, math.inf, "crown")
    alpha = _preact(bounder, x0, 1.0, math.inf, "alpha-crown")
    y = bounder.preact_nodes[-1]
    assert float(crown[y][0]) == pytest.approx(-2.5, abs=1e-9)
    # sound (the true minimum is -2, at x = -1) and strictly above CROWN's value
    assert -2.4 < float(alpha[y][0]) <= -2.0 + 1e-9
    assert float(crown[y][1]) == pytest.approx(3.5, abs=1e-9)
    assert float(alpha[y][1]) == pytest.approx(3.5, abs=1e-9)


def test_alpha_crown_tighter_jacobian_when_it_stabilises_a_neuron() -> None:
    """With b2 = 2.4 the second-layer neuron is in [-0.1, 5.9] by CROWN (unstable) and has a
    positive lower bound by alpha-CROWN (stable; the exact one is 0.4), so the Jacobian
    J = sigma_2' (sigma_1' + 2) is bounded by [0, 3] with CROWN and by the exact [2, 3] with
    alpha-CROWN."""
    net = _slope_trap_net(2.4)
    bounder = JacobianBounder(net, input_shape=(1,))
    region = bounder.region(torch.zeros(1, 1, dtype=torch.float64), 1.0, "inf")
    crown = bounder.bound(region, preact="crown")
    alpha = bounder.bound(region, preact="alpha-crown")
    assert float(crown.lower) == pytest.approx(0.0, abs=1e-9)
    assert float(crown.upper) == pytest.approx(3.0, abs=1e-9)
    assert float(alpha.lower) == pytest.approx(2.0, abs=1e-9)
    assert float(alpha.upper) == pytest.approx(3.0, abs=1e-9)
    pts = torch.linspace(-1, 1, 401, dtype=torch.float64)[:, None]
    jac = oracle.jacobians(net, pts).detach().flatten()
    assert jac.min() == pytest.approx(2.0) and jac.max() == pytest.approx(3.0)
