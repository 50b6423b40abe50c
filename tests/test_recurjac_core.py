"""The bound algorithms as pure tensor functions (no auto_LiRPA): closed forms and invariances."""

from __future__ import annotations

import pytest
import torch

from rj_plugin import recurjac as rj
from rj_plugin.derivatives import get_activation

DT = torch.float64


def _random_net(sizes, batch, gen, act="relu", spread=1.0):
    """Weights plus derivative ranges from random pre-activation intervals."""
    weights = [torch.randn(sizes[i + 1], sizes[i], generator=gen, dtype=DT) / sizes[i] ** 0.5
               for i in range(len(sizes) - 1)]
    rule = get_activation(act)
    g_lo, g_hi = [], []
    for n in sizes[1:-1]:
        mid = torch.randn(batch, n, generator=gen, dtype=DT)
        rad = torch.rand(batch, n, generator=gen, dtype=DT) * spread
        lo, hi = rule.bounds(mid - rad, mid + rad)
        g_lo.append(lo)
        g_hi.append(hi)
    return rj.JacobianDAG.chain(weights, g_lo, g_hi)


def _sample_products(net, n, gen):
    """Jacobians for derivative values drawn inside the ranges (and at their corners):
    the bounds hold for every choice, so these must lie inside them.  ``[B, n, c, d]``."""
    m = net.depth
    out = []
    for _ in range(n):
        # forward accumulation over the DAG: dz_t/dx = sum_s A_{t<-s} S_s dz_s/dx
        dh = {0: torch.eye(net.n_in, dtype=DT).expand(net.batch, -1, -1)}
        for t in range(1, m + 1):
            dz = sum(a @ dh[s] for (s, t2), a in net.edges.items() if t2 == t)
            if t == m:
                out.append(dz)
                break
            u = torch.rand(net.g_lo[t - 1].shape, generator=gen, dtype=DT)
            u = torch.where(u < 0.25, 0.0, torch.where(u > 0.75, 1.0, u))
            s_t = net.g_lo[t - 1] + u * (net.g_hi[t - 1] - net.g_lo[t - 1])
            dh[t] = s_t[:, :, None] * dz
    return torch.stack(out, 1)


@pytest.mark.parametrize("act", ["relu", "tanh", "leaky_relu:0.2"])
@pytest.mark.parametrize("sizes", [[3, 4, 2], [5, 8, 8, 3], [4, 6, 7, 5, 6, 2]])
def test_bounds_contain_every_derivative_choice(act, sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    net = _random_net(sizes, 3, gen, act)
    samples = _sample_products(net, 3000, gen)
    for name, (lo, hi) in {
        "recurjac": (lambda b: (b.lower[0], b.upper[0]))(rj.recurjac_backward(net)),
        "recurjac-raw": (lambda b: (b.lower[0], b.upper[0]))(
            rj.recurjac_backward(net, intersect=False)),
        "fastlip": (lambda b: (b.lower[0], b.upper[0]))(rj.fastlip_backward(net)),
        "interval": rj.interval_forward(net),
    }.items():
        assert (samples >= lo[:, None] - 1e-12).all(), name
        assert (samples <= hi[:, None] + 1e-12).all(), name


def test_one_hidden_layer_is_exact():
    """J = W2 diag(s) W1 with independent s_r in [g_lo, g_hi]: each entry's exact range is
    sum_r of the range of W2[j,r] s_r W1[r,k] (spec 3.1), and every method attains it."""
    gen = torch.Generator().manual_seed(1)
    net = _random_net([4, 6, 3], 2, gen, "tanh", spread=2.0)
    w1, w2 = net.edges[(0, 1)], net.edges[(1, 2)]
    prod = w2[:, :, None] * w1[None]  # [c, n, d]
    g_lo, g_hi = net.g_lo[0][:, None, :, None], net.g_hi[0][:, None, :, None]
    exact_hi = torch.maximum(prod * g_lo, prod * g_hi).sum(2)
    exact_lo = torch.minimum(prod * g_lo, prod * g_hi).sum(2)
    for b in (rj.recurjac_backward(net), rj.fastlip_backward(net)):
        torch.testing.assert_close(b.upper[0], exact_hi, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(b.lower[0], exact_lo, rtol=1e-13, atol=1e-13)
    lo, hi = rj.interval_forward(net)
    torch.testing.assert_close(hi, exact_hi, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lo, exact_lo, rtol=1e-13, atol=1e-13)


def test_exact_derivatives_collapse_to_the_product():
    gen = torch.Generator().manual_seed(2)
    net = _random_net([5, 7, 7, 7, 3], 2, gen, "tanh", spread=0.0)
    jac = _sample_products(net, 1, gen)[:, 0]
    for b in (rj.recurjac_backward(net), rj.fastlip_backward(net)):
        torch.testing.assert_close(b.lower[0], jac, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.upper[0], jac, rtol=1e-12, atol=1e-12)


def test_chunking_and_batching_do_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    net = _random_net([6, 9, 8, 7, 4], 3, gen, "relu", spread=1.5)
    whole = rj.recurjac_backward(net)
    tiny = rj.recurjac_backward(net, max_elements=1)
    torch.testing.assert_close(whole.upper[0], tiny.upper[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(whole.lower[0], tiny.lower[0], rtol=0, atol=1e-14)
    for b in range(3):
        one = rj.JacobianDAG(net.edges, [g[b:b + 1] for g in net.g_lo],
                             [g[b:b + 1] for g in net.g_hi])
        single = rj.recurjac_backward(one)
        torch.testing.assert_close(single.upper[0][0], whole.upper[0][b], rtol=0, atol=1e-14)


def test_recursion_is_no_looser_than_fastlip_even_without_intersection():
    """Observed property of the raw recursion on random nets (the default intersects anyway)."""
    gen = torch.Generator().manual_seed(4)
    for trial in range(20):
        depth = 3 + trial % 4
        sizes = [5] + [int(w) for w in torch.randint(3, 12, (depth - 1,), generator=gen)] + [3]
        net = _random_net(sizes, 2, gen, ["relu", "tanh"][trial % 2], spread=1.0)
        raw = rj.recurjac_backward(net, intersect=False)
        fl = rj.fastlip_backward(net)
        assert (raw.upper[0] <= fl.upper[0] + 1e-12).all()
        assert (raw.lower[0] >= fl.lower[0] - 1e-12).all()


def test_merged_row_bound_is_sound_and_no_worse_than_the_fixed_sum():
    gen = torch.Generator().manual_seed(5)
    net = _random_net([6, 10, 10, 4], 2, gen, "relu", spread=0.6)
    b = rj.recurjac_backward(net)
    lo, hi = b.lower[0], b.upper[0]
    signs = (lo > 0).to(DT) - (hi < 0).to(DT)
    merged = rj.merged_row_upper(net, b, signs, "recurjac")
    fixed = (torch.maximum(lo.abs(), hi.abs()) * (signs != 0)).sum(-1)
    assert (merged <= fixed + 1e-12).all()
    samples = _sample_products(net, 2000, gen)
    assert ((samples * signs[:, None]).sum(-1) <= merged[:, None] + 1e-12).all()


def _random_dag(sizes, batch, gen, skips, act="relu"):
    """A chain over ``sizes`` plus skip edges ``(s, t)`` (residual connections)."""
    chain = _random_net(sizes, batch, gen, act)
    edges = dict(chain.edges)
    for s, t in skips:
        edges[(s, t)] = torch.randn(sizes[t], sizes[s], generator=gen, dtype=DT) / sizes[s] ** .5
    return rj.JacobianDAG(edges, chain.g_lo, chain.g_hi)


@pytest.mark.parametrize("skips", [[(0, 2)], [(0, 3), (1, 3)], [(0, 4), (1, 3), (2, 4), (0, 2)]])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_dag_bounds_contain_every_derivative_choice(skips, act):
    """Residual / multi-branch graphs: the Jacobian is a sum over paths."""
    gen = torch.Generator().manual_seed(len(skips))
    net = _random_dag([4, 7, 6, 5, 3], 2, gen, skips, act)
    samples = _sample_products(net, 3000, gen)
    rjb, flb = rj.recurjac_backward(net), rj.fastlip_backward(net)
    raw = rj.recurjac_backward(net, intersect=False)
    for name, (lo, hi) in {"recurjac": (rjb.lower[0], rjb.upper[0]),
                           "raw": (raw.lower[0], raw.upper[0]),
                           "fastlip": (flb.lower[0], flb.upper[0]),
                           "interval": rj.interval_forward(net)}.items():
        assert (samples >= lo[:, None] - 1e-12).all(), name
        assert (samples <= hi[:, None] + 1e-12).all(), name
    assert (rjb.upper[0] - rjb.lower[0] <= flb.upper[0] - flb.lower[0] + 1e-12).all()
    signs = (rjb.lower[0] > 0).to(DT) - (rjb.upper[0] < 0).to(DT)
    merged = rj.merged_row_upper(net, rjb, signs, "recurjac")
    assert ((samples * signs[:, None]).sum(-1) <= merged[:, None] + 1e-12).all()


def test_dag_with_exact_derivatives_is_the_sum_over_paths():
    gen = torch.Generator().manual_seed(9)
    net = _random_dag([3, 5, 5, 2], 2, gen, [(0, 2), (1, 3), (0, 3)], "tanh")
    net = rj.JacobianDAG(net.edges, net.g_hi, net.g_hi)  # every derivative known exactly
    exact = _sample_products(net, 1, gen)[:, 0]
    for b in (rj.recurjac_backward(net), rj.fastlip_backward(net)):
        torch.testing.assert_close(b.lower[0], exact, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.upper[0], exact, rtol=1e-12, atol=1e-12)
