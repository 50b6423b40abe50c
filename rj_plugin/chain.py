"""The graph transformation: auto_LiRPA's computation graph -> the backward Jacobian DAG.

Every node that depends on the input x is either an elementwise activation h_t = sigma_t(z_t) or
affine in its variable inputs.  Numbering the input 0, the activations 1..m-1 in topological
order and the output m, the graph is (see :mod:`rj_plugin.recurjac`)

    z_t = sum_{s < t} A_{t<-s} h_s + b_t,      f = sum_{s < m} A_{m<-s} h_s + b_m,

where A_{t<-s} is the *linear part* of the affine sub-graph between h_s and z_t (biases and
other constant offsets do not enter the Jacobian; several affine paths, e.g. a residual skip and
a branch, add up).  A plain MLP has only the edges (t-1, t).

The transformation walks auto_LiRPA's graph, never relying on node names (they differ between
versions): each node is dispatched on its operator type through ``LINEAR_OPS`` /
``ACTIVATION_OPS``; an operator in neither is an :class:`~rj_plugin.errors.UnsupportedLayerError`
naming the node and its op, and nothing is approximated silently.  ``JacobianGraph.propagate``
pushes a batch of vectors ``[R, *shape]`` from one node through the affine nodes (convolutions
stay convolutions); ``JacobianGraph.edges`` materialises every A_{t<-s} as a dense matrix by
pushing identity columns in chunks, which is what the bound algorithms consume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rj_plugin.derivatives import Activation, get_activation
from rj_plugin.errors import UnsupportedLayerError
from rj_plugin.lirpa import GraphNode

LinearFn = Callable[[Tensor], Tensor]


@dataclass
class LinearNode:
    """An affine graph node: ``apply(vals)`` maps the linear parts arriving at its variable inputs
    (``[R, *shape]`` each, or None where nothing arrives: a zero) to its own (None if all are)."""

    node: str
    op: str
    inputs: list[str]
    apply: Callable[[list[Tensor | None]], Tensor | None]


@dataclass
class ActivationStep:
    """An elementwise activation node; its pre-activation bounds are those of ``input_node``."""

    node: str
    op: str
    input_node: str
    activation: Activation
    shape: tuple[int, ...]


@dataclass
class JacobianGraph:
    """The graph reduced to what the Jacobian needs: nodes 0 (input), 1..m-1 (activations, in
    topological order), m (output), and the affine nodes between them."""

    input_node: str
    input_shape: tuple[int, ...]
    output_node: str
    output_shape: tuple[int, ...]
    activations: list[ActivationStep]
    linear_nodes: list[LinearNode]

    @property
    def depth(self) -> int:
        return len(self.activations) + 1

    def _source_name(self, index: int) -> str:
        return self.input_node if index == 0 else self.activations[index - 1].node

    def _shape(self, index: int) -> tuple[int, ...]:
        if index == 0:
            return self.input_shape
        if index == self.depth:
            return self.output_shape
        return self.activations[index - 1].shape

    def propagate(self, source: int, v: Tensor) -> dict[int, Tensor]:
        """Push ``v`` (``[R, *shape of node source]``) through the affine nodes.

        Returns the linear parts arriving at each reached target t > source: the input of
        activation t (t < m) or the output (t = m), flattened to ``[R, n_t]``.
        """
        values: dict[str, Tensor] = {self._source_name(source): v}
        for lin in self.linear_nodes:
            arriving = [values.get(name) for name in lin.inputs]
            if any(a is not None for a in arriving):
                out = lin.apply(arriving)
                if out is not None:
                    values[lin.node] = out
        reached = {}
        for t in range(source + 1, self.depth + 1):
            name = self.output_node if t == self.depth else self.activations[t - 1].input_node
            if name in values:
                reached[t] = values[name].reshape(v.shape[0], -1)
        return reached

    def push(self, source: int, v: Tensor) -> dict[int, Tensor]:
        """:meth:`propagate` for flat vectors: ``v`` ``[R, n_source]`` -> ``{t: [R, n_t]}``."""
        return self.propagate(source, v.reshape(v.shape[0], *self._shape(source)))

    def edges(self, dtype: torch.dtype, device: torch.device | str,
              max_elements: int = 1 << 24) -> dict[tuple[int, int], Tensor]:
        """Every A_{t<-s} as a dense ``[n_t, n_s]`` matrix (inputs and outputs flattened in C
        order), by pushing identity columns in chunks; pairs with no affine path are absent."""
        edges: dict[tuple[int, int], Tensor] = {}
        for s in range(self.depth):
            shape = self._shape(s)
            n_s = math.prod(shape)
            widest = max(math.prod(self._shape(t)) for t in range(s, self.depth + 1))
            cols = max(1, max_elements // max(1, widest))
            parts: dict[int, list[Tensor]] = {}
            for start in range(0, n_s, cols):
                stop = min(n_s, start + cols)
                eye = torch.zeros(stop - start, n_s, dtype=dtype, device=device)
                eye[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
                for t, val in self.propagate(s, eye.reshape(stop - start, *shape)).items():
                    parts.setdefault(t, []).append(val)
            for t, blocks in parts.items():
                edges[(s, t)] = torch.cat(blocks, 0).T.contiguous()
        return edges


# ----------------------------------------------------------------------------------------------
# Operator tables.  A builder gets the node, the index of its one variable input and the values
# of its constant inputs (None at the variable's position), and returns the linear map.

LinearBuilder = Callable[[GraphNode, int, list], LinearFn]


def _reshape_to_output(node: GraphNode, var: int, consts: list) -> LinearFn:
    out = node.output_shape[1:]
    return lambda v: v.reshape(v.shape[0], *out)


def _linear(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0 or node.attrs.get("transA", 0):
        raise UnsupportedLayerError(f"node {node.name} ({node.op}): only a constant weight "
                                    "applied to the variable input is supported")
    weight = consts[1]
    # auto_LiRPA's Linear/Gemm: y = alpha * x @ w.T if transB else alpha * x @ w (+ beta * b).
    mat = weight.T if node.attrs.get("transB", 0) else weight
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha != 1.0:
        mat = alpha * mat
    return lambda v: v @ mat


def _matmul(node: GraphNode, var: int, consts: list) -> LinearFn:
    other = consts[1 - var]
    if var == 0:
        return lambda v: v @ other
    return lambda v: other @ v


def _add(node: GraphNode, var: int, consts: list) -> LinearFn:
    out = node.output_shape[1:]
    return lambda v: v.expand(v.shape[0], *out) if tuple(v.shape[1:]) != tuple(out) else v


def _sub(node: GraphNode, var: int, consts: list) -> LinearFn:
    keep = _add(node, var, consts)
    if var == 0:
        return keep
    return lambda v: -keep(v)


def _neg(node: GraphNode, var: int, consts: list) -> LinearFn:
    return lambda v: -v


def _mul(node: GraphNode, var: int, consts: list) -> LinearFn:
    factor = consts[1 - var]
    return lambda v: v * factor


def _div(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0:
        raise UnsupportedLayerError(f"node {node.name} (Div): a constant divided by the input "
                                    "is not affine")
    divisor = consts[1]
    return lambda v: v / divisor


def _transpose(node: GraphNode, var: int, consts: list) -> LinearFn:
    perm = list(node.attrs["perm"])
    if perm[0] != 0:
        raise UnsupportedLayerError(f"node {node.name} (Transpose): permutes the batch axis")
    return lambda v: v.permute(*perm)


def _conv(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0:
        raise UnsupportedLayerError(f"node {node.name} (Conv): variable weights not supported")
    weight, a = consts[1], node.attrs
    stride, padding = a.get("stride", 1), a.get("padding", 0)
    dilation, groups = a.get("dilation", 1), a.get("groups", 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return lambda v: conv(v, weight, None, stride, padding, dilation, groups)


def _conv_transpose(node: GraphNode, var: int, consts: list) -> LinearFn:
    if var != 0 or consts[1].dim() != 4:
        raise UnsupportedLayerError(f"node {node.name} (ConvTranspose): only 2-d transposed "
                                    "convolutions with constant weights are supported")
    weight, a = consts[1], node.attrs
    opts = {"stride": a.get("stride", 1), "padding": a.get("padding", 0),
            "output_padding": a.get("output_padding", 0), "groups": a.get("groups", 1),
            "dilation": a.get("dilation", 1)}
    return lambda v: F.conv_transpose2d(v, weight, None, **opts)


def _batchnorm(node: GraphNode, var: int, consts: list) -> LinearFn:
    if node.attrs.get("training", False):
        raise UnsupportedLayerError(f"node {node.name} (BatchNormalization) is in training mode;"
                                    " call model.eval() first")
    weight, _, _, var_, = consts[1], consts[2], consts[3], consts[4]
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale = weight / torch.sqrt(var_ + eps)
    shape = (1, -1) + (1,) * (len(node.output_shape) - 2)
    return lambda v: v * scale.reshape(shape)


def _avgpool(node: GraphNode, var: int, consts: list) -> LinearFn:
    a = node.attrs
    kernel, stride, padding = a["kernel_shape"], a.get("stride", a["kernel_shape"]), a["padding"]
    if len(kernel) != 2:
        raise UnsupportedLayerError(f"node {node.name} (AveragePool): only 2-d pooling")
    return lambda v: F.avg_pool2d(v, kernel, stride, padding, ceil_mode=a.get("ceil_mode", False),
                                  count_include_pad=a.get("count_include_pad", True))


def _slice(node: GraphNode, var: int, consts: list) -> LinearFn:
    def attr_or_input(index: int, key: str, default: int | None) -> int | None:
        if len(consts) > index and consts[index] is not None:
            return int(torch.as_tensor(consts[index]).reshape(-1)[0])
        value = node.attrs.get(key, default)
        return int(value[0]) if isinstance(value, (list, tuple)) else value

    start, end = attr_or_input(1, "starts", None), attr_or_input(2, "ends", None)
    axis, step = attr_or_input(3, "axes", None), attr_or_input(4, "steps", 1)
    rank = len(node.output_shape)
    axis = axis + rank if axis is not None and axis < 0 else axis
    if axis in (None, 0) or step not in (1, -1) or start is None or end is None:
        raise UnsupportedLayerError(f"node {node.name} (Slice): only a unit-step slice of one "
                                    "non-batch axis is supported")

    def apply(v: Tensor) -> Tensor:
        size = v.shape[axis]
        lo = start + size if start < 0 else start
        hi = end + size if end < 0 else end
        if step == -1:
            lo, hi = hi, lo + 1
        lo, hi = max(0, lo), min(hi, size)
        out = v.narrow(axis, lo, hi - lo)
        return out.flip(axis) if step == -1 else out

    return apply


LINEAR_OPS: dict[str, LinearBuilder] = {
    "Slice": _slice,
    "Linear": _linear,
    "MatMul": _matmul,
    "Add": _add,
    "Sub": _sub,
    "Neg": _neg,
    "Mul": _mul,
    "Div": _div,
    "Flatten": _reshape_to_output,
    "Reshape": _reshape_to_output,
    "Squeeze": _reshape_to_output,
    "Unsqueeze": _reshape_to_output,
    "Identity": _reshape_to_output,
    "Dropout": _reshape_to_output,  # an eval-mode dropout is the identity
    "Transpose": _transpose,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "AveragePool": _avgpool,
}


def _activation_name(node: GraphNode) -> str:
    table = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Atan": "arctan",
             "Softplus": "softplus"}
    if node.op == "LeakyRelu":
        return f"leaky_relu:{float(node.attrs['alpha'])}"
    if node.op == "Elu":
        return f"elu:{float(node.attrs.get('alpha', 1.0))}"
    return table[node.op]


ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "Tanh", "Sigmoid", "Atan", "Softplus", "Elu"})

# Elementwise but with a derivative that changes sign, or not elementwise: refused explicitly.
_REFUSED = {
    "MaxPool": "max-pooling is a data-dependent selection, not an elementwise activation",
    "Gelu": "GELU has a derivative that can be negative",
    "Softmax": "softmax is not elementwise",
}


def _two_branch(node: GraphNode, var: list[int], consts: list) -> Callable:
    """Add / Sub of two variable branches: the linear parts add (or subtract); a branch that
    the pushed vectors did not reach contributes zero."""
    if node.op not in ("Add", "Sub"):
        raise UnsupportedLayerError(
            f"node {node.name} ({node.op}) combines several branches of the input; only Add and "
            "Sub of branches are linear (a product of branches is not supported)")
    sign = -1.0 if node.op == "Sub" else 1.0
    out = node.output_shape[1:]

    def apply(vals: list[Tensor | None]) -> Tensor | None:
        a, b = vals[var[0]], vals[var[1]]
        if b is not None:
            b = -b if sign < 0 else b
        total = b if a is None else (a if b is None else a + b)
        if total is None:
            return None
        return total.expand(total.shape[0], *out) if tuple(total.shape[1:]) != tuple(out) \
            else total

    return apply


def build_graph(nodes: list[GraphNode], input_node: str, output_node: str) -> JacobianGraph:
    """Walk a topologically ordered graph from ``input_node`` to ``output_node``.

    Nodes that do not depend on the input are constants.  Every node that does is either an
    elementwise activation (``ACTIVATION_OPS``) or affine in its variable inputs with constant
    operands (``LINEAR_OPS``; Add/Sub may also join two branches, as in residual blocks).

    Raises:
        UnsupportedLayerError: naming the first node whose operator has no Jacobian rule.
    """
    by_name = {n.name: n for n in nodes}
    variable = {input_node}
    activations: list[ActivationStep] = []
    linear: list[LinearNode] = []
    for node in nodes:
        var = [i for i, name in enumerate(node.inputs) if name in variable]
        if node.name == input_node or not var:
            continue
        variable.add(node.name)
        if node.op in ACTIVATION_OPS:
            try:
                activation = get_activation(_activation_name(node))
            except UnsupportedLayerError as exc:
                raise UnsupportedLayerError(f"node {node.name} (op {node.op}): {exc}") from None
            activations.append(ActivationStep(node.name, node.op, node.inputs[var[0]],
                                              activation, tuple(node.output_shape[1:])))
            continue
        if node.op not in LINEAR_OPS:
            reason = _REFUSED.get(node.op, "no Jacobian rule for this operator")
            raise UnsupportedLayerError(f"unsupported node {node.name} (op {node.op}): {reason}")
        consts = [by_name[name].value if i not in var else None
                  for i, name in enumerate(node.inputs)]
        missing = [node.inputs[i] for i, c in enumerate(consts) if i not in var and c is None]
        if missing:
            raise UnsupportedLayerError(f"node {node.name} ({node.op}): input(s) {missing} are "
                                        "neither descendants of the input nor constants")
        if len(var) == 1:
            fn, i = LINEAR_OPS[node.op](node, var[0], consts), var[0]
            apply = (lambda f, j: lambda vals: f(vals[j]) if vals[j] is not None else None)(fn, i)
        elif len(var) == 2:
            apply = _two_branch(node, var, consts)
        else:
            raise UnsupportedLayerError(f"node {node.name} ({node.op}) joins {len(var)} branches;"
                                        " at most two are supported")
        linear.append(LinearNode(node.name, node.op, list(node.inputs), apply))
    if output_node not in variable:
        raise UnsupportedLayerError(f"the output node {output_node} does not depend on the input")
    return JacobianGraph(input_node, tuple(by_name[input_node].output_shape[1:]), output_node,
                         tuple(by_name[output_node].output_shape[1:]), activations, linear)
