"""Derivative ranges (spec section 2) against dense sampling of sigma' on each interval."""

from __future__ import annotations

import math

import pytest
import torch

from rj_plugin.derivatives import get_activation
from rj_plugin.errors import UnsupportedLayerError

FUNCTIONS = {
    "relu": torch.relu,
    "leaky_relu:0.1": lambda z: torch.nn.functional.leaky_relu(z, 0.1),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "arctan": torch.atan,
    "softplus": torch.nn.functional.softplus,
    "elu:1.0": torch.nn.functional.elu,
    "elu:0.5": lambda z: torch.nn.functional.elu(z, 0.5),
    "hardtanh": torch.nn.functional.hardtanh,
}


def _autograd_derivative(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z).sum(), z)
    return g


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_range_contains_sampled_derivatives(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    act = get_activation(name)
    centers = torch.randn(400, generator=gen, dtype=torch.float64) * 3
    widths = torch.rand(400, generator=gen, dtype=torch.float64) ** 2 * 4
    lower, upper = centers - widths, centers + widths
    # intervals touching the kinks exactly, and degenerate ones
    lower = torch.cat([lower, torch.tensor([0.0, -1.0, -2.0, 0.0, 1.0, -1.0], dtype=torch.float64)])
    upper = torch.cat([upper, torch.tensor([0.0, 0.0, 0.0, 3.0, 1.0, 1.0], dtype=torch.float64)])
    g_lo, g_hi = act.bounds(lower, upper)
    t = torch.linspace(0, 1, 501, dtype=torch.float64)
    z = lower[:, None] + t[None] * (upper - lower)[:, None]
    d = _autograd_derivative(FUNCTIONS[name], z)
    assert (d >= g_lo[:, None]).all() and (d <= g_hi[:, None]).all()
    # tight: the sampled extremes come close to the bounds (within sampling resolution)
    span = (g_hi - g_lo).clamp(min=1e-12)
    assert ((d.amax(1) - g_hi).abs() / span).median() < 0.05
    assert ((d.amin(1) - g_lo).abs() / span).median() < 0.05


def test_relu_ties_cover_every_subgradient() -> None:
    act = get_activation("relu")
    lo, hi = act.bounds(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0]))
    assert lo.tolist() == [0.0, 0.0, 0.0] and hi.tolist() == [1.0, 1.0, 1.0]
    lo, hi = act.bounds(torch.tensor([0.5, -2.0]), torch.tensor([1.0, -1.0]))
    assert lo.tolist() == [1.0, 0.0] and hi.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("name", "expected"), [
    ("relu", (0.0, 1.0)), ("leaky_relu:0.3", (0.3, 1.0)), ("tanh", (0.0, 1.0)),
    ("sigmoid", (0.0, 0.25)), ("arctan", (0.0, 1.0))])
def test_global_ranges(name: str, expected: tuple[float, float]) -> None:
    lo, hi = get_activation(name).global_bounds(torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(lo, torch.full_like(lo, expected[0]), atol=1e-12)
    assert torch.allclose(hi, torch.full_like(hi, expected[1]), rtol=1e-12)


def test_point_interval_is_tight_to_ulps() -> None:
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)
    lo, hi = get_activation("tanh").bounds(z, z)
    exact = 1 - torch.tanh(z) ** 2
    assert (lo <= exact + 1e-15).all() and (hi >= exact - 1e-15).all()
    assert ((hi - lo) <= 1e-14).all()


def test_unknown_and_invalid_activations_are_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="unknown activation 'gelu'"):
        get_activation("gelu")
    with pytest.raises(UnsupportedLayerError, match="slope"):
        get_activation("leaky_relu:-0.5")
    with pytest.raises(UnsupportedLayerError, match="alpha"):
        get_activation("elu:2")
    assert math.isclose(get_activation("sigmoid").max_abs_derivative, 0.25)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "arctan"])
def test_derivative_lines_contain_sigma_prime(name: str) -> None:
    """The lines of sigma' in z hold at 4001 points of every interval (the smoothness margin is
    what makes them hold between the 33 samples), from ulp-wide to 40 wide, and hug sigma':
    the gap at the midpoint never exceeds sigma''s certified range and is a small part of it on
    intervals up to 1 wide."""
    gen = torch.Generator().manual_seed(1)
    act = get_activation(name)
    centers = torch.randn(600, generator=gen, dtype=torch.float64) * 4
    widths = 10.0 ** (torch.rand(600, generator=gen, dtype=torch.float64) * 8 - 6) * 20
    lower, upper = centers - widths, centers + widths
    a_lo, b_lo, a_hi, b_hi, mid = act.linear_derivative_bounds(lower, upper)
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    z = lower[:, None] + t[None] * (upper - lower)[:, None]
    d = _autograd_derivative(FUNCTIONS[name], z)
    assert (d >= a_lo[:, None] * z + b_lo[:, None]).all()
    assert (d <= a_hi[:, None] * z + b_hi[:, None]).all()
    center = (lower + upper) / 2
    assert torch.allclose(mid, _autograd_derivative(FUNCTIONS[name], center))
    g_lo, g_hi = act.bounds(lower, upper)
    gap = (a_hi * center + b_hi) - (a_lo * center + b_lo)
    assert (gap <= (g_hi - g_lo) + 1e-12).all()  # never worse than the constant range
    moderate = (widths > 0.01) & (widths <= 0.5)  # half-widths: the lines beat the constants
    assert (gap[moderate] / (g_hi - g_lo)[moderate]).median() < 0.2


@pytest.mark.parametrize("name", ["relu", "leaky_relu:0.1", "hardtanh", "tanh", "sigmoid",
                                  "arctan"])
def test_linear_relaxation_contains_sigma(name: str) -> None:
    """The lines of sigma (the joint back-substitution of the linear method) hold at 4001 points
    of every interval, from ulp-wide to very wide, exactly at kinks; on intervals that straddle
    the ReLU's kink the upper line is the chord and the lower one is CROWN's adaptive choice."""
    gen = torch.Generator().manual_seed(2)
    act = get_activation(name)
    assert act.has_linear_relaxation
    centers = torch.randn(600, generator=gen, dtype=torch.float64) * 3
    widths = 10.0 ** (torch.rand(600, generator=gen, dtype=torch.float64) * 8 - 6) * 20
    lower = torch.cat([centers - widths, torch.tensor([-1.0, 0.0, -2.0, 1.0], dtype=torch.float64)])
    upper = torch.cat([centers + widths, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)])
    a_lo, c_lo, a_hi, c_hi = act.linear_relaxation(lower, upper)
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    z = lower[:, None] + t[None] * (upper - lower)[:, None]
    f = FUNCTIONS[name](z)
    assert (f >= a_lo[:, None] * z + c_lo[:, None]).all()
    assert (f <= a_hi[:, None] * z + c_hi[:, None]).all()
    if name == "relu":
        straddle = (lower < 0) & (upper > 0)
        chord = upper / (upper - lower)
        assert torch.allclose(a_hi[straddle], chord[straddle])
        assert torch.equal(a_lo[straddle], (upper > -lower)[straddle].double())
    # never worse than the flat range [sigma(l), sigma(u)] at the midpoint
    mid = (lower + upper) / 2
    gap = (a_hi * mid + c_hi) - (a_lo * mid + c_lo)
    assert (gap <= FUNCTIONS[name](upper) - FUNCTIONS[name](lower) + 1e-9).all()


def test_activations_without_lines_say_so() -> None:
    for name in ("softplus", "elu:1.0"):
        act = get_activation(name)
        assert not act.has_linear_relaxation
        with pytest.raises(ValueError, match="no linear relaxation"):
            act.linear_relaxation(torch.zeros(1), torch.ones(1))
