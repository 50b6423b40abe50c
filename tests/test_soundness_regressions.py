"""Regression tests for the soundness holes of issue 7 (each failed on the code before the fix).

1. l_1 / l_2 balls when the input's first operation is not a Linear/Conv (auto_LiRPA 0.3 gave the
   input node the point interval [x0, x0]);
2. leaky ReLU with slope > 1 under CROWN-type methods (0.3's relaxation assumes slope <= 1), and
   pre-activation intervals with lower > upper accepted silently;
3. AvgPool with count_include_pad=False, ceil_mode=True, or overlapping windows;
5. rounding: J(x0) outside the bounds at eps = 0 by an ulp (float64 and float32);
6. alpha-CROWN on CNNs with two conv layers (IndexError); 7. raw auto_LiRPA exceptions.

Truth is the autograd Jacobian (torch.func, :mod:`tests.oracle`) at random points, vertices and
the center; containment is checked with no tolerance at all.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rj_plugin.api import METHODS, JacobianBounder, _checked_interval
from rj_plugin.derivatives import get_activation
from rj_plugin.errors import InputError, UnsupportedLayerError
from rj_plugin.lirpa import PREACT_METHODS
from tests import oracle


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _first_op_nets() -> dict[str, nn.Module]:
    torch.manual_seed(7)
    return {
        "normalize": nn.Sequential(Normalize(0.3, 0.7), nn.Linear(4, 8), nn.Tanh(),
                                   nn.Linear(8, 2)),
        "scale": nn.Sequential(Scale(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        "tanh-first": nn.Sequential(nn.Tanh(), nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2)),
        "relu-first": nn.Sequential(nn.ReLU(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)),
        "residual-on-input": nn.Sequential(Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh())),
                                           nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
    }


def _assert_contains(jb, jac: torch.Tensor, label: str) -> None:
    """jac ``[B, N, rows, *in]`` inside ``[jb.lower, jb.upper]`` exactly (no tolerance)."""
    lo, hi = jb.lower[:, None], jb.upper[:, None]
    excess = torch.maximum(lo - jac, jac - hi).max()
    assert excess <= 0, f"{label}: a true Jacobian lies outside the bounds by {float(excess):.3g}"


def _ball_jacobians(net: nn.Module, center: torch.Tensor, eps: float, p: float,
                    seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    points = oracle.region_points(net, center, eps, p, 400, gen)
    return oracle.jacobians(net, points)[None]


@pytest.mark.parametrize("name", list(_first_op_nets()))
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_lp_ball_with_a_nonlinear_first_op_is_sound_and_grows_with_eps(name: str,
                                                                       p: float) -> None:
    net = _first_op_nets()[name].double().eval()
    x0 = torch.rand(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bounder = JacobianBounder(net, input_shape=(4,))
    for preact in PREACT_METHODS:
        widths = []
        for eps in (1e-3, 0.5):
            jb = bounder.bound(bounder.region(x0, eps, p), preact=preact, alpha_iterations=5)
            _assert_contains(jb, _ball_jacobians(net, x0[0], eps, p, 11),
                             f"{name} p={p} {preact} eps={eps}")
            widths.append(float((jb.upper - jb.lower).mean()))
        # The bug: widths of ~1e-15 that did not move with eps (the ball seen as a point).
        assert widths[1] > 10 * widths[0] > 0, f"{name} p={p} {preact}: widths {widths}"


def test_lp_input_node_interval_is_the_enclosing_box() -> None:
    """The compat patch's contract: an l_2 ball's input node carries x0 +- eps (outwards)."""
    net = nn.Sequential(nn.Tanh(), nn.Linear(3, 2)).double()
    bounder = JacobianBounder(net, input_shape=(3,))
    x0 = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    region = bounder.region(x0, 0.25, 2)
    bounder.bound(region, preact="ibp")
    node = bounder.graph.module[bounder.graph.input_name]
    assert (node.lower <= x0 - 0.25).all() and (node.upper >= x0 + 0.25).all()
    assert (node.upper - node.lower <= 0.5 + 1e-12).all()


@pytest.mark.parametrize("slope", [1.5, 3.0])
def test_leaky_relu_with_slope_above_one(slope: float) -> None:
    torch.manual_seed(int(slope * 10))
    net = nn.Sequential(nn.Linear(4, 12), nn.LeakyReLU(slope), nn.Linear(12, 12),
                        nn.LeakyReLU(slope), nn.Linear(12, 3)).double().eval()
    x0 = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bounder = JacobianBounder(net, input_shape=(4,))
    for eps in (0.0, 0.05, 0.5):
        jac = torch.stack([_ball_jacobians(net, x0[b], eps, math.inf, 13)[0] for b in range(2)])
        for preact in PREACT_METHODS:
            for method in METHODS:
                jb = bounder.bound(bounder.region(x0, eps, math.inf), preact=preact,
                                   method=method, alpha_iterations=5)
                _assert_contains(jb, jac, f"slope {slope} eps {eps} {preact} {method}")


def test_crossing_preactivation_interval_is_refused_by_name() -> None:
    class Step:
        input_node, op = "/7", "LeakyRelu"
        activation = get_activation("leaky_relu:0.5")

    lower = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=r"lower > upper.*/7.*LeakyRelu"):
        _checked_interval(lower, lower - 0.1, Step(), "crown", 1)
    # A crossing by rounding (an ulp) is not a relaxation bug: its hull is kept.
    lo, hi = _checked_interval(lower, lower - 1e-17, Step(), "crown", 1)
    assert (lo <= hi).all()


def _pool_net(**options) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(2)
    features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(3, **options))
    shape = (1, 8, 8)
    n = features.double()(torch.zeros(1, *shape, dtype=torch.float64))[0].numel()
    return nn.Sequential(*features, nn.Flatten(), nn.Linear(n, 3), nn.ReLU(),
                         nn.Linear(3, 2)).double().eval(), shape


@pytest.mark.parametrize("options", [
    {"stride": 2, "padding": 1, "count_include_pad": False},
    {"stride": 2, "ceil_mode": True},
    {"stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False},
    {"stride": 1, "padding": 1},
    {"stride": 1},
])
def test_avgpool_options_follow_the_module(options: dict) -> None:
    net, shape = _pool_net(**options)
    x0 = torch.rand(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bounder = JacobianBounder(net, input_shape=shape)
    exact = oracle.jacobians(net, x0)[None]
    jb = bounder.bound(bounder.region(x0, 0.0, math.inf), preact="crown")
    _assert_contains(jb, exact, f"{options} at eps 0")
    assert float((jb.upper - jb.lower).max()) < 1e-12
    gen = torch.Generator().manual_seed(4)
    points = torch.cat([x0, oracle.random_points(x0[0], 0.05, math.inf, 300, gen)])
    jac = oracle.jacobians(net, points)[None]
    for preact in PREACT_METHODS:
        jb = bounder.bound(bounder.region(x0, 0.05, math.inf), preact=preact, alpha_iterations=5)
        _assert_contains(jb, jac, f"{options} {preact}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_eps_zero_contains_the_autograd_jacobian_exactly(dtype: torch.dtype,
                                                         activation: type) -> None:
    for seed in range(4):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(20, 64), activation(), nn.Linear(64, 64), activation(),
                            nn.Linear(64, 64), activation(), nn.Linear(64, 10)).to(dtype).eval()
        x0 = torch.randn(3, 20, dtype=dtype)
        bounder = JacobianBounder(net, input_shape=(20,), dtype=dtype)
        jac = oracle.jacobians(net, x0)[:, None]  # [B, 1, rows, in]
        for method in METHODS:
            jb = bounder.bound(bounder.region(x0, 0.0, math.inf), preact="crown", method=method)
            _assert_contains(jb, jac, f"{activation.__name__} {dtype} seed {seed} {method}")
            lip = jb.lipschitz()
            assert (jac[:, 0].abs().sum(-1) <= lip).all()


def test_alpha_crown_on_a_cnn_with_two_convolutions() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double().eval()
    x0 = torch.rand(2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bounder = JacobianBounder(net, input_shape=(1, 7, 7))
    region = bounder.region(x0, 0.05, math.inf)
    alpha = bounder.bound(region, preact="alpha-crown", alpha_iterations=5)
    crown = bounder.bound(region, preact="crown")
    assert (alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all()
    gen = torch.Generator().manual_seed(9)
    jac = torch.stack([oracle.jacobians(net, oracle.random_points(x0[b], 0.05, math.inf, 200,
                                                                  gen)) for b in range(2)])
    _assert_contains(alpha, jac, "alpha-crown two convs")


class _Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [-1])


class _Pad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (1, 1, 1, 1))


class _BroadcastAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


@pytest.mark.parametrize("name,net,shape,op", [
    ("conv-transpose-padding", nn.Sequential(nn.ConvTranspose2d(1, 2, 3, padding=1), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(72, 2)), (1, 6, 6),
     "ConvTranspose"),
    ("conv1d", nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
     (1, 6), "Conv"),
    ("pad", nn.Sequential(_Pad(), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(72, 2)), (1, 6, 6), "Pad"),
    ("flip", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), _Flip(), nn.Flatten(),
                           nn.Linear(32, 2)), (1, 6, 6), "Slice"),
    ("broadcast-add", nn.Sequential(_BroadcastAdd(), nn.Flatten(), nn.Linear(6, 4), nn.ReLU(),
                                    nn.Linear(4, 2)), (1, 6), "Add"),
])
def test_what_auto_lirpa_cannot_bound_is_refused_by_name(name: str, net: nn.Module,
                                                         shape: tuple, op: str) -> None:
    """Each raised a raw auto_LiRPA exception (AssertionError, IndexError, TypeError) before."""
    net = net.double().eval()
    x0 = torch.rand(1, *shape, dtype=torch.float64)
    for preact in ("ibp", "crown"):
        try:
            bounder = JacobianBounder(net, input_shape=shape)
            jb = bounder.bound(bounder.region(x0, 0.05, math.inf), preact=preact)
        except UnsupportedLayerError as exc:
            assert f"(op {op})" in str(exc), f"{name} {preact}: {exc}"
            continue
        jac = oracle.jacobians(net, oracle.random_points(x0[0], 0.05, math.inf, 200,
                                                         torch.Generator().manual_seed(0)))
        _assert_contains(jb, jac[None], f"{name} {preact}")


def test_softplus_is_bounded_by_every_method() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 10), nn.Softplus(), nn.Linear(10, 10), nn.Softplus(),
                        nn.Linear(10, 2)).double().eval()
    x0 = torch.rand(1, 4, dtype=torch.float64)
    bounder = JacobianBounder(net, input_shape=(4,))
    for eps in (0.0, 0.1, 2.0):
        jac = _ball_jacobians(net, x0[0], eps, math.inf, 21)
        for preact in PREACT_METHODS:
            jb = bounder.bound(bounder.region(x0, eps, math.inf), preact=preact,
                               alpha_iterations=5)
            _assert_contains(jb, jac, f"softplus eps {eps} {preact}")


def test_a_traced_graph_that_computes_another_function_is_refused() -> None:
    """AvgPool2d's divisor_override is lost in tracing: bounding the traced graph would bound
    another network (all bounds off by the factor 4/3)."""
    net = nn.Sequential(nn.AvgPool2d(2, divisor_override=3), nn.Flatten(),
                        nn.Linear(4, 1)).double().eval()
    with pytest.raises(UnsupportedLayerError, match="another function"):
        JacobianBounder(net, input_shape=(1, 4, 4))


class _MinusTanhMatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - torch.tanh(x @ self.weight)


@pytest.mark.parametrize("name", ["leaky-first", "eval-dropout", "batchnorm-no-affine",
                                  "unflatten", "same-and-valid-padding", "matmul-on-input"])
def test_layers_rewritten_for_tracing_are_bounded_soundly(name: str) -> None:
    """Each raised a raw exception before (alpha-CROWN with nothing to optimise before a node;
    auto_LiRPA 0.3 failing on eval dropout, affine-free BatchNorm, Unflatten, string padding,
    CROWN-IBP's spec merged into a MatMul)."""
    torch.manual_seed(1)
    nets = {
        "leaky-first": (nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(4, 3), nn.ReLU(),
                                      nn.Linear(3, 2)), (4,)),
        "eval-dropout": (nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.ReLU(),
                                       nn.Linear(6, 2)), (4,)),
        "batchnorm-no-affine": (nn.Sequential(nn.Conv2d(1, 2, 3),
                                              nn.BatchNorm2d(2, affine=False), nn.Sigmoid(),
                                              nn.Flatten(), nn.Linear(32, 2)), (1, 6, 6)),
        "matmul-on-input": (nn.Sequential(_MinusTanhMatMul(), nn.Linear(4, 3), nn.ReLU(),
                                          nn.Linear(3, 2)), (4,)),
        "unflatten": (nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(8, 2)), (16,)),
        "same-and-valid-padding": (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU(),
                                                 nn.Conv2d(2, 2, 3, padding="valid"), nn.Tanh(),
                                                 nn.Flatten(), nn.Linear(32, 2)), (1, 6, 6)),
    }
    net, shape = nets[name]
    net = net.double().eval()
    if isinstance(net[1], nn.BatchNorm2d):
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    x0 = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    bounder = JacobianBounder(net, input_shape=shape)
    gen = torch.Generator().manual_seed(8)
    jac = torch.stack([oracle.jacobians(net, torch.cat([x0[b:b + 1], oracle.random_points(
        x0[b], 0.05, math.inf, 200, gen)])) for b in range(2)])
    for preact in PREACT_METHODS:
        jb = bounder.bound(bounder.region(x0, 0.05, math.inf), preact=preact, alpha_iterations=4)
        _assert_contains(jb, jac, f"{name} {preact}")


def test_unparsed_operators_are_named() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ELU(), nn.Linear(6, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"\(op Elu\)"):
        JacobianBounder(net, input_shape=(4,))


@pytest.mark.parametrize("name", ["conv1d-strided-dilated", "avgpool1d", "batchnorm1d",
                                  "conv2d-unequal-dilation"])
def test_one_dimensional_layers_and_unequal_dilation(name: str) -> None:
    """Conv1d/AvgPool1d raised IndexError in auto_LiRPA 0.3 (they are now computed as 2-d layers
    on a height-1 image); a dilation that differs between the axes got a transposed convolution
    of the wrong size under CROWN (0.3 used the height's dilation for the width)."""
    torch.manual_seed(3)
    nets = {
        "conv1d-strided-dilated": (nn.Sequential(
            nn.Conv1d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(3, 2, 2, dilation=2),
            nn.Tanh(), nn.Flatten(), nn.Linear(4, 2)), (1, 8)),
        "avgpool1d": (nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.ReLU(),
                                    nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False),
                                    nn.Flatten(), nn.Linear(24, 2)), (2, 8)),
        "batchnorm1d": (nn.Sequential(nn.Conv1d(1, 3, 3, bias=False), nn.BatchNorm1d(3),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)), (1, 8)),
        "conv2d-unequal-dilation": (nn.Sequential(
            nn.Conv2d(1, 2, 3, dilation=(1, 2), stride=(2, 1)), nn.ReLU(), nn.Flatten(),
            nn.Linear(24, 2)), (1, 8, 8)),
    }
    net, shape = nets[name]
    net = net.double().eval()
    x0 = torch.rand(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bounder = JacobianBounder(net, input_shape=shape)
    gen = torch.Generator().manual_seed(5)
    jac = oracle.jacobians(net, torch.cat([x0, oracle.random_points(x0[0], 0.1, math.inf, 300,
                                                                    gen)]))[None]
    zero = bounder.bound(bounder.region(x0, 0.0, math.inf), preact="crown")
    _assert_contains(zero, jac[:, :1], f"{name} eps 0")
    assert float((zero.upper - zero.lower).max()) < 1e-12
    for preact in PREACT_METHODS:
        jb = bounder.bound(bounder.region(x0, 0.1, math.inf), preact=preact, alpha_iterations=4)
        _assert_contains(jb, jac, f"{name} {preact}")


def test_memory_budget_chunks_specifications_with_the_same_bounds() -> None:
    """Issue 7, item 15: per-node specifications are n x n; past the memory budget they are
    bounded in blocks of rows (and CROWN node by node) with the very same result, and a node
    that cannot fit even one row is refused with the node, the estimate and the option named."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                        nn.Tanh(), nn.Flatten(), nn.Linear(36, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double().eval()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bounder = JacobianBounder(net, input_shape=(1, 8, 8))
    region = bounder.region(x0, 0.05, math.inf)
    whole = {p: bounder.bound(region, preact=p, alpha_iterations=3)
             for p in ("crown", "crown-ibp", "alpha-crown")}
    graph = bounder.graph
    graph.memory_budget = 200_000
    assert not graph._crown_fits(bounder.preact_nodes, 2)
    assert min(graph.rows_per_call(n, 2, "CROWN") for n in bounder.preact_nodes) < 36
    for preact, reference in whole.items():
        chunked = bounder.bound(region, preact=preact, alpha_iterations=3)
        assert torch.allclose(chunked.lower, reference.lower, atol=1e-12, rtol=0), preact
        assert torch.allclose(chunked.upper, reference.upper, atol=1e-12, rtol=0), preact
    graph.memory_budget = 1000
    with pytest.raises(InputError, match=r"node .* need about .* per neuron.*preact='ibp'"):
        bounder.bound(region, preact="crown")
    assert bounder.bound(region, preact="ibp") is not None


@pytest.mark.parametrize("beta,x", [(1.0, 21.0), (2.0, 10.5), (1.0, 19.5)])
def test_softplus_above_torchs_threshold_has_derivative_one(beta: float, x: float) -> None:
    """torch's softplus is the identity above beta * x = 20 (derivative exactly 1), ONNX's (what
    tracing records) never is: sigmoid(21) = 1 - 8e-10 excluded J(x0) = 1 (outside fuzz)."""
    net = nn.Sequential(nn.Softplus(beta=beta), nn.Linear(1, 2)).double().eval()
    bounder = JacobianBounder(net, input_shape=(1,))
    x0 = torch.tensor([[x]], dtype=torch.float64)
    points = torch.linspace(x - 1.0, x + 1.0, 201, dtype=torch.float64)[:, None]
    jac = oracle.jacobians(net, points)[None]
    for eps in (0.0, 1.0):
        for preact in PREACT_METHODS:
            jb = bounder.bound(bounder.region(x0, eps, math.inf), preact=preact,
                               alpha_iterations=3)
            _assert_contains(jb, jac if eps else oracle.jacobians(net, x0)[None],
                             f"beta {beta} x {x} eps {eps} {preact}")


def test_softplus_with_another_threshold_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="threshold=1.0"):
        JacobianBounder(nn.Sequential(nn.Softplus(threshold=1.0), nn.Linear(1, 1)).double(),
                        input_shape=(1,))


class _TwoBranches(nn.Module):
    """hardtanh written as relu(z + 1) - relu(z - 1) - 1: two activations on one node, neither
    pre-activation an ancestor of the other."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z + 1) - torch.relu(z - 1) - 1


@pytest.mark.parametrize("preact", ["ibp", "crown"])
@pytest.mark.parametrize("method", ["recurjac", "linear"])
def test_parallel_activated_branches_get_bounds(preact: str, method: str) -> None:
    """Found by the outside fuzz of issue 9: IBP ran only up to the last pre-activation node,
    so the other branch had no bounds ("auto_LiRPA computed no bounds"); now both are bounded
    and the Jacobian bounds hold."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), _TwoBranches(), nn.Linear(4, 2)).double().eval()
    bounder = JacobianBounder(net, input_shape=(3,))
    x0 = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jb = bounder.bound(bounder.region(x0, 0.5), preact=preact, method=method)
    _assert_contains(jb, _ball_jacobians(net, x0[0], 0.5, math.inf, 5), f"{preact} {method}")
    assert (jb.upper - jb.lower).max() < 2.5  # not the trivial bounds


class _Standardize(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.rand(n) - 0.5)
        self.register_buffer("std", 0.5 + torch.rand(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@pytest.mark.parametrize("preact", ["ibp", "crown", "crown-ibp"])
def test_linear_on_a_batch_equals_one_input_at_a_time(preact: str) -> None:
    """Found by the outside fuzz of issue 9: with normalisation buffers before the first layer,
    auto_LiRPA 0.3's CROWN fails on batches; ``linear`` then crashed (ibp pre-activations) or
    silently dropped its lines (crown: 60 % wider).  Each input of a batch now gets the bounds
    it gets alone (up to ties between candidate lines, which rounding can break differently in
    a batch: an outside fuzz saw up to 0.3 % either way), and they hold."""
    torch.manual_seed(0)
    net = nn.Sequential(_Standardize(4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                        nn.Linear(3, 2)).double().eval()
    centers = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batched = JacobianBounder(net, input_shape=(4,))
    jb = batched.bound(batched.region(centers, 0.3), preact=preact, method="linear")
    for b in range(3):
        alone = JacobianBounder(net, input_shape=(4,))
        one = alone.bound(alone.region(centers[b:b + 1], 0.3), preact=preact, method="linear")
        width_batched = float((jb.upper[b] - jb.lower[b]).sum())
        width_alone = float((one.upper[0] - one.lower[0]).sum())
        assert abs(width_batched - width_alone) <= 1e-2 * width_alone
        truth = _ball_jacobians(net, centers[b], 0.3, math.inf, b)
        _assert_contains(one, truth, f"alone {b}")
        lo, hi = jb.lower[b][None, None], jb.upper[b][None, None]
        assert (truth >= lo).all() and (truth <= hi).all()


class _SharedInput(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) * 0.5 + torch.sigmoid(z)


@pytest.mark.parametrize("batch", [1, 2])
def test_two_activations_reading_one_node_under_linear(batch: int) -> None:
    """Found by the second outside fuzz: tanh(z) * 0.5 + sigmoid(z) (both activations read the
    same node) crashed ``linear`` (the node's forward values were collected twice)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), _SharedInput(), nn.Linear(4, 2)).double().eval()
    bounder = JacobianBounder(net, input_shape=(3,))
    centers = torch.randn(batch, 3, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    jb = bounder.bound(bounder.region(centers, 0.4), method="linear")
    for b in range(batch):
        truth = _ball_jacobians(net, centers[b], 0.4, math.inf, b)
        assert (truth >= jb.lower[b][None, None]).all() and (truth <= jb.upper[b][None, None]).all()
