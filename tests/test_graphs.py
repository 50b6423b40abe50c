"""General graphs (spec section 9): CNNs with BatchNorm and pooling, residual MLPs and CNNs.

Every bound must contain the true Jacobians at sampled points (random, vertices, and ascent
points for smooth activations); unsupported operators are refused with the node's name.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rj_plugin.api import METHODS, JacobianBounder
from rj_plugin.errors import UnsupportedLayerError
from tests import oracle

ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
       "leaky_relu": lambda: nn.LeakyReLU(0.2)}


class ResidualMLP(nn.Module):
    """x -> h = a(W0 x); h = h + W2 a(W1 h) (twice); out = W3 a(h) + P x (a skip to the output)."""

    def __init__(self, d: int, width: int, out: int, act) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), act(), nn.Linear(width, width))
            for _ in range(2))
        self.acts = nn.ModuleList(act() for _ in range(3))
        self.out = nn.Linear(width, out)
        self.skip = nn.Linear(d, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.acts[0](self.inp(x))
        for block, act in zip(self.blocks, self.acts[1:], strict=True):
            h = act(h + block(h))
        return self.out(h) + self.skip(x)


class ResidualCNN(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act1, self.act2 = act(), act()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1(x))
        h = self.act2(h + self.conv2(h))
        return self.head(h)


def _cnn(act, bn: bool, pool: bool) -> nn.Module:
    layers = [nn.Conv2d(1, 3, 3, stride=1, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [act(), nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers.append(act())
    if pool:
        layers.append(nn.AvgPool2d(2))
        layers += [nn.Flatten(), nn.Linear(4, 5)]
    else:
        layers += [nn.Flatten(), nn.Linear(4 * 3 * 3, 5)]
    net = nn.Sequential(*layers)
    for m in net:
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


CASES = [(f"cnn-{a}-bn{int(bn)}-pool{int(pool)}", (lambda a=a, bn=bn, pool=pool:
          _cnn(ACT[a], bn, pool)), (1, 6, 6))
         for a, bn, pool in [("relu", False, False), ("relu", True, True), ("tanh", True, False),
                             ("sigmoid", False, True), ("leaky_relu", True, False)]]
CASES += [("convtranspose-relu", lambda: nn.Sequential(
    nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 3, stride=2),
    nn.ReLU(), nn.Flatten(), nn.Linear(2 * 7 * 7, 4)), (1, 6, 6))]
CASES += [(f"resmlp-{a}", (lambda a=a: ResidualMLP(5, 8, 3, ACT[a])), (5,))
          for a in ("relu", "tanh", "leaky_relu")]
CASES += [(f"rescnn-{a}", (lambda a=a: ResidualCNN(ACT[a])), (1, 6, 6)) for a in ("relu", "tanh")]


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("norm", [math.inf, 2.0])
def test_general_graph_bounds_are_sound(name, make, shape, norm) -> None:
    torch.manual_seed(len(name))
    net = make().double().eval()
    gen = torch.Generator().manual_seed(7)
    centers = torch.rand(2, *shape, generator=gen, dtype=torch.float64)
    eps = 0.05 if math.isinf(norm) else 0.3
    bounder = JacobianBounder(net, input_shape=shape)
    smooth = "tanh" in name or "sigmoid" in name
    jac = []
    for b in range(2):
        objectives = [(0, 0, 1.0), (0, 3, -1.0), (1, None, 1.0)] if smooth else None
        pts = oracle.region_points(net, centers[b], eps, norm, 800, gen, objectives)
        jac.append(oracle.jacobians(net, pts))
    jac = torch.stack(jac)
    region = bounder.region(centers, eps, norm)
    widths = {}
    for method in METHODS:
        jb = bounder.bound(region, preact="crown", method=method)
        inside = jb.contains(jac, atol=1e-10)
        assert inside.all(), f"{name} {method}: {int((~inside).sum())} points outside"
        q = {math.inf: 1.0, 2.0: 2.0}[norm]
        norms = jac.flatten(3).norm(p=q, dim=-1)
        assert (norms <= jb.lipschitz()[:, None] * (1 + 1e-9) + 1e-12).all(), f"{name} {method}"
        widths[method] = (jb.upper - jb.lower).sum().item()
    assert widths["recurjac"] <= widths["fastlip"] * (1 + 1e-12)


def test_residual_graph_recurjac_is_exact_at_a_point() -> None:
    torch.manual_seed(0)
    net = ResidualMLP(4, 6, 3, nn.Tanh).double().eval()
    x0 = torch.rand(1, 4, dtype=torch.float64)
    bounder = JacobianBounder(net, input_shape=(4,))
    jb = bounder.bound(bounder.region(x0, 0.0, "inf"))
    exact = oracle.jacobians(net, x0)
    torch.testing.assert_close(jb.lower, exact, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(jb.upper, exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("layer", "op"), [
    (nn.MaxPool2d(2), "MaxPool"), (nn.GELU(), "Erf"), (nn.SiLU(), "Mul")])
def test_unsupported_operators_are_refused_by_name(layer, op) -> None:
    """MaxPool (a selection), GELU (traced as Erf; sigma' can be negative) and SiLU (x * sigmoid
    x: a product of two branches) are refused with the node and its op, never approximated."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Flatten(),
                        nn.LazyLinear(3)).double().eval()
    net(torch.zeros(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(UnsupportedLayerError, match=rf"node.*{op}|{op}.*node"):
        JacobianBounder(net, input_shape=(1, 4, 4))
