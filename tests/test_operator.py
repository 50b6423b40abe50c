"""JacobianOf and the registered rj_plugin::Jacobian bound operator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rj_plugin
from rj_plugin import JacobianOf, compat
from rj_plugin.lirpa import auto_LiRPA  # imported through the compatibility layer
from rj_plugin.models import build_mlp
from tests import oracle

BoundedModule, BoundedTensor = auto_LiRPA.BoundedModule, auto_LiRPA.BoundedTensor
PerturbationLpNorm = auto_LiRPA.PerturbationLpNorm
bound_op_map = auto_LiRPA.bound_op_map.bound_op_map
DT = torch.float64


class MarginJacobian(nn.Module):
    """Something after the node: directional derivatives C @ J, and |J| summed (a Lipschitz
    bound of each output row for l_inf)."""

    def __init__(self, net: nn.Module, direction: torch.Tensor, what: str) -> None:
        super().__init__()
        self.jac = JacobianOf(net)
        self.register_buffer("direction", direction)
        self.what = what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = self.jac(x)  # [B, c, d]
        if self.what == "abs-sum":
            return j.abs().sum(-1)
        return (j * self.direction).sum(-1)  # a JVP along a fixed direction


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(3)
    return build_mlp(4, [10, 10], 3, "tanh").to(DT).eval()


def test_importing_the_package_registers_the_operator() -> None:
    assert "rj_plugin::Jacobian" in bound_op_map
    assert "JacobianOP" not in str(bound_op_map.get("rj_plugin::Jacobian"))


def test_forward_is_the_autograd_jacobian(net) -> None:
    x = torch.rand(3, 4, dtype=DT)
    torch.testing.assert_close(JacobianOf(net)(x), oracle.jacobians(net, x))


@pytest.mark.parametrize("norm", [math.inf, 2.0])
@pytest.mark.parametrize("preact", ["crown", "ibp", "alpha-crown"])
def test_operator_route_equals_bound_jacobian(net, norm, preact) -> None:
    x0 = torch.rand(2, 4, dtype=DT)
    bm = BoundedModule(JacobianOf(net), x0, bound_opts={"recurjac": {"preact": preact}})
    assert any(type(n).__name__ == "BoundRecurJacobian" for n in bm._modules.values())
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=norm, eps=0.1))
    lb, ub = bm.compute_bounds(x=(bx,), method="IBP")
    jb = rj_plugin.bound_jacobian(net, x0, eps=0.1, norm=norm, preact=preact)
    assert torch.equal(lb, jb.lower) and torch.equal(ub, jb.upper)


@pytest.mark.parametrize("method", ["IBP", "CROWN", "alpha-CROWN"])
@pytest.mark.parametrize("what", ["abs-sum", "jvp"])
def test_mixing_with_lirpa_after_the_node_is_sound(net, method, what) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    direction = torch.randn(4, generator=gen, dtype=DT)
    model = MarginJacobian(net, direction, what).eval()
    bm = BoundedModule(model, x0)
    eps = 0.15
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=eps))
    lb, ub = bm.compute_bounds(x=(bx,), method=method)
    for b in range(2):
        pts = oracle.region_points(net, x0[b], eps, math.inf, 1500, gen,
                                   [(0, 0, 1.0), (1, None, 1.0)])
        with torch.no_grad():
            true = torch.stack([model(p[None])[0] for p in pts])
        assert (true >= lb[b] - 1e-10).all() and (true <= ub[b] + 1e-10).all()
    if what == "abs-sum":  # |J| summed over the input is at least the l1 Lipschitz bound's
        jb = rj_plugin.bound_jacobian(net, x0, eps=eps, norm="inf")
        assert (ub >= jb.lipschitz() - 1e-9).all()


class ReluOfJacobian(nn.Module):
    """An activation after the node: sum_ij relu(J_ij - t) (how much of J exceeds t)."""

    def __init__(self, net: nn.Module, threshold: float) -> None:
        super().__init__()
        self.jac = JacobianOf(net)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.jac(x) - self.threshold).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
def test_alpha_crown_with_an_activation_after_the_node(act: str) -> None:
    """alpha-CROWN optimises the ReLU after the node; the network's own activations, which no
    backward pass reaches (the node cuts them off), get no alphas.  0.3 failed here with
    KeyError (tanh, sigmoid) or AttributeError 'lower_d' (relu): compat unreached_start_nodes."""
    torch.manual_seed(5)
    inner = build_mlp(4, [8, 8], 3, act).to(DT).eval()
    model = ReluOfJacobian(inner, 0.05).eval()
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    eps = 0.1
    bm = BoundedModule(model, x0, bound_opts=compat.default_bound_opts())  # matrix mode: the Sub
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=eps))
    crown_lb, crown_ub = bm.compute_bounds(x=(bx,), method="CROWN")
    lb, ub = bm.compute_bounds(x=(bx,), method="alpha-CROWN")
    assert (lb >= crown_lb - 1e-12).all() and (ub <= crown_ub + 1e-12).all()
    for b in range(2):
        pts = oracle.region_points(inner, x0[b], eps, math.inf, 500, gen)
        with torch.no_grad():
            true = torch.cat([model(p[None]) for p in pts])
        assert (true >= lb[b] - 1e-10).all() and (true <= ub[b] + 1e-10).all()


def test_spec_matrix_after_the_node_with_crown(net) -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    bm = BoundedModule(JacobianOf(net), x0)
    C = torch.randn(2, 5, 12, generator=gen, dtype=DT)
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.1))
    lb, ub = bm.compute_bounds(x=(bx,), C=C, method="CROWN")
    for b in range(2):
        pts = oracle.region_points(net, x0[b], 0.1, math.inf, 1000, gen)
        vals = oracle.jacobians(net, pts).flatten(1) @ C[b].T
        assert (vals >= lb[b] - 1e-10).all() and (vals <= ub[b] + 1e-10).all()


@pytest.mark.parametrize("norm", [math.inf, 2.0])
def test_linear_method_passes_input_coefficients_and_tightens_c_at_j(net, norm) -> None:
    """``method: linear`` gives the node linear bounds in the input: C @ J under CROWN must
    contain the sampled values of C @ J, be no looser than with constant bounds, and tighter on
    most rows (the lines concretise jointly)."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    C = torch.randn(2, 6, 12, generator=gen, dtype=DT)
    eps = 0.2
    results = {}
    for method in ("recurjac", "linear"):
        bm = BoundedModule(JacobianOf(net), x0, bound_opts={"recurjac": {"method": method}})
        bx = BoundedTensor(x0, PerturbationLpNorm(norm=norm, eps=eps))
        results[method] = bm.compute_bounds(x=(bx,), C=C, method="CROWN")
        node = next(n for n in bm._modules.values() if type(n).__name__ == "BoundRecurJacobian")
        lines = node._input_lines()
        assert (lines is None) == (method == "recurjac")
    lb, ub = results["linear"]
    for b in range(2):
        pts = oracle.region_points(net, x0[b], eps, norm, 1500, gen,
                                   [(0, 0, 1.0), (1, 2, -1.0), (2, None, 1.0)])
        vals = oracle.jacobians(net, pts).flatten(1) @ C[b].T
        assert (vals >= lb[b] - 1e-10).all() and (vals <= ub[b] + 1e-10).all()
    c_lb, c_ub = results["recurjac"]
    assert (lb >= c_lb - 1e-12).all() and (ub <= c_ub + 1e-12).all()
    assert ((ub - lb) < 0.95 * (c_ub - c_lb)).float().mean() > 0.5


# ------------------------------------------------------------------------------------------------
# The node's bound cache is keyed on the region's values (issue #7, item 4)


def _assert_contains_true_jacobians(net: nn.Module, lb: torch.Tensor, ub: torch.Tensor,
                                    pts: list[torch.Tensor]) -> None:
    """Every true Jacobian (torch.func) at the points ``pts[b]: [N, d]`` lies in the bounds
    ``lb[b], ub[b]: [n_out, d]``."""
    for b, p in enumerate(pts):
        jac = oracle.jacobians(net, p)
        assert (jac >= lb[b] - 1e-10).all() and (jac <= ub[b] + 1e-10).all()


@pytest.mark.parametrize("norm", [math.inf, 2.0])
def test_reused_perturbation_with_a_new_eps_gives_the_new_regions_bounds(net, norm) -> None:
    """A radius search reuses one PerturbationLpNorm and only sets ``ptb.eps``: every call must
    bound the new ball (the cache keyed on data pointers and id(ptb) returned the first ball's
    bounds for p = 2, whose interval is the unchanged center)."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    bm = BoundedModule(JacobianOf(net), x0)
    ptb = PerturbationLpNorm(norm=norm, eps=0.02)
    bx = BoundedTensor(x0, ptb)
    widths = []
    for eps in (0.02, 0.1, 0.4):
        ptb.eps = eps
        for method in ("IBP", "CROWN"):
            lb, ub = bm.compute_bounds(x=(bx,), method=method)
            pts = [oracle.region_points(net, x0[b], eps, norm, 400, gen, [(0, 0, 1.0)])
                   for b in range(2)]
            _assert_contains_true_jacobians(net, lb, ub, pts)
            # the same ball as bound_jacobian's, centred exactly on x0 (not on the midpoint of
            # auto_LiRPA's interval x0 -+ eps, which is off by rounding)
            fresh = rj_plugin.bound_jacobian(net, x0, eps=eps, norm=norm)
            assert torch.equal(lb, fresh.lower) and torch.equal(ub, fresh.upper)
        widths.append(float((ub - lb).sum()))
    assert widths[0] < widths[1] < widths[2]


def test_box_moved_in_place_gives_the_new_boxs_bounds(net) -> None:
    """x_L / x_U of a box perturbation moved in place (same tensors, same perturbation): the
    bounds are those of the new box and contain its true Jacobians."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    x_lo, x_hi = x0 - 0.02, x0 + 0.02
    bm = BoundedModule(JacobianOf(net), x0)
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, x_L=x_lo, x_U=x_hi))
    first = bm.compute_bounds(x=(bx,), method="IBP")
    for shift, grow in ((0.0, 0.2), (0.3, 0.0), (-0.5, 0.4)):
        x_lo.add_(shift - grow)
        x_hi.add_(shift + grow)
        for method in ("IBP", "CROWN"):
            lb, ub = bm.compute_bounds(x=(bx,), method=method)
            pts = [torch.cat([oracle.box_points(x_lo[b], x_hi[b], 400, gen),
                              oracle.box_vertices(x_lo[b], x_hi[b], gen)]) for b in range(2)]
            _assert_contains_true_jacobians(net, lb, ub, pts)
            fresh = rj_plugin.bound_jacobian(net, lower=x_lo, upper=x_hi)
            assert torch.equal(lb, fresh.lower) and torch.equal(ub, fresh.upper)
    assert not torch.equal(lb, first[0]) and not torch.equal(ub, first[1])


@pytest.mark.parametrize("batch", [1, 2])
def test_node_with_alpha_crown_preactivations_inside_an_outer_alpha_crown_call(batch: int) -> None:
    """The node's own alpha-CROWN pre-activation bounds, first computed inside the outer
    alpha-CROWN call (which runs its init pass under no_grad): they used to fail ('does not
    require grad'), leaving the module broken for every later call."""
    torch.manual_seed(7)
    inner = build_mlp(4, [8, 8], 3, "tanh").to(DT).eval()
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(batch, 4, generator=gen, dtype=DT)
    opts = {**compat.default_bound_opts(), "recurjac": {"preact": "alpha-crown"}}
    bm = BoundedModule(ReluOfJacobian(inner, 0.05), x0, bound_opts=opts)
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.1))
    lb, ub = bm.compute_bounds(x=(bx,), method="alpha-CROWN")
    ibp = bm.compute_bounds(x=(bx,), method="IBP")
    jb = rj_plugin.bound_jacobian(inner, x0, eps=0.1, norm="inf", preact="alpha-crown")
    expected = (jb.upper - 0.05).clamp(min=0).flatten(1).sum(1, keepdim=True)
    assert torch.allclose(ibp[1], expected, rtol=0, atol=1e-12)  # the node's bounds are RecurJac's
    for b in range(batch):
        pts = oracle.region_points(inner, x0[b], 0.1, math.inf, 300, gen)
        with torch.no_grad():
            true = torch.cat([bm(p[None]) for p in pts])
        assert (true >= lb[b] - 1e-10).all() and (true <= ub[b] + 1e-10).all()


def test_bounding_leaves_the_networks_training_mode_alone() -> None:
    """A training loop bounds its net between steps: neither the operator nor bound_jacobian
    switches the caller's module (or any submodule) to eval mode."""
    torch.manual_seed(8)
    inner = build_mlp(4, [8], 3, "tanh").to(DT).train()
    x0 = torch.rand(1, 4, dtype=DT)
    bm = BoundedModule(JacobianOf(inner), x0)
    bm.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.1)),), method="CROWN")
    rj_plugin.bound_jacobian(inner, x0, eps=0.1)
    assert all(m.training for m in inner.modules())


@pytest.mark.parametrize("change", ["optimiser-step", "load_state_dict", "data"])
def test_weights_changed_in_place_give_the_new_networks_bounds(change: str) -> None:
    """The wrapped network's weights changed in place between two calls with the same region
    (a training loop): the bounds are those of the new network, never the cached old ones."""
    torch.manual_seed(6)
    inner = build_mlp(4, [10, 10], 3, "tanh").to(DT).eval()
    gen = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 4, generator=gen, dtype=DT)
    bm = BoundedModule(JacobianOf(inner), x0)
    bx = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.1))
    first = bm.compute_bounds(x=(bx,), method="CROWN")
    if change == "optimiser-step":
        opt = torch.optim.SGD(inner.parameters(), lr=0.5)
        inner(x0).square().sum().backward()
        opt.step()
    elif change == "load_state_dict":
        inner.load_state_dict({k: 1.5 * v for k, v in inner.state_dict().items()})
    else:
        for p in inner.parameters():
            p.data.mul_(-1.3)  # .data: no version-counter bump
    for method in ("IBP", "CROWN"):
        lb, ub = bm.compute_bounds(x=(bx,), method=method)
        pts = [oracle.region_points(inner, x0[b], 0.1, math.inf, 400, gen) for b in range(2)]
        _assert_contains_true_jacobians(inner, lb, ub, pts)
        fresh = rj_plugin.bound_jacobian(inner, x0, eps=0.1, norm="inf")
        assert torch.equal(lb, fresh.lower) and torch.equal(ub, fresh.upper)
    assert not torch.equal(ub, first[1])


@pytest.mark.parametrize("before", ["scale", "shift", "negate"])
def test_an_op_between_the_input_and_the_node_is_refused(before: str) -> None:
    """JacobianOf(net)(g(x)) is the Jacobian at g(x); it was bounded over x's region (unsound,
    found by the outside fuzz of issue 7).  Now refused, naming the op in between."""
    from rj_plugin.errors import UnsupportedLayerError

    net = build_mlp(4, [6], 3, "tanh").double().eval()
    ops = {"scale": lambda x: 3 * x, "shift": lambda x: x + 1.0, "negate": lambda x: -x}

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.jac = JacobianOf(net)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.jac(ops[before](x))

    x0 = torch.rand(2, 4, dtype=torch.float64)
    bm = auto_LiRPA.BoundedModule(Outer().eval(), x0)
    ptb = auto_LiRPA.PerturbationLpNorm(norm=math.inf, eps=0.2)
    with pytest.raises(UnsupportedLayerError, match=r"must take the perturbed input.*\(op "):
        bm.compute_bounds(x=(auto_LiRPA.BoundedTensor(x0, ptb),), method="IBP")
