"""RecurJac as a Jacobian-bounding bound operator registered in auto_LiRPA.

``JacobianOf(net)`` is a module whose output is the Jacobian of ``net``:

    JacobianOf(net)(x) = d net / d x    of shape ``[B, n_out, *x.shape[1:]]``  (torch.func)

Traced by auto_LiRPA, ``BoundedModule(JacobianOf(net), x0)`` holds the forward graph of ``net``
(the node's second input, so that auto_LiRPA sees the network) followed by one custom node,
``rj_plugin::Jacobian`` (namespaced: nothing clashes with the ``JacobianOP`` of newer auto_LiRPA
releases), whose bound class :class:`BoundRecurJacobian` is registered with
``register_custom_op`` when ``rj_plugin`` is imported.

Bounds of the node:

* ``interval_propagate``: RecurJac (or the configured method) over the region of the input node:
  for p < inf the l_p ball around the perturbed input's value with the perturbation's eps, for
  l_inf the input interval (``x -+ eps`` or the perturbation's ``x_L``/``x_U``).  Pre-activation
  bounds come from auto_LiRPA on the network's graph by the method in the node's options.  The
  result is cached for the next call with the same region and the same network weights, both
  compared by value (one CROWN pass asks for it several times; a reused perturbation with a new
  eps, a box moved in place, or weights changed in place by an optimiser step is a new call).
* ``bound_backward``: with constant bounds [J_lo, J_hi] over the region, for any coefficient
  tensor A,  A . J >= A+ . J_lo + A- . J_hi  (and the mirror for the upper bound): the node
  passes zero coefficients to its inputs and returns these constants as bias.  With
  ``method: linear`` on a network with smooth activations the entries have linear bounds in the
  input, lo_c + lo_X x <= J(x) <= hi_c + hi_X x (:meth:`JacobianBounds.input_lines`); then
  A . J >= (A+ lo_X + A- hi_X) x + A+ lo_c + A- hi_c, and the x coefficients go to the input
  node, so auto_LiRPA concretises them jointly over the region.  Anything after the node
  (C @ J, |J| sums, J v products) is then bounded by auto_LiRPA as usual.

Options: ``BoundedModule(..., bound_opts={"recurjac": {"preact": "crown", "method":
"recurjac", "alpha_iterations": 20, "alpha_lr": 0.1}})``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from rj_plugin.errors import UnsupportedLayerError
from rj_plugin.lirpa import auto_LiRPA  # imported through the compatibility layer

Bound = auto_LiRPA.operators.Bound
register_custom_op = auto_LiRPA.bound_op_map.register_custom_op

OP_NAME = "rj_plugin::Jacobian"
DEFAULT_OPTIONS = {"preact": "crown", "method": "recurjac", "alpha_iterations": 20,
                   "alpha_lr": 0.1}

# Networks wrapped by JacobianOf, looked up by the integer key stored on the graph node.
_NETWORKS: dict[int, nn.Module] = {}
_KEYS = itertools.count()


def _jacobian(net: nn.Module, x: Tensor) -> Tensor:
    """d net / d x for a batch ``[B, *in]`` -> ``[B, n_out, *in]`` (torch.func.vmap(jacrev))."""
    def single(z: Tensor) -> Tensor:
        return net(z.unsqueeze(0)).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(single))(x)


def _traced_function(key: int) -> type[torch.autograd.Function]:
    """The op that tracing records: inputs (x, net(x)), attribute ``net`` = ``key``.

    One class per wrapped network, because a traced Python op may take only tensor arguments.
    """

    class TracedJacobian(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, y: Tensor) -> Tensor:
            # Only run under the tracer: a placeholder of the right shape (torch.func cannot
            # run there); auto_LiRPA evaluates the node with its own forward.
            return x.new_zeros(y.shape[0], y[0].numel(), *x.shape[1:])

        @staticmethod
        def symbolic(g, x, y):  # noqa: ANN001, ANN205 - the exporter inspects this signature
            return g.op(OP_NAME, x, y, net_i=key)

    return TracedJacobian


class JacobianOf(nn.Module):
    """A module whose output is the Jacobian of ``net``: ``[B, n_out, *input_shape]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        key = next(_KEYS)
        _NETWORKS[key] = net
        self._traced = _traced_function(key)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            return self._traced.apply(x, self.net(x))
        return _jacobian(self.net, x)


class _RegionKey:
    """The region of the operator's input node, by value (a snapshot, for the bound cache).

    Either a box, ``lower``/``upper`` ``[B, *in]`` (an l_inf perturbation: auto_LiRPA's interval
    of the input, ``x -+ eps`` or the perturbation's ``x_L``/``x_U``; or no perturbation), or an
    l_p ball with p < inf: ``center`` ``[B, *in]`` (the perturbed input's value: auto_LiRPA's
    interval of the input node is the enclosing box ``x -+ eps``, whose midpoint may differ from
    x by rounding), ``norm`` and ``eps``.  The tensors are clones, so moving the caller's tensors
    in place or setting ``ptb.eps`` later does not change a stored key.
    """

    __slots__ = ("center", "eps", "lower", "norm", "upper")

    def __init__(self, lower: Tensor | None, upper: Tensor | None, center: Tensor | None,
                 norm: float, eps: float | None) -> None:
        self.lower, self.upper, self.center, self.norm, self.eps = lower, upper, center, norm, eps

    @property
    def is_box(self) -> bool:
        return self.lower is not None

    @classmethod
    def of(cls, node: Any) -> _RegionKey:
        """Snapshot the region of a (root) input node of auto_LiRPA's graph."""
        ptb = getattr(node, "perturbation", None)
        norm = float(getattr(ptb, "norm", math.inf))
        eps = getattr(ptb, "eps", None)
        lower, upper = node.lower.detach(), node.upper.detach()
        if ptb is None or math.isinf(norm) or eps is None:
            return cls(_plain_clone(lower), _plain_clone(upper), None, math.inf, None)
        center = getattr(node, "center", None)
        if not isinstance(center, Tensor) or center.shape != lower.shape:
            center = getattr(node, "value", None)
        if not isinstance(center, Tensor) or center.shape != lower.shape:
            center = (lower + upper) / 2
        return cls(None, None, _plain_clone(center.detach()), norm, float(eps))

    def same(self, other: _RegionKey) -> bool:
        """True iff ``other`` is exactly the same region (equal values, not identities)."""
        return (self.norm == other.norm and self.eps == other.eps
                and all(_same_tensor(a, b) for a, b in ((self.lower, other.lower),
                                                        (self.upper, other.upper),
                                                        (self.center, other.center))))


def _plain_clone(t: Tensor) -> Tensor:
    """A detached copy of ``t`` as a plain ``torch.Tensor`` (not a BoundedTensor)."""
    return t.detach().clone().as_subclass(Tensor)


def _same_tensor(a: Tensor | None, b: Tensor | None) -> bool:
    """Both None, or equal shape, dtype, device and values (``torch.equal``; NaN never equal)."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and \
        torch.equal(a, b)


_NO_OP_VIEWS = frozenset({"BoundReshape", "BoundFlatten", "BoundSqueeze", "BoundUnsqueeze"})


def _perturbed_root(node: Any, name: str) -> Any:
    """The perturbed input node whose region the Jacobian is bounded over.

    The tracer may record a no-op view (e.g. Flatten of a flat input) as the op's input; the
    region is then that of the perturbed input behind it.  Any other op in between (``3 * x``,
    ``x + 1``, a layer) would make the node the Jacobian at g(x), not at x, and bounding it over
    x's region would be wrong: refused, naming the op.
    """
    shape = tuple(node.output_shape[1:]) if getattr(node, "output_shape", None) else None
    while getattr(node, "perturbation", None) is None:
        kind = type(node).__name__
        same_shape = shape is not None and tuple(node.output_shape[1:]) == shape
        if kind not in _NO_OP_VIEWS or not same_shape or not node.inputs:
            raise UnsupportedLayerError(
                f"the Jacobian node {name} must take the perturbed input itself; it takes the "
                f"output of node {node.name} (op {kind.removeprefix('Bound')}); put that op "
                "inside the network given to JacobianOf (the Jacobian is taken w.r.t. its input)")
        node = node.inputs[0]
    if shape is not None and tuple(node.output_shape[1:]) != shape:
        raise UnsupportedLayerError(
            f"the Jacobian node {name} takes a reshaped view of the perturbed input; apply "
            "JacobianOf to a network that takes the input in its own shape")
    return node


class BoundRecurJacobian(Bound):
    """auto_LiRPA bound class of ``rj_plugin::Jacobian`` (see the module docstring)."""

    def __init__(self, attr: dict, inputs: list, output_index: int, options: dict) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.key = int(attr["net"])
        self.rj_options = {**DEFAULT_OPTIONS, **((options or {}).get("recurjac") or {})}
        self._bounder = None
        # (region key, (J_lo, J_hi)): see _RegionKey.  One compute_bounds call may ask for the
        # node's bounds several times (CROWN: intermediate bounds of what follows the node and
        # the final backward pass; alpha-CROWN: every iteration), so the last result is kept.
        self._cache: tuple[_RegionKey, tuple[Tensor, Tensor]] | None = None
        self._lines: tuple[_RegionKey, tuple[Tensor, ...] | None] | None = None
        self._last_bounds = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            return _jacobian(_NETWORKS[self.key], x.detach())

    def _region_bounds(self) -> tuple[Tensor, Tensor]:
        """RecurJac bounds over the region of the input node (its perturbation and interval)."""
        from rj_plugin.api import JacobianBounder

        if self._bounder is not None and not self._bounder.is_current():
            # The network's weights changed in place (an optimiser step, load_state_dict): the
            # bounder's linear maps and the cached bounds are those of the old network.
            self._bounder, self._cache, self._lines = None, None, None
        node = _perturbed_root(self.inputs[0], self.name)
        # The cache is keyed on the region's values, never on tensor identities: a perturbation
        # reused with a new eps, or a box whose x_L / x_U were moved in place, is a new region.
        key = _RegionKey.of(node)
        if self._cache is not None and self._cache[0].same(key):
            return self._cache[1]
        ref = key.lower if key.is_box else key.center
        if self._bounder is None:
            self._bounder = JacobianBounder(_NETWORKS[self.key], example=ref[:1],
                                            dtype=ref.dtype, device=ref.device)
        b = self._bounder
        if key.is_box:
            region = b.region(lower=key.lower, upper=key.upper)
        else:
            region = b.region(key.center, key.eps, key.norm)
        o = self.rj_options
        # The outer compute_bounds may run under no_grad (alpha-CROWN's init pass); the node's
        # own alpha-CROWN pre-activation bounds optimise with gradients.
        with torch.enable_grad():
            jb = b.bound(region, preact=o["preact"], method=o["method"],
                         alpha_iterations=o["alpha_iterations"], alpha_lr=o["alpha_lr"])
        shape = (jb.lower.shape[0], jb.lower.shape[1], *self.inputs[0].output_shape[1:])
        self._cache = (key, (jb.lower.reshape(shape), jb.upper.reshape(shape)))
        self._last_bounds = jb
        return self._cache[1]

    def _input_lines(self) -> tuple[Tensor, ...] | None:
        """The entries' linear bounds in the input for the cached region (None: constants)."""
        key = self._cache[0]
        if self._lines is None or not self._lines[0].same(key):
            self._lines = (key, self._last_bounds.input_lines())
        return self._lines[1]

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        return self._region_bounds()

    def bound_backward(self, last_lA: Tensor | None, last_uA: Tensor | None, *x: Any
                       ) -> tuple[list, Tensor | float, Tensor | float]:
        lower, upper = self._region_bounds()
        lines = self._input_lines()
        if lines is None:
            return [(None, None), (None, None)], _constant_bias(last_lA, lower, upper), \
                _constant_bias(last_uA, upper, lower)
        lo_c, lo_x, hi_c, hi_x = lines
        in_shape = tuple(self.inputs[0].output_shape[1:])
        l_coef, l_bias = _linear_terms(last_lA, (lo_c, lo_x), (hi_c, hi_x), lower, in_shape)
        u_coef, u_bias = _linear_terms(last_uA, (hi_c, hi_x), (lo_c, lo_x), lower, in_shape)
        return [(l_coef, u_coef), (None, None)], l_bias, u_bias


def _constant_bias(A: Tensor | None, favour: Tensor, other: Tensor) -> Tensor | float:
    """``sum A+ favour + A- other`` over the node's dims: ``[spec, B]`` (0 for a missing A).

    With favour = J_lo this lower-bounds A . J; with favour = J_hi it upper-bounds it.
    """
    if A is None:
        return 0.0
    A = A.reshape(A.shape[0], A.shape[1], *favour.shape[1:])  # a flat spec C arrives flat
    dims = tuple(range(2, A.dim()))
    return (A.clamp(min=0) * favour.unsqueeze(0)).sum(dims) + \
        (A.clamp(max=0) * other.unsqueeze(0)).sum(dims)


def _linear_terms(A: Tensor | None, favour: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor],
                  like: Tensor, in_shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | float]:
    """``A+ . (c + X x) + A- . (c' + X' x)`` split into the x coefficients ``[spec, B, *in]``
    and the constant ``[spec, B]`` (favour = the lower lines: a lower bound of A . J; favour =
    the upper lines: an upper bound).  ``*_c``: ``[B, c, n]``, ``*_X``: ``[B, c, n, n]``."""
    if A is None:
        return None, 0.0
    A = A.reshape(A.shape[0], A.shape[1], -1)  # [spec, B, c * n]
    a_pos, a_neg = A.clamp(min=0), A.clamp(max=0)
    batch = like.shape[0]
    flat = [t.reshape(batch, -1) for t in (favour[0], other[0])]
    bias = (a_pos * flat[0]).sum(-1) + (a_neg * flat[1]).sum(-1)
    x_fav = favour[1].reshape(batch, -1, favour[1].shape[-1])  # [B, c * n, n]
    x_oth = other[1].reshape(batch, -1, other[1].shape[-1])
    coef = torch.einsum("sbe,ben->sbn", a_pos, x_fav) + torch.einsum("sbe,ben->sbn", a_neg,
                                                                      x_oth)
    return coef.reshape(A.shape[0], batch, *in_shape), bias


register_custom_op(OP_NAME, BoundRecurJacobian)
