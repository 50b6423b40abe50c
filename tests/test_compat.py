"""Regression tests for :mod:`rj_plugin.compat` (auto-LiRPA 0.3 on torch 2.x / numpy 2).

Each patch gets a test showing that the failure it fixes no longer happens; every bound computed
here is also checked against sampled true values (sanity / soundness).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from rj_plugin import compat

al = compat.import_auto_lirpa()

METHODS = ("IBP", "CROWN", "CROWN-IBP", "CROWN-Optimized")
KNOWN_PATCHES = {
    "matmul_ibp_spec",
    "conv_transpose_dilation",
    "matmul_constant_left",
    "ibp_spec_any_rank",
    "best_ret_any_rank",
    "softplus_relaxation",
    "avgpool_semantics",
    "lp_input_box",
    "leaky_relu_steep",
    "numpy_arraysetops",
    "onnx_set_opset_version",
    "onnx_optimize_graph",
    "node_getitem",
    "named_members",
    "alpha_clamp_grad",
    "alpha_dtype",
    "sshape_table_dtype",
    "optimize_in_model_dtype",
    "sshape_table_cache",
    "default_spec_dtype",
    "unreached_start_nodes",
    "params_keep_requires_grad",
    "nothing_to_optimise",
    "shared_buffers",
}
TOL = 1e-9
IS_03 = al.__version__ == "0.3"
only_03 = pytest.mark.skipif(not IS_03, reason="documents an auto_LiRPA 0.3 behaviour")


class Atan(nn.Module):
    """``torch.atan`` as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


class SubFlattenMLP(nn.Module):
    """``x - mean`` (ONNX Sub), ``Flatten``, then an MLP with the given activation."""

    def __init__(self, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.rand(1, 1, 2, 2))
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.flatten(x - self.mean))


class AddBeforeRelu(nn.Module):
    """``relu(linear(x) + c)``: an ONNX Add whose bounds CROWN needs (C built from parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)
        self.register_buffer("shift", torch.rand(6) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) + self.shift))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ptb_input(x: torch.Tensor, eps: float) -> object:
    return al.BoundedTensor(x, al.PerturbationLpNorm(norm=float("inf"), eps=eps))


def _samples(x: torch.Tensor, eps: float, n: int = 2000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, *x.shape[1:]), generator=gen, dtype=x.dtype) * 2 - 1
    corners = torch.sign(noise[: n // 4])  # vertices of the box are where bounds are tightest
    return x + eps * torch.cat([noise, corners])


def _assert_contains(lower: torch.Tensor, upper: torch.Tensor, values: torch.Tensor) -> None:
    lo, up = lower.detach().reshape(1, -1), upper.detach().reshape(1, -1)
    vals = values.detach().reshape(values.shape[0], -1)
    assert bool((vals >= lo - TOL).all()), "a sampled value lies below the lower bound"
    assert bool((vals <= up + TOL).all()), "a sampled value lies above the upper bound"


def _bounded(net: nn.Module, x: torch.Tensor, iteration: int = 10, **extra: object) -> object:
    opts = compat.default_bound_opts()
    opts.update(extra)
    opts["optimize_bound_args"] = {"iteration": iteration, "lr_alpha": 0.3}
    return al.BoundedModule(net, x, bound_opts=opts)


def _activation_inputs(net: nn.Module, xs: torch.Tensor) -> list[torch.Tensor]:
    """Sampled pre-activation values (inputs of each activation module, in execution order)."""
    acts = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, Atan)
    seen: list[torch.Tensor] = []
    hooks = [
        mod.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
        for mod in net.modules()
        if isinstance(mod, acts)
    ]
    try:
        with torch.no_grad():
            net(xs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _preactivation_nodes(model: object) -> Iterator[object]:
    acts = ("BoundRelu", "BoundLeakyRelu", "BoundTanh", "BoundSigmoid", "BoundAtan")
    for node in model._modules.values():  # topological order
        if type(node).__name__ in acts:
            yield node.inputs[0]


# ------------------------------------------------------------------------------------------------
# apply() / applied()
# ------------------------------------------------------------------------------------------------


def test_apply_is_idempotent_and_reports_names() -> None:
    first = compat.apply()
    relu_fn = al.operators.BoundRelu.__dict__["_relu_mask_alpha"]
    getitem = getattr(torch._C.Node, "__getitem__", None)
    second = compat.apply()
    assert first == second == compat.applied()
    assert len(set(first)) == len(first)
    assert set(first) <= KNOWN_PATCHES
    # Re-applying did not wrap anything twice.
    assert al.operators.BoundRelu.__dict__["_relu_mask_alpha"] is relu_fn
    assert getattr(torch._C.Node, "__getitem__", None) is getitem
    if IS_03 and int(np.__version__.split(".")[0]) >= 2:
        assert "numpy_arraysetops" in first
    if IS_03:
        assert {"named_members", "alpha_dtype", "sshape_table_dtype"} <= set(first)


def test_default_bound_opts_is_a_fresh_dict() -> None:
    opts = compat.default_bound_opts()
    assert opts == {
        "conv_mode": "matrix",
        "sparse_spec_alpha": False,
        "sparse_features_alpha": False,
        "sparse_intermediate_bounds": False,
    }
    opts["conv_mode"] = "patches"
    assert compat.default_bound_opts()["conv_mode"] == "matrix"


def test_torch_clamp_itself_is_untouched() -> None:
    assert isinstance(torch.clamp, types.BuiltinFunctionType)
    assert not hasattr(torch.clamp, "_rj_compat_patch")


# ------------------------------------------------------------------------------------------------
# Pre-import patches
# ------------------------------------------------------------------------------------------------


def test_numpy_arraysetops_alias() -> None:
    from numpy.lib.arraysetops import isin

    assert isin(np.array([1, 2, 3]), np.array([2])).tolist() == [False, True, False]


def test_onnx_helpers_importable_and_working() -> None:
    from torch.onnx.symbolic_helper import _set_opset_version
    from torch.onnx.utils import _optimize_graph

    globals_obj = compat._first_attr(
        "GLOBALS", ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals")
    )
    _set_opset_version(13)
    assert globals_obj.export_onnx_opset_version == 13
    _set_opset_version(12)
    assert globals_obj.export_onnx_opset_version == 12
    assert callable(_optimize_graph)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_node_getitem_reads_typed_attributes() -> None:
    graph = torch.jit.trace(lambda t: torch.flatten(t, 1) * 2.5, torch.ones(2, 3, 2)).graph
    attrs = [
        (node.kindOf(name), node[name]) for node in graph.nodes() for name in node.attributeNames()
    ]
    assert ("i", 1) in attrs and ("i", -1) in attrs  # flatten's start_dim / end_dim
    tensors = [value for kind, value in attrs if kind == "t"]
    assert len(tensors) == 1 and float(tensors[0]) == 2.5


def test_parse_model_with_attributes() -> None:
    """LeakyRelu(alpha) and Flatten(axis) are ONNX attributes read through ``node[name]``."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.LeakyReLU(0.1), nn.Linear(5, 2))
    model = al.BoundedModule(net, torch.zeros(1, 2, 2), bound_opts=compat.default_bound_opts())
    leaky = [n for n in model.modules() if type(n).__name__ == "BoundLeakyRelu"]
    assert len(leaky) == 1 and leaky[0].alpha == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# BoundedModule._named_members
# ------------------------------------------------------------------------------------------------


def test_parameters_on_bounded_module() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    model = al.BoundedModule(net, torch.zeros(1, 2), bound_opts=compat.default_bound_opts())
    params = list(model.parameters())
    assert len(params) == 4
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in net.named_parameters()]  # original names restored
    assert len(list(model.named_parameters(remove_duplicate=False))) == 4


def test_add_before_relu_all_methods() -> None:
    """conv_mode='matrix' + the parameters() fix make CROWN work through an Add node."""
    torch.manual_seed(3)
    net = AddBeforeRelu().double()
    x = torch.rand(1, 3, dtype=torch.float64)
    model = _bounded(net, x)
    outputs = net(_samples(x, 0.4))
    for method in METHODS:
        lower, upper = model.compute_bounds(x=(_ptb_input(x, 0.4),), method=method)
        _assert_contains(lower, upper, outputs)


@only_03
def test_add_before_relu_needs_matrix_mode() -> None:
    """Why ``conv_mode='matrix'`` is in the defaults: 0.3's 'patches' mode fails on Add nodes."""
    torch.manual_seed(3)
    net = AddBeforeRelu().double()
    x = torch.rand(1, 3, dtype=torch.float64)
    model = al.BoundedModule(net, x, bound_opts={"conv_mode": "patches"})
    with pytest.raises(IndexError):
        model.compute_bounds(x=(_ptb_input(x, 0.4),), method="CROWN")


# ------------------------------------------------------------------------------------------------
# alpha-CROWN options (0.3 bugs avoided by bound_opts)
# ------------------------------------------------------------------------------------------------


def _ibp_unstable_crown_stable_net() -> nn.Sequential:
    """Layer-2 neurons that IBP finds unstable but CROWN proves stable (exact cancellation)."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.1, 0.2]))
        net[4].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[4].bias.zero_()
    return net.double()


@pytest.mark.parametrize("sparse_intermediate_bounds", [True, False])
def test_alpha_crown_when_ibp_unstable_but_crown_stable(sparse_intermediate_bounds: bool) -> None:
    net = _ibp_unstable_crown_stable_net()
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    model = _bounded(net, x, sparse_intermediate_bounds=sparse_intermediate_bounds)
    ptb = _ptb_input(x, 0.5)
    model.compute_bounds(x=(ptb,), method="IBP")
    layer2 = list(_preactivation_nodes(model))[1]
    assert bool(((layer2.lower < 0) & (layer2.upper > 0)).all())  # IBP: both unstable
    model.compute_bounds(x=(ptb,), method="CROWN")
    assert bool((layer2.lower > 0).all())  # CROWN: both stable (exactly 0.1 and 0.2)
    outputs = net(_samples(x, 0.5))
    for method in METHODS:
        lower, upper = model.compute_bounds(x=(ptb,), method=method)
        _assert_contains(lower, upper, outputs)
    assert float(lower) == pytest.approx(-0.1) and float(upper) == pytest.approx(-0.1)


@only_03
def test_sparse_spec_alpha_is_what_breaks() -> None:
    """Why ``sparse_spec_alpha=False`` is in the defaults (0.3's alpha_lookup_idx assertion)."""
    net = _ibp_unstable_crown_stable_net()
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    model = al.BoundedModule(net, x, bound_opts={"optimize_bound_args": {"iteration": 2}})
    with pytest.raises(AssertionError):
        model.compute_bounds(x=(_ptb_input(x, 0.5),), method="CROWN-Optimized")


def _mostly_unstable_net() -> nn.Sequential:
    """19 of 20 first-layer ReLUs unstable (95 % > 0.3's 90 % 'minimum_sparsity')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    with torch.no_grad():
        net[0].bias.zero_()
        net[0].bias[0] = 10.0
    return net.double()


def test_alpha_crown_with_mostly_unstable_layer() -> None:
    net = _mostly_unstable_net()
    x = torch.zeros(1, 2, dtype=torch.float64)
    model = _bounded(net, x)
    ptb = _ptb_input(x, 1.0)
    lower, upper = model.compute_bounds(x=(ptb,), method="CROWN-Optimized")
    _assert_contains(lower, upper, net(_samples(x, 1.0)))


@only_03
def test_sparse_features_alpha_is_what_breaks() -> None:
    """Why ``sparse_features_alpha=False`` is in the defaults (0.3's full-alpha reset bug)."""
    net = _mostly_unstable_net()
    x = torch.zeros(1, 2, dtype=torch.float64)
    model = al.BoundedModule(net, x, bound_opts={"optimize_bound_args": {"iteration": 2}})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        model.compute_bounds(x=(_ptb_input(x, 1.0),), method="CROWN-Optimized")


# ------------------------------------------------------------------------------------------------
# alpha clamp gradient (torch 2.14)
# ------------------------------------------------------------------------------------------------


def test_pass_through_clamp_value_and_gradient() -> None:
    x = torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    y = compat._clamp_pass_through(x, 0.0, 1.0)
    assert torch.equal(y.detach(), torch.clamp(x.detach(), 0.0, 1.0))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _alpha_vs_crown(seed: int = 0, eps: float = 1.0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
    net = net.double()
    x = torch.zeros(1, 2, dtype=torch.float64)
    model = _bounded(net, x, iteration=30)
    ptb = _ptb_input(x, eps)
    crown_l, crown_u = model.compute_bounds(x=(ptb,), method="CROWN")
    alpha_l, alpha_u = model.compute_bounds(x=(ptb,), method="CROWN-Optimized")
    outputs = net(_samples(x, eps))
    _assert_contains(crown_l, crown_u, outputs)
    _assert_contains(alpha_l, alpha_u, outputs)
    return crown_l.detach(), crown_u.detach(), alpha_l.detach(), alpha_u.detach()


def test_alpha_crown_strictly_tighter_than_crown() -> None:
    crown_l, crown_u, alpha_l, alpha_u = _alpha_vs_crown()
    width = (crown_u - crown_l).min().item()
    # Lower bounds of both outputs improve by a clear margin (measured: ~0.21 and ~0.11 on
    # widths ~0.79 / ~0.53); the upper bounds improve too.
    assert bool((alpha_l - crown_l > 0.05 * width).all()), (alpha_l, crown_l)
    assert bool((crown_u - alpha_u > 0.05 * width).all()), (alpha_u, crown_u)


@pytest.mark.skipif(
    not compat._clamp_grad_vanishes_at_bounds(), reason="torch.clamp passes the gradient here"
)
def test_without_clamp_patch_alpha_crown_equals_crown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch is what makes alpha-CROWN work: switched off, the alphas never move."""
    assert "alpha_clamp_grad" in compat.applied()
    monkeypatch.setattr(compat, "_ALPHA_STE_ENABLED", False)
    crown_l, crown_u, alpha_l, alpha_u = _alpha_vs_crown()
    assert torch.allclose(alpha_l, crown_l, rtol=0, atol=1e-12)
    assert torch.allclose(alpha_u, crown_u, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Activations, dtypes, Sub + Flatten; intermediate bounds
# ------------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "atan": Atan,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_all_methods_sound_on_sub_flatten_mlp(act: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    net = SubFlattenMLP(ACTIVATIONS[act]).to(dtype)
    x = torch.rand(1, 1, 2, 2, dtype=dtype)
    eps = 0.3
    model = _bounded(net, x)
    xs = _samples(x, eps, n=1000)
    outputs = net(xs)
    pre_samples = _activation_inputs(net.body, net.flatten(xs - net.mean))
    tol = TOL if dtype == torch.float64 else 1e-5
    for method in METHODS:
        lower, upper = model.compute_bounds(x=(_ptb_input(x, eps),), method=method)
        assert lower.dtype == upper.dtype == dtype, method
        assert bool((outputs >= lower.detach() - tol).all()), method
        assert bool((outputs <= upper.detach() + tol).all()), method
        # Intermediate (pre-activation) bounds stored on the nodes are sound too.
        nodes = list(_preactivation_nodes(model))
        assert len(nodes) == len(pre_samples) == 2
        for node, values in zip(nodes, pre_samples, strict=True):
            assert bool((values >= node.lower.detach() - tol).all()), (method, node.name)
            assert bool((values <= node.upper.detach() + tol).all()), (method, node.name)


def test_crown_computes_every_preactivation_neuron() -> None:
    """With the defaults (sparse_intermediate_bounds=False) CROWN differs from IBP everywhere."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    net = net.double()
    x = torch.zeros(1, 3, dtype=torch.float64)
    ptb = _ptb_input(x, 0.3)
    results = {}
    for sparse in (True, False):
        model = _bounded(net, x, sparse_intermediate_bounds=sparse)
        model.compute_bounds(x=(ptb,), method="IBP")
        ibp = [(n.lower.detach(), n.upper.detach()) for n in _preactivation_nodes(model)]
        model.compute_bounds(x=(ptb,), method="CROWN")
        crown = [(n.lower.detach(), n.upper.detach()) for n in _preactivation_nodes(model)]
        results[sparse] = (ibp, crown)
    # Second pre-activation layer: every neuron is stable under IBP here, so with 0.3's default
    # (sparse) CROWN keeps the IBP interval, while the plugin's default recomputes all of them.
    ibp, crown_sparse = results[True]
    _, crown_full = results[False]
    assert bool(((ibp[1][0] > 0) | (ibp[1][1] < 0)).all())
    assert torch.equal(crown_sparse[1][0], ibp[1][0])
    assert not torch.equal(crown_full[1][0], ibp[1][0])


@only_03
def test_sshape_tables_are_shared_between_nodes() -> None:
    """Regression for ``sshape_table_cache``: a second tanh node reuses the first one's tables
    (0.3 rebuilt them per node, seconds each under load) and its bounds stay sound."""
    x = torch.rand(2, 3, dtype=torch.float64)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 2)).double() for _ in range(2)]
    bms = [al.BoundedModule(n, x, bound_opts=compat.default_bound_opts()) for n in nets]
    tanh = [m for bm in bms for m in bm._modules.values() if type(m).__name__ == "BoundTanh"]
    assert len(tanh) == 4
    assert all(t.d_lower is tanh[0].d_lower for t in tanh)
    for net, bm in zip(nets, bms, strict=True):
        lb, ub = bm.compute_bounds(x=(al.BoundedTensor(x, al.PerturbationLpNorm(eps=0.2)),),
                                   method="CROWN")
        pts = x[:, None] + 0.2 * (2 * torch.rand(2, 500, 3, dtype=torch.float64) - 1)
        with torch.no_grad():
            y = net(pts)
        assert (y >= lb[:, None] - TOL).all() and (y <= ub[:, None] + TOL).all()


@only_03
def test_default_spec_is_built_in_the_model_dtype() -> None:
    """Regression for ``default_spec_dtype``: CROWN through ``abs`` of a float64 model without an
    explicit C failed with 'expected scalar type Float but found Double'."""

    class AbsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).abs()

    net = AbsNet().double()
    x = torch.rand(2, 3, dtype=torch.float64)
    bm = al.BoundedModule(net, x, bound_opts=compat.default_bound_opts())
    lb, ub = bm.compute_bounds(x=(al.BoundedTensor(x, al.PerturbationLpNorm(eps=0.1)),),
                               method="CROWN")
    assert lb.dtype == torch.float64
    pts = x[:, None] + 0.1 * (2 * torch.rand(2, 500, 3, dtype=torch.float64) - 1)
    with torch.no_grad():
        y = net(pts)
    assert (y >= lb[:, None] - TOL).all() and (y <= ub[:, None] + TOL).all()


# ------------------------------------------------------------------------------------------------
# matmul_constant_left: CROWN through ``C @ Y`` with only Y perturbed (issue #7, item 8)
# ------------------------------------------------------------------------------------------------



class ConstantTimesJacobian(nn.Module):
    """``C @ JacobianOf(net)(x)``: ``[B, d] -> [B, k, d]`` for C ``[k, n_out]`` or
    ``[B, k, n_out]``; with ``relu_sum``, ``relu(C @ J).sum(-1)`` ``[B, k]`` (then the product's
    bounds are intermediate bounds, computed with an identity or one-hot C)."""

    def __init__(self, net: nn.Module, C: torch.Tensor, relu_sum: bool) -> None:
        super().__init__()
        from rj_plugin import JacobianOf

        self.jac = JacobianOf(net)
        self.register_buffer("C", C)
        self.relu_sum = relu_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.C @ self.jac(x)
        return torch.relu(out).sum(-1) if self.relu_sum else out


class ConstantTimesFeatures(nn.Module):
    """No Jacobian involved: ``C @ tanh(W x + b).view(B, 3, 4)``, ``[B, 5] -> [B, k, 4]``."""

    def __init__(self, C: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 12)
        self.register_buffer("C", C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.C @ torch.tanh(self.lin(x)).view(-1, 3, 4)


def _corners_and_samples(center: torch.Tensor, eps: float, n: int,
                         gen: torch.Generator) -> torch.Tensor:
    """All 2^d corners of the box ``center -+ eps`` (``center``: ``[d]``) and ``n`` uniform points
    in it: ``[2^d + n, d]``."""
    d = center.numel()
    bits = (torch.arange(2 ** d)[:, None] >> torch.arange(d)) & 1
    corners = center + eps * (2 * bits.to(center.dtype) - 1)
    noise = 2 * torch.rand(n, d, generator=gen, dtype=center.dtype) - 1
    return torch.cat([corners, center + eps * noise])


def _spec(kind: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    """C ``[5, 3]`` shared by the batch, or one per sample ``[batch, 5, 3]``."""
    shape = (5, 3) if kind == "shared" else (batch, 5, 3)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("relu_sum", [False, True], ids=["C@J", "relu(C@J).sum"])
@pytest.mark.parametrize("kind", ["shared", "per-sample"])
@pytest.mark.parametrize("opts", ["0.3-defaults", "plugin"])
def test_constant_times_jacobian_bounds_contain_the_truth(kind: str, relu_sum: bool,
                                                          opts: str) -> None:
    """Regression for ``matmul_constant_left``: CROWN on ``C @ J`` raised 'Unsupported shapes'
    (shared C) or a size mismatch (per-sample C).  IBP and CROWN bounds contain C @ (true
    Jacobian, torch.func) at every corner of the box and at random points in it."""
    from rj_plugin.models import build_mlp
    from tests import oracle

    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    net = build_mlp(4, [8, 8], 3, "tanh").double().eval()
    x0 = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    C = _spec(kind, 2, gen)
    model = ConstantTimesJacobian(net, C, relu_sum).eval()
    bound_opts = None if opts == "0.3-defaults" else compat.default_bound_opts()
    bm = al.BoundedModule(model, x0, bound_opts=bound_opts)
    eps = 0.15
    bounds = {m: bm.compute_bounds(x=(_ptb_input(x0, eps),), method=m) for m in ("IBP", "CROWN")}
    for b in range(2):
        jac = oracle.jacobians(net, _corners_and_samples(x0[b], eps, 1500, gen)).detach()
        true = (C[b] if C.dim() == 3 else C) @ jac  # [N, 5, 4]
        if relu_sum:
            true = torch.relu(true).sum(-1)
        for lb, ub in bounds.values():
            _assert_contains(lb[b], ub[b], true)
    if not relu_sum:  # exact linear propagation: CROWN is the interval product, as IBP
        (l_ibp, u_ibp), (l_crown, u_crown) = bounds["IBP"], bounds["CROWN"]
        torch.testing.assert_close(l_crown, l_ibp, rtol=0, atol=1e-12)
        torch.testing.assert_close(u_crown, u_ibp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["shared", "per-sample"])
def test_constant_times_features_with_crown(kind: str) -> None:
    """The patch is about auto_LiRPA's MatMul, not RecurJac: C @ (perturbed features) in CROWN,
    checked against sampled outputs (corners and random points)."""
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    C = _spec(kind, 2, gen)
    model = ConstantTimesFeatures(C).double().eval()
    x0 = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    bm = al.BoundedModule(model, x0, bound_opts=compat.default_bound_opts())
    for method in ("CROWN", "IBP"):
        lb, ub = bm.compute_bounds(x=(_ptb_input(x0, 0.2),), method=method)
        assert lb.shape == ub.shape == (2, 5, 4)
        for b in range(2):
            pts = _corners_and_samples(x0[b], 0.2, 1500, gen)
            with torch.no_grad():
                true = (C[b] if C.dim() == 3 else C) @ torch.tanh(model.lin(pts)).view(-1, 3, 4)
            _assert_contains(lb[b], ub[b], true)


@only_03
@pytest.mark.parametrize(("kind", "message"), [("shared", "Unsupported shapes"),
                                               ("per-sample", "size")])
def test_without_matmul_patch_crown_fails(kind: str, message: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the patch fixes: 0.3's own ``BoundMatMul.bound_backward`` on the same model."""
    patched = al.operators.BoundMatMul.__dict__["bound_backward"]
    assert getattr(patched, "_rj_compat_patch", None) == "matmul_constant_left"
    monkeypatch.setattr(al.operators.BoundMatMul, "bound_backward", patched._rj_original)
    gen = torch.Generator().manual_seed(13)
    model = ConstantTimesFeatures(_spec(kind, 2, gen)).double().eval()
    x0 = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    bm = al.BoundedModule(model, x0, bound_opts=compat.default_bound_opts())
    with pytest.raises((ValueError, RuntimeError), match=message):
        bm.compute_bounds(x=(_ptb_input(x0, 0.2),), method="CROWN")


def test_bounded_forward_leaves_the_callers_requires_grad_alone() -> None:
    """0.3's BoundParams.forward wrote ``requires_grad = training`` on the caller's own
    parameters: one eval-mode forward froze the network (params_keep_requires_grad)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    net[2].weight.requires_grad_(False)  # frozen by the caller
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.rand(2, 3, dtype=torch.float64)
    bm = al.BoundedModule(net, x, bound_opts=compat.default_bound_opts())
    bm.eval()
    with torch.no_grad():
        assert torch.allclose(bm(x), net(x))
    assert [p.requires_grad for p in net.parameters()] == flags
    bm.train()
    bm(x).sum().backward()  # train mode: gradients reach the parameters that require them
    assert [p.requires_grad for p in net.parameters()] == flags
    assert net[0].weight.grad is not None and net[2].weight.grad is None
    lb, ub = bm.compute_bounds(x=(al.BoundedTensor(x, al.PerturbationLpNorm(eps=0.1)),),
                               method="CROWN")
    assert [p.requires_grad for p in net.parameters()] == flags
    pts = x.unsqueeze(1) + 0.2 * torch.rand(2, 200, 3, dtype=torch.float64) - 0.1
    with torch.no_grad():
        out = net(pts)
    assert (out >= lb.unsqueeze(1) - TOL).all() and (out <= ub.unsqueeze(1) + TOL).all()


def test_alpha_crown_whose_bound_depends_on_no_alpha() -> None:
    """nothing_to_optimise: alpha-CROWN of J = JacobianOf(net)(x) (constants to auto_LiRPA)
    is CROWN's bound instead of 0.3's 'does not require grad' crash; the fallback is narrow:
    alpha-CROWN called under no_grad still fails loudly rather than quietly becoming CROWN."""
    from rj_plugin import JacobianOf

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 2)).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    bx = al.BoundedTensor(x, al.PerturbationLpNorm(eps=0.1))
    bm = al.BoundedModule(JacobianOf(net), x, bound_opts=compat.default_bound_opts())
    crown = bm.compute_bounds(x=(bx,), method="CROWN")
    alpha = bm.compute_bounds(x=(bx,), method="alpha-CROWN")
    assert torch.equal(alpha[0], crown[0]) and torch.equal(alpha[1], crown[1])
    relu_net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    plain = al.BoundedModule(relu_net, x, bound_opts=compat.default_bound_opts())
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        plain.compute_bounds(x=(bx,), method="alpha-CROWN")


def test_buffers_changed_in_place_are_bounded_as_they_are_now() -> None:
    """shared_buffers: 0.3 copied buffers (BatchNorm statistics) at construction but shared the
    weights, so after the statistics changed the bounds were of a network that no longer
    existed and excluded the model's outputs."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    net.eval()
    x = torch.rand(2, 3, dtype=torch.float64)
    bx = al.BoundedTensor(x, al.PerturbationLpNorm(eps=0.05))
    bm = al.BoundedModule(net, x, bound_opts=compat.default_bound_opts())
    before = bm.compute_bounds(x=(bx,), method="CROWN")
    with torch.no_grad():
        net[1].running_mean.add_(0.7)
        net[1].running_var.mul_(0.3)
    for method in ("IBP", "CROWN"):
        lb, ub = bm.compute_bounds(x=(bx,), method=method)
        fresh = al.BoundedModule(net, x, bound_opts=compat.default_bound_opts())
        flb, fub = fresh.compute_bounds(x=(bx,), method=method)
        assert torch.allclose(lb, flb, rtol=0, atol=1e-12)
        assert torch.allclose(ub, fub, rtol=0, atol=1e-12)
        pts = x.unsqueeze(1) + 0.1 * torch.rand(2, 300, 3, dtype=torch.float64) - 0.05
        with torch.no_grad():
            out = net(pts.reshape(-1, 3)).reshape(2, 300, 2)
        assert (out >= lb.unsqueeze(1) - TOL).all() and (out <= ub.unsqueeze(1) + TOL).all()
    assert not torch.equal(ub, before[1])
