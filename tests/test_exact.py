"""The exact local Lipschitz constant (MILP, scipy's HiGHS) against brute-force enumeration.

The oracle enumerates every activation pattern of a tiny ReLU MLP, keeps those some point of the
region realises (a linear program per pattern: with the pattern fixed, every pre-activation is
affine in x; z >= 0 where active, z <= 0 where inactive, ties allowed as in Clarke's Jacobian),
and takes the largest dual norm of W_3 D_2 W_2 D_1 W_1 among them.  It shares nothing with
``rj_plugin.exact`` but the definition.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from rj_plugin import exact_lipschitz
from rj_plugin.api import JacobianBounder
from rj_plugin.errors import InputError, UnsupportedLayerError


def _mlp(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double().eval()


def _region_lp(x0: np.ndarray, eps: float, p: float) -> tuple[np.ndarray, np.ndarray, list]:
    """Variables v = [x, d+, d-] (l_1) or v = x (l_inf): equality rows and bounds."""
    n = x0.size
    if math.isinf(p):
        return np.zeros((0, n)), np.zeros(0), [(x0[k] - eps, x0[k] + eps) for k in range(n)]
    a_eq = np.hstack([np.eye(n), -np.eye(n), np.eye(n)])
    bounds = [(None, None)] * n + [(0, None)] * (2 * n)
    return a_eq, x0.copy(), bounds


def _enumerate(net: nn.Sequential, x0: np.ndarray, eps: float, p: float) -> np.ndarray:
    """Exact max over realisable patterns of the dual norm of each gradient row."""
    weights = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in net
               if isinstance(m, nn.Linear)]
    hidden = [w.shape[0] for w, _ in weights[:-1]]
    n = x0.size
    a_eq, b_eq, bounds = _region_lp(x0, eps, p)
    extra = a_eq.shape[1] - n
    q = 1.0 if math.isinf(p) else math.inf
    best = np.zeros(weights[-1][0].shape[0])
    for bits in itertools.product((0, 1), repeat=sum(hidden)):
        masks, start = [], 0
        for w in hidden:
            masks.append(np.array(bits[start:start + w], dtype=float))
            start += w
        # pre-activation of each hidden layer as an affine map of x: z = M x + c
        m_aff, c_aff = np.eye(n), np.zeros(n)
        rows, rhs = [], []
        for (w, b), mask in zip(weights[:-1], masks, strict=True):
            z_m, z_c = w @ m_aff, w @ c_aff + b
            sign = np.where(mask > 0, -1.0, 1.0)  # active: -z <= 0; inactive: z <= 0
            rows.append(sign[:, None] * z_m)
            rhs.append(-sign * z_c)
            m_aff, c_aff = mask[:, None] * z_m, mask * z_c
        a_ub = np.hstack([np.vstack(rows), np.zeros((sum(hidden), extra))])
        b_ub = np.concatenate(rhs)
        if not math.isinf(p):
            a_ub = np.vstack([a_ub, np.concatenate([np.zeros(n), np.ones(2 * n)])[None]])
            b_ub = np.concatenate([b_ub, [eps]])
        res = linprog(np.zeros(a_ub.shape[1]), A_ub=a_ub, b_ub=b_ub,
                      A_eq=a_eq if a_eq.size else None, b_eq=b_eq if a_eq.size else None,
                      bounds=bounds, method="highs")
        if res.status != 0:
            continue
        jac = weights[-1][0]
        for (w, _), mask in zip(weights[-2::-1], masks[::-1], strict=True):
            jac = (jac * mask) @ w
        best = np.maximum(best, np.linalg.norm(jac, ord=q, axis=1))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [math.inf, 1.0])
def test_exact_equals_enumeration_and_sits_between_sampling_and_recurjac(seed: int,
                                                                         p: float) -> None:
    net = _mlp(seed, (3, 5, 4, 2))
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, 3, dtype=torch.float64, generator=gen)
    eps = 0.6
    truth = _enumerate(net, x0[0].numpy(), eps, p)
    ex = exact_lipschitz(net, x0, eps, p)
    assert all(s == "optimal" for s in ex.status[0])
    assert np.allclose(ex.upper[0].numpy(), truth, rtol=1e-6, atol=1e-9), (ex.upper, truth)
    assert np.allclose(ex.lower[0].numpy(), truth, rtol=1e-6, atol=1e-9)
    bounder = JacobianBounder(net, input_shape=(3,))
    recurjac = bounder.bound(bounder.region(x0, eps, p)).lipschitz()[0]
    assert (ex.upper[0] <= recurjac * (1 + 1e-9)).all()
    assert sum(ex.binaries) > 0  # the case has unstable neurons: the program is not trivial


def test_exact_rows_of_a_specification_on_a_box() -> None:
    net = _mlp(7, (2, 4, 4, 3))
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    lower = torch.tensor([[0.0, -0.5]], dtype=torch.float64)
    upper = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    ex = exact_lipschitz(net, lower=lower, upper=upper, C=C)
    spec_net = nn.Sequential(*net, nn.Linear(3, 2, bias=False)).double()
    spec_net[-1].weight.data = C.clone()
    gen = torch.Generator().manual_seed(0)
    xs = lower + (upper - lower) * torch.rand(20000, 2, dtype=torch.float64, generator=gen)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: spec_net(z[None])[0]))(xs)
    sampled = jac.abs().sum(-1).max(0).values
    # the exact value is attained: dense sampling of a 2-d box gets within a few percent of it
    assert (ex.upper[0] >= sampled - 1e-9).all() and (ex.upper[0] <= sampled * 1.05 + 1e-9).all()
    assert ex.upper.shape == (1, 2)


def test_exact_refuses_what_it_cannot_solve() -> None:
    x0 = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match="ReLU networks only"):
        exact_lipschitz(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double(),
                        x0, 0.1)
    net = _mlp(0, (3, 5, 2))
    with pytest.raises(InputError, match="l_2 ball is not"):
        exact_lipschitz(net, x0, 0.1, 2)
    with pytest.raises(InputError, match="binary variables, over the limit of 1"):
        exact_lipschitz(net, x0, 5.0, "inf", max_binaries=1)
