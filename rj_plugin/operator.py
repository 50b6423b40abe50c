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
  an l_p ball around the midpoint of the input interval with the perturbation's eps and norm, or
  the box itself.  Pre-activation bounds come from auto_LiRPA on the network's graph by the
  method in the node's options.
* ``bound_backward``: the interval [J_lo, J_hi] is constant over the region, so for any
  coefficient tensor A,  A . J >= A+ . J_lo + A- . J_hi  (and the mirror for the upper bound):
  the node passes zero coefficients to its inputs and returns these constants as bias.  Anything
  after the node (C @ J, |J| sums, J v products) is then bounded by auto_LiRPA as usual.

Options: ``BoundedModule(..., bound_opts={"recurjac": {"preact": "crown", "method":
"recurjac", "alpha_iterations": 20, "alpha_lr": 0.1}})``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

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


class BoundRecurJacobian(Bound):
    """auto_LiRPA bound class of ``rj_plugin::Jacobian`` (see the module docstring)."""

    def __init__(self, attr: dict, inputs: list, output_index: int, options: dict) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.key = int(attr["net"])
        self.rj_options = {**DEFAULT_OPTIONS, **((options or {}).get("recurjac") or {})}
        self._bounder = None
        self._cache: tuple | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            return _jacobian(_NETWORKS[self.key], x.detach())

    def _region_bounds(self) -> tuple[Tensor, Tensor]:
        """RecurJac bounds over the region of the input node (its perturbation and interval)."""
        from rj_plugin.api import JacobianBounder

        node = self.inputs[0]
        # The tracer may record a no-op view (e.g. Flatten of a flat input) as the op's input;
        # the region is that of the perturbed root input behind it.
        while getattr(node, "perturbation", None) is None and node.inputs:
            node = node.inputs[0]
        lower, upper = node.lower, node.upper
        ptb = getattr(node, "perturbation", None)
        key = (lower.data_ptr(), upper.data_ptr(), tuple(lower.shape), id(ptb))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        net = _NETWORKS[self.key]
        if self._bounder is None:
            self._bounder = JacobianBounder(net, example=lower.detach()[:1],
                                            dtype=lower.dtype, device=lower.device)
        b = self._bounder
        norm = getattr(ptb, "norm", math.inf)
        eps = getattr(ptb, "eps", None)
        if ptb is None or math.isinf(norm) or eps is None:
            region = b.region(lower=lower.detach(), upper=upper.detach())
        else:
            region = b.region((lower.detach() + upper.detach()) / 2, float(eps), norm)
        o = self.rj_options
        jb = b.bound(region, preact=o["preact"], method=o["method"],
                     alpha_iterations=o["alpha_iterations"], alpha_lr=o["alpha_lr"])
        shape = (jb.lower.shape[0], jb.lower.shape[1], *self.inputs[0].output_shape[1:])
        self._cache = (key, (jb.lower.reshape(shape), jb.upper.reshape(shape)))
        return self._cache[1]

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        return self._region_bounds()

    def bound_backward(self, last_lA: Tensor | None, last_uA: Tensor | None, *x: Any
                       ) -> tuple[list, Tensor | float, Tensor | float]:
        lower, upper = self._region_bounds()
        return [(None, None), (None, None)], _constant_bias(last_lA, lower, upper), \
            _constant_bias(last_uA, upper, lower)


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


register_custom_op(OP_NAME, BoundRecurJacobian)
