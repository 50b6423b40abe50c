"""The chord relaxation (``method="linear"``), the joint norm bounds and ``local_lipschitz``.

Soundness of ``linear`` on the widened generators (input ops first, residual blocks, convolutions,
every activation) is part of ``tests/test_soundness_families.py`` (it loops over every method);
here: the relaxation itself, that ``linear`` is never looser than RecurJac and is tighter where it
should be, every Lipschitz candidate against sampled and ascended gradient norms, and the
refinement against the exact constant (MILP) on small ReLU nets.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from rj_plugin import bound_jacobian, exact_lipschitz
from rj_plugin.errors import UnsupportedLayerError
from rj_plugin.lipschitz import abs_chord, square_chord
from rj_plugin.recurjac import BackwardBounds, JacobianDAG, _sweep_coefficients
from rj_plugin.refine import local_lipschitz
from tests import oracle

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky": lambda: nn.LeakyReLU(0.1),
        "softplus": nn.Softplus}


class Normalize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def _net(kind: str, act: str, n_in: int = 6, width: int = 12, depth: int = 3) -> nn.Module:
    a = ACTS[act]
    layers: list[nn.Module] = []
    if kind == "normalize":
        layers.append(Normalize(torch.rand(n_in) - 0.5, 0.3 + torch.rand(n_in)))
    if kind == "residual-first":
        layers += [Residual(nn.Sequential(nn.Linear(n_in, n_in), a(), nn.Linear(n_in, n_in)))]
    if kind == "act-first":
        layers.append(a())
    sizes = [n_in] + [width] * (depth - 1)
    for i in range(depth - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), a()]
    layers.append(nn.Linear(sizes[-1], 3))
    return nn.Sequential(*layers).double().eval()


def test_chord_coefficients_bound_every_product() -> None:
    """For D in [L, U], sigma' in [a, b] and any w: D sigma' w <= (fold * D + worst) * w with the
    coefficients picked by the sign of w; checked on a grid of D and sigma' values."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    d_lo = torch.randn(1, 1, n, generator=gen, dtype=torch.float64)
    d_hi = d_lo + torch.rand(1, 1, n, generator=gen, dtype=torch.float64) * 2
    g_lo = torch.rand(1, n, generator=gen, dtype=torch.float64) - 0.2  # some negative derivatives
    g_hi = g_lo + torch.rand(1, n, generator=gen, dtype=torch.float64)
    g_hi[0, :20] = g_lo[0, :20]  # exactly known derivatives
    net = JacobianDAG({(0, 1): torch.zeros(n, 1, dtype=torch.float64),
                       (1, 2): torch.zeros(1, n, dtype=torch.float64)}, [g_lo], [g_hi])
    bounds = BackwardBounds([None, d_lo], [None, d_hi])
    fold_pos, fold_neg, worst_pos, worst_neg = (c[0, 0, 0] for c in _sweep_coefficients(
        net, bounds, 1, linear=True))
    t = torch.linspace(0, 1, 41, dtype=torch.float64)[:, None]
    d = d_lo[0, 0] + t * (d_hi - d_lo)[0, 0]  # [41, n]
    for s in torch.linspace(0, 1, 11, dtype=torch.float64):
        sig = g_lo[0] + s * (g_hi - g_lo)[0]
        prod = d * sig
        assert (prod <= fold_pos * d + worst_pos + 1e-12).all()  # w = +1
        assert (-prod <= -(fold_neg * d + worst_neg) + 1e-12).all()  # w = -1


@pytest.mark.parametrize("kind", ["plain", "normalize", "residual-first", "act-first"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("norm", ["inf", 2, 1])
def test_linear_sound_and_never_looser_than_recurjac(kind: str, act: str, norm) -> None:
    torch.manual_seed(zlib.crc32(f"{kind}-{act}-{norm}".encode()))
    net = _net(kind, act)
    x0 = torch.rand(2, 6, dtype=torch.float64)
    eps = {"inf": 0.15, 2: 0.3, 1: 0.5}[norm]
    rj = bound_jacobian(net, x0, eps, norm=norm)
    lin = bound_jacobian(net, x0, eps, norm=norm, method="linear")
    assert (lin.lower >= rj.lower).all() and (lin.upper <= rj.upper).all()
    p = math.inf if norm == "inf" else float(norm)
    gen = torch.Generator().manual_seed(1)
    for b in range(2):
        objectives = [(j, None, 1.0) for j in range(3)] + [(0, 0, 1.0), (1, 2, -1.0)]
        pts = oracle.region_points(net, x0[b], eps, p, 300, gen, objectives)
        jac = oracle.jacobians(net, pts).detach()
        assert (jac >= lin.lower[b] - 1e-10).all() and (jac <= lin.upper[b] + 1e-10).all()
        q = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[p]
        norms = jac.norm(p=q, dim=-1).amax(0)
        for name, value in lin.lipschitz_candidates().items():
            assert (norms <= value[b] + 1e-10).all(), name
        for name, value in rj.lipschitz_candidates().items():
            assert (norms <= value[b] + 1e-10).all(), name


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_linear_tightens_relu_and_tanh_nets(act: str) -> None:
    """On nets with many unsigned partial derivatives the chord is strictly tighter."""
    torch.manual_seed(0)
    net = _net("plain", act, n_in=10, width=20)
    x0 = torch.rand(1, 10, dtype=torch.float64)
    rj = bound_jacobian(net, x0, 0.3)
    lin = bound_jacobian(net, x0, 0.3, method="linear")
    assert float((lin.upper - lin.lower).mean()) < 0.9 * float((rj.upper - rj.lower).mean())
    assert (lin.lipschitz() < rj.lipschitz()).all()


def test_norm_chords_bound_the_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    lo = torch.randn(1, 2, 7, generator=gen, dtype=torch.float64)
    hi = lo + 2 * torch.rand(1, 2, 7, generator=gen, dtype=torch.float64)
    lo[0, 0, 0] = hi[0, 0, 0] = 0.0
    pts = lo + (hi - lo) * torch.rand(5000, 2, 7, generator=gen, dtype=torch.float64)
    pts = torch.cat([pts, lo, hi])
    w, c = abs_chord(lo, hi)
    assert (pts.abs().sum(-1) <= (pts * w).sum(-1) + c + 1e-12).all()
    w, c = square_chord(lo, hi)
    assert (pts.square().sum(-1) <= (pts * w).sum(-1) + c + 1e-12).all()


def test_joint_norm_is_active_somewhere() -> None:
    """The joint bound is below the element-wise one on a random tanh net (l_inf and l_2)."""
    torch.manual_seed(1)
    net = _net("plain", "tanh", n_in=10, width=20)
    x0 = torch.rand(1, 10, dtype=torch.float64)
    for norm in ("inf", 2):
        cand = bound_jacobian(net, x0, 0.3, norm=norm).lipschitz_candidates()
        assert (cand["joint"] < cand["elementwise"]).any()


@pytest.mark.parametrize("branching", ["input", "auto"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", ["inf", 1])
def test_local_lipschitz_brackets_the_exact_constant(seed: int, norm, branching: str) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                        nn.Linear(8, 2)).double()
    x0 = torch.rand(1, 4, dtype=torch.float64)
    eps = 0.2 if norm == "inf" else 0.4
    exact = exact_lipschitz(net, x0, eps, norm=norm)
    assert all(s == "optimal" for s in exact.status[0])
    ref = local_lipschitz(net, x0, eps, norm=norm, time_limit=3.0, branching=branching)
    assert (ref.upper >= exact.lower - 1e-7).all()
    assert (ref.lower <= exact.upper + 1e-7).all()
    assert (ref.upper <= ref.first_upper + 1e-12).all()
    # refinement makes progress: the gap is smaller than the first pass leaves it (boxes that
    # cover an l_1 ball are looser than the ball at first, so input splitting needs longer)
    if norm == "inf" or branching == "auto":
        assert (ref.upper - ref.lower).sum() < (ref.first_upper - ref.lower).sum() or (
            ref.gap <= 1e-3).all()


def test_local_lipschitz_converges_on_a_small_net() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    ref = local_lipschitz(net, x0, 0.5, time_limit=20.0, rel_gap=1e-3, branching="input")
    assert ref.status == ["gap"] and ref.certified_by == [["bounds"]]
    exact = exact_lipschitz(net, x0, 0.5)
    assert float(ref.lower[0, 0]) <= float(exact.upper[0, 0]) + 1e-7
    assert float(ref.upper[0, 0]) >= float(exact.lower[0, 0]) - 1e-7
    assert float(ref.upper[0, 0]) <= 1.001 * float(exact.upper[0, 0]) + 1e-9


def test_neuron_branching_reaches_the_exact_constant() -> None:
    """HiGHS's branch and bound over the activation binaries closes the gap on a small ReLU net
    (the MILP's tolerance margin aside), where input splitting alone is still far."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                        nn.Linear(20, 3)).double()
    x0 = torch.rand(1, 10, dtype=torch.float64)
    exact = exact_lipschitz(net, x0, 0.1)
    ref = local_lipschitz(net, x0, 0.1, time_limit=10.0, branching="neuron")
    assert ref.status == ["gap"] and ref.certified_by == [["milp"] * 3]
    assert (ref.upper >= exact.upper).all() and (ref.upper <= exact.upper * 1.001).all()
    assert (ref.lower <= exact.upper + 1e-7).all()


def test_neuron_branching_refuses_smooth_nets() -> None:
    net = _net("plain", "tanh")
    with pytest.raises(UnsupportedLayerError, match="ReLU|relu"):
        local_lipschitz(net, torch.rand(1, 6, dtype=torch.float64), 0.1, time_limit=1.0,
                        branching="neuron")


def test_local_lipschitz_l2_ball_and_tanh() -> None:
    """Sub-boxes of an l_2 ball's enclosing box: upper above every sampled gradient norm."""
    torch.manual_seed(4)
    net = _net("normalize", "tanh", n_in=3, width=8)
    x0 = torch.rand(1, 3, dtype=torch.float64)
    ref = local_lipschitz(net, x0, 0.4, norm=2, time_limit=2.0)
    pts = oracle.region_points(net, x0[0], 0.4, 2.0, 2000, torch.Generator().manual_seed(0),
                               [(j, None, 1.0) for j in range(3)])
    norms = oracle.jacobians(net, pts).detach().norm(dim=-1).amax(0)
    assert (norms <= ref.upper[0] + 1e-10).all()
    at_center = oracle.jacobians(net, x0).detach().norm(dim=-1)[0]
    assert (ref.lower[0] >= at_center - 1e-12).all() and (ref.lower[0] <= ref.upper[0]).all()


@pytest.mark.parametrize("norm", ["inf", 2])
def test_linked_lines_hold_after_input_normalisation(norm) -> None:
    """auto_LiRPA 0.3's A dictionary misses the constants of ``(x - mean) / std`` in its biases
    (lines off by 0.3 before the workaround); the offsets recomputed from the concretised bounds
    keep every line on the right side of z at sampled points of the region."""
    torch.manual_seed(0)
    net = nn.Sequential(Normalize(torch.rand(4) - 0.5, 0.3 + torch.rand(4)), nn.Linear(4, 6),
                        nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    from rj_plugin import JacobianBounder

    bounder = JacobianBounder(net, input_shape=(4,))
    x0 = torch.rand(1, 4, dtype=torch.float64)
    p = math.inf if norm == "inf" else 2.0
    region = bounder.region(x0, 0.1, norm)
    bounder.bound(region, method="linear")
    linked = bounder._linked_preactivations(region)
    assert set(linked.nodes) == {1, 2}
    xs = oracle.region_points(net, x0[0], 0.1, p, 500, torch.Generator().manual_seed(0))
    z1 = net[1](net[0](xs))
    z2 = net[3](torch.tanh(z1))
    for t, z in ((1, z1), (2, z2)):
        l_a, l_b, u_a, u_b = linked.nodes[t][:4]
        assert (xs @ l_a[0].T + l_b[0] <= z + 1e-12).all()
        assert (z <= xs @ u_a[0].T + u_b[0] + 1e-12).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"branching": "neurons"}, "unknown branching"),
    ({"method": "interval"}, "method"),
    ({"rel_gap": -1.0}, "rel_gap"),
    ({"time_limit": 0.0}, "time_limit"),
    ({"preact": "crown-x"}, "pre-activation"),
])
def test_local_lipschitz_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    from rj_plugin.errors import InputError

    net = _net("plain", "relu")
    with pytest.raises(InputError, match=message):
        local_lipschitz(net, torch.rand(1, 6, dtype=torch.float64), 0.1, **kwargs)


def _preactivations(bounder, xs: torch.Tensor) -> list[torch.Tensor]:
    """z_t(x) of every activation at points ``xs [N, n]``: ``[N, n_t]`` each."""
    module = bounder.graph.module
    module(xs)
    return [module[a.input_node].forward_value.reshape(xs.shape[0], -1)
            for a in bounder.jacobian_graph.activations]


@pytest.mark.parametrize("kind", ["plain", "normalize", "residual-first", "act-first", "mixed"])
@pytest.mark.parametrize("norm", ["inf", 2])
def test_joint_back_substitution_bounds_sampled_preactivations(kind: str, norm) -> None:
    """const + X . x from the joint back-substitution bounds sum_t k_t . z_t(x) from above at
    random points, vertices and points of gradient ascent on that sum, for random coefficients
    k_t on every smooth node (input ops and residual blocks first; ``mixed``: a ReLU layer below
    the tanh ones, relaxed by its own lines)."""
    from rj_plugin import JacobianBounder
    from rj_plugin.recurjac import _joint_back_substitution

    torch.manual_seed(zlib.crc32(f"{kind}{norm}".encode()))
    if kind == "mixed":
        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                            nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 2)).double().eval()
    else:
        net = _net(kind, "tanh", n_in=5, width=8, depth=3)
    bounder = JacobianBounder(net, input_shape=(5,))
    p = math.inf if norm == "inf" else 2.0
    x0 = torch.rand(1, 5, dtype=torch.float64)
    eps = 0.4
    region = bounder.region(x0, eps, norm)
    dag = bounder.bound(region, method="linear")._net
    forward = dag.linked.forward
    assert forward is not None and dag.linked.nodes
    k_z = {t: torch.randn(1, 1, 8, dag.sizes[t], dtype=torch.float64) for t in dag.linked.nodes}
    const, coef_x, _ = _joint_back_substitution(dag, k_z)
    acts = bounder.jacobian_graph.activations

    def value(xs: torch.Tensor) -> torch.Tensor:  # [N, 8]: sum_t k_t . z_t(x)
        zs = _preactivations(bounder, xs)
        return sum(zs[t - 1] @ k[0, 0].T for t, k in k_z.items())

    gen = torch.Generator().manual_seed(0)
    xs = oracle.region_points(net, x0[0], eps, p, 400, gen)
    x = oracle.random_points(x0[0], eps, p, 8, gen).requires_grad_(True)
    for _ in range(30):  # ascent on each of the 8 sums
        with torch.enable_grad():
            (g,) = torch.autograd.grad(value(x).diagonal().sum(), x)
        step = g.sign() if norm == "inf" else g / g.norm(dim=1, keepdim=True)
        x = oracle.project(x.detach() + 0.1 * eps * step, x0[0], eps, p).requires_grad_(True)
    xs = torch.cat([xs, x.detach()])
    with torch.no_grad():
        bound = const[0, 0] + xs @ coef_x[0, 0].T  # [N, 8]
        assert (value(xs) <= bound + 1e-10).all()
    assert len(acts) >= 2


def test_joint_back_substitution_tightens_and_is_kept() -> None:
    """On a two-layer tanh net the joint back-substitution wins on some entries over CROWN's
    lines of each z (a single linear bound over the whole graph chooses the relaxation of the
    first layer with the summed coefficients), and the linked sweep keeps the smaller."""
    from rj_plugin import JacobianBounder
    from rj_plugin.recurjac import _start_vectors, linked_upper_sweep

    torch.manual_seed(3)
    net = _net("plain", "tanh", n_in=6, width=16, depth=3)
    bounder = JacobianBounder(net, input_shape=(6,))
    jb = bounder.bound(bounder.region(torch.rand(1, 6, dtype=torch.float64), 0.3),
                       method="linear")
    dag, back = jb._net, jb._backward
    with_joint = linked_upper_sweep(dag, back, _start_vectors(dag, 0, slice(0, 6)))
    dag.linked.forward, saved = None, dag.linked.forward
    crown_only = linked_upper_sweep(dag, back, _start_vectors(dag, 0, slice(0, 6)))
    dag.linked.forward = saved
    assert (with_joint <= crown_only).all()
    assert (with_joint < crown_only - 1e-9).any()
